"""vSphere test VMs on the simulator (tests/servers/vsphere.py): disks written into the datastore's folder
on this machine, the VM created through pyvmomi directly (not through the engine's driver), and the
documents of a migration to or from it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from include.diskio import qemu_img_path

MiB = 1 << 20


def pattern_disk(raw: Path, size_mib: int, seed: int) -> None:
    """A sparse raw image with a few MiB of data at two places."""
    import random

    rnd = random.Random(seed)
    with open(raw, "wb") as fh:
        fh.truncate(size_mib * MiB)
        for start in (MiB, size_mib * MiB // 2):
            fh.seek(start)
            fh.write(rnd.randbytes(3 * MiB))


def create_vm(server: Any, name: str, disks: list[tuple[str, int]], *, datastore: str = "datastore1",
              subformat: str = "streamOptimized", work: Path) -> dict[str, Path]:
    """A shut-off VM ``name`` with one disk per (label, MiB) on ``datastore``: the first on a paravirtual SCSI
    controller, the others on an LSI Logic one; two NICs (vmxnet3 on "VM Network", e1000 on "VM Network 2").
    Returns each label's raw content file (what a migrated disk must hold)."""
    from pyVmomi import vim

    folder = server.datastore_path(datastore, name)
    folder.mkdir(parents=True, exist_ok=True)
    raws: dict[str, Path] = {}
    for index, (label, size) in enumerate(disks):
        raw = work / f"{name}-{label}.raw"
        pattern_disk(raw, size, seed=index + 7)
        subprocess.run([qemu_img_path(), "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}",
                        str(raw), str(folder / f"{name}-{label}.vmdk")], check=True)
        raws[label] = raw
    si = server.connect()
    try:
        content = si.RetrieveContent()
        dc = next(e for e in content.rootFolder.childEntity if isinstance(e, vim.Datacenter))
        ds = next(d for d in dc.datastore if d.name == datastore)
        pool = ds.host[0].key.parent.resourcePool
        nets = {n.name: n for n in dc.network}
        changes = [
            vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.ParaVirtualSCSIController(
                key=-10, busNumber=0, sharedBus="noSharing")),
            vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.VirtualLsiLogicController(
                key=-11, busNumber=1, sharedBus="noSharing")),
        ]
        for index, (label, size) in enumerate(disks):
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.VirtualDisk(
                key=-20 - index, controllerKey=-10 if index == 0 else -11, unitNumber=0 if index == 0 else index - 1,
                capacityInKB=size * 1024, backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName=f"[{datastore}] {name}/{name}-{label}.vmdk", diskMode="persistent"))))
        for key, (cls, net) in enumerate(((vim.vm.device.VirtualVmxnet3, "VM Network"),
                                          (vim.vm.device.VirtualE1000, "VM Network 2"))):
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=cls(
                key=-40 - key, backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                    deviceName=net, network=nets[net]))))
        config = vim.vm.ConfigSpec(name=name, numCPUs=2, memoryMB=768, guestId="ubuntu64Guest",
                                   files=vim.vm.FileInfo(vmPathName=f"[{datastore}] {name}/{name}.vmx"),
                                   deviceChange=changes)
        task = dc.vmFolder.CreateVM_Task(config=config, pool=pool)
        _wait(task)
    finally:
        server.disconnect(si)
    return raws


def _wait(task: Any) -> Any:
    import time

    from pyVmomi import vim

    for _ in range(600):
        if task.info.state == vim.TaskInfo.State.success:
            return task.info.result
        if task.info.state == vim.TaskInfo.State.error:
            raise RuntimeError(task.info.error.msg)
        time.sleep(0.05)
    raise TimeoutError("vCenter task")


def find_vm(server: Any, name: str) -> Any:
    """(connection, VM) of the VM named ``name``, or (connection, None)."""
    from pyVmomi import vim

    si = server.connect()
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return si, next((v for v in view.view if v.name == name), None)
    finally:
        view.Destroy()


def download(server: Any, datastore: str, path: str, dest: Path) -> Path:
    """GET a datastore file through the vSphere file API (as a user would fetch it)."""
    import requests

    si = server.connect()
    try:
        with requests.Session() as http:
            http.trust_env = False
            resp = http.get(server.datastore_file_url(datastore, path), headers={"Cookie": server.session_cookie(si)},
                            verify=str(server.ca_file), stream=True, timeout=60)
            resp.raise_for_status()
            with open(dest, "wb") as fh:
                for chunk in resp.iter_content(1 << 20):
                    fh.write(chunk)
    finally:
        server.disconnect(si)
    return dest


def provider_docs(server: Any, name: str, namespace: str = "default", *, password: str | None = None,
                  upload: str | None = "datastore") -> list[dict]:
    """A vsphere Provider on the simulator and its Secret (username, password, the simulator's CA); disks are
    uploaded to it through the datastore unless ``upload`` says otherwise (None: the engine's default, NFC)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if upload:
        meta["annotations"] = {"vmmigration.virtrigaud.io/vsphere-disk-upload": upload}
    return [
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "Provider", "metadata": meta,
         "spec": {"type": "vsphere", "endpoint": server.url, "credentialSecretRef": {"name": f"{name}-creds"},
                  "runtime": {"mode": "Remote", "image": "virtrigaud/provider-vsphere:latest"}}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-creds", "namespace": namespace},
         "type": "Opaque", "stringData": {"username": server.username, "password": password or server.password,
                                          "caBundle": server.ca_file.read_text()}},
    ]


def libvirt_provider_docs(world: Any, name: str, namespace: str) -> list[dict]:
    return [
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "Provider", "metadata": {"name": name,
                                                                                      "namespace": namespace},
         "spec": {"type": "libvirt", "endpoint": world.uri, "credentialSecretRef": {"name": f"{name}-creds"},
                  "runtime": {"mode": "Remote", "image": "virtrigaud/provider-libvirt:latest"}}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-creds", "namespace": namespace},
         "type": "Opaque", "stringData": {"username": "root"}},
    ]


def vm_doc(name: str, namespace: str, provider: str, vm_id: str) -> dict:
    return {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"providerRef": {"name": provider}, "classRef": {"name": "small"}, "powerState": "Off"},
            "status": {"id": vm_id}}


def env_allow_loopback() -> None:
    os.environ["VMMIGRATION_ALLOW_LOOPBACK"] = "true"
