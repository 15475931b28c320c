"""The vCenter simulator fixture (tests/servers/vsphere.py) against pyvmomi: TLS, credentials, inventory."""

from __future__ import annotations

import hashlib
import ssl
import urllib.request

import pytest

from tests.servers.vsphere import DATASTORES, VcsimServer


def _find(si, vimtype, name: str):
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vimtype], True)
    try:
        return [obj for obj in view.view if obj.name == name]
    finally:
        view.Destroy()


def test_tls_verifies_with_the_ca(vcsim: VcsimServer) -> None:
    assert vcsim.url == f"https://127.0.0.1:{vcsim.port}/sdk"
    with (
        ssl.create_connection(("127.0.0.1", vcsim.port)) as raw,
        vcsim.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.getpeercert()["subjectAltName"][0] == ("IP Address", "127.0.0.1")
    si = vcsim.connect()
    try:
        assert si.RetrieveContent().about.apiType == "VirtualCenter"
    finally:
        vcsim.disconnect(si)


def test_tls_without_the_ca_is_refused(vcsim: VcsimServer) -> None:
    with ssl.create_connection(("127.0.0.1", vcsim.port)) as raw, pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


def test_wrong_password_is_refused(vcsim: VcsimServer) -> None:
    from pyVmomi import vim

    with pytest.raises(vim.fault.InvalidLogin):
        vcsim.connect(password=vcsim.password + "x")
    with pytest.raises(vim.fault.InvalidLogin):
        vcsim.connect(username="root")


def test_datastores_are_folders_on_this_host(vcsim: VcsimServer) -> None:
    from pyVmomi import vim

    si = vcsim.connect()
    try:
        for name in DATASTORES:
            found = _find(si, vim.Datastore, name)
            assert len(found) == 1, name
            assert found[0].summary.url == str(vcsim.datastores[name])
            assert vcsim.datastores[name].is_dir()
        dc = si.content.searchIndex.FindByInventoryPath(vcsim.datacenter)
        assert sorted(ds.name for ds in dc.datastore) == sorted(DATASTORES)
    finally:
        vcsim.disconnect(si)


def test_port_groups_are_networks_of_the_datacenter(vcsim: VcsimServer) -> None:
    from pyVmomi import vim

    si = vcsim.connect()
    try:
        dc = si.content.searchIndex.FindByInventoryPath(vcsim.datacenter)
        networks = {n.name: n for n in dc.networkFolder.childEntity if isinstance(n, vim.Network)}
        for name in ("VM Network", "VM Network 2"):
            assert name in networks
            assert type(networks[name]) is vim.Network  # a standard port group, not a DVS one
        for cr in dc.hostFolder.childEntity:
            for host in cr.host:
                assert {"VM Network", "VM Network 2"} <= {n.name for n in host.network}
    finally:
        vcsim.disconnect(si)


def test_datastore_file_put_and_get(vcsim: VcsimServer) -> None:
    si = vcsim.connect()
    try:
        data = b"vmmigration" * 1000
        url = vcsim.datastore_file_url("datastore2", "fixture-test/sub/blob.bin")
        headers = {"Cookie": vcsim.session_cookie(si)}
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=vcsim.ssl_context())
        )
        with opener.open(urllib.request.Request(url, data=data, method="PUT", headers=headers), timeout=10) as r:
            assert r.status in (200, 201)
        on_disk = vcsim.datastore_path("datastore2", "fixture-test/sub/blob.bin")
        assert hashlib.sha256(on_disk.read_bytes()).digest() == hashlib.sha256(data).digest()
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as r:
            assert r.read() == data
    finally:
        vcsim.disconnect(si)


def test_main_go_fixes_hold(vcsim: VcsimServer) -> None:
    """What tests/servers/vcsim/main.go adds to the stock simulator: a CreateVM naming an unknown datastore
    is refused instead of crashing the process; vm.runtime and a VirtualDiskManager task's info decode."""
    from pyVim.task import WaitForTask
    from pyVmomi import vim

    si = vcsim.connect()
    try:
        dc = si.content.searchIndex.FindByInventoryPath(vcsim.datacenter)
        pool = si.content.searchIndex.FindByInventoryPath(f"{vcsim.datacenter}/host/DC0_C0/Resources")
        spec = vim.vm.ConfigSpec(
            name="fixture-test-bad",
            guestId="otherLinux64Guest",
            files=vim.vm.FileInfo(vmPathName="[nosuch] fixture-test-bad/x.vmx"),
        )
        with pytest.raises(vim.fault.InvalidDatastorePath):
            dc.vmFolder.CreateVM_Task(config=spec, pool=pool)
        spec = vim.vm.ConfigSpec(
            name="fixture-test-vm",
            guestId="otherLinux64Guest",
            files=vim.vm.FileInfo(vmPathName="[datastore2] fixture-test-vm/x.vmx"),
        )
        task = dc.vmFolder.CreateVM_Task(config=spec, pool=pool)
        WaitForTask(task)
        vm = task.info.result
        assert vm.runtime.powerState == "poweredOff"
        assert vm.runtime.faultToleranceState == "notConfigured"
        disk_spec = vim.VirtualDiskManager.FileBackedVirtualDiskSpec(
            diskType="thin", adapterType="lsiLogic", capacityKb=1024
        )
        task = si.content.virtualDiskManager.CreateVirtualDisk_Task(
            name="[datastore2] fixture-test-vm/d.vmdk", datacenter=dc, spec=disk_spec
        )
        WaitForTask(task)
        assert task.info.state == "success" and task.info.entity == dc
        assert vcsim.datastore_path("datastore2", "fixture-test-vm/d.vmdk").is_file()
        WaitForTask(vm.Destroy_Task())
    finally:
        vcsim.disconnect(si)
