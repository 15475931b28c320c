"""Proxmox VE as source and target, against the project's PVE API server (tests/servers/pve/: every request checked
against the official schema, disk bytes over a real sshd): the guide's Scenario 3 (Proxmox -> Libvirt through
HTTP) and Scenario 2 (vSphere -> Proxmox through NFS), Libvirt -> Proxmox and Proxmox -> vSphere, so that every
direction between the three hypervisors has run, and the bad inputs and PVE task failures, each produced for real.
Data is checked by content (``qemu-img compare``), the VM's config read back through the API."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import uuid

import pytest

from include import diskio, phases
from include.demo import create_source_vm, ensure_world_pools, write_store
from include.errors import TargetCreationError
from include.store import FileStatusSink, SpecStore
from tests.e2e import pve_world as pw
from tests.e2e import vsphere_world as vw
from tests.e2e.helpers import run_migration, task_states
from tests.servers.webdav import start_webdav_server

pytestmark = pytest.mark.e2e


@pytest.fixture
def proxmox(pve, monkeypatch):
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    return pve


def _status(store, name: str) -> dict:
    return FileStatusSink(SpecStore(store)).get("default", name)


def _migrated_disks(pve, name: str) -> dict[str, str]:
    """disk name -> volid of the migrated VM, from its config (read through the API)."""
    api = pve.proxmox()
    vm = next(r for r in api.cluster.resources.get(type="vm") if r.get("name") == name)
    config = api.nodes(vm["node"]).qemu(vm["vmid"]).config.get()
    return config, {k: v.split(",")[0] for k, v in config.items() if k[:4] in ("scsi", "virt", "sata")
                    and k[-1].isdigit() and k != "scsihw"}


def test_scenario3_proxmox_to_libvirt_through_http(airflow_db, store, world, proxmox, tmp_path):
    """The guide's Scenario 3 (names as in its YAML; the HTTP storage on the project's WebDAV server, the target
    pool the test's own instead of ``default``)."""
    raws = pw.create_vm(proxmox, 100, "database-server", tmp_path)
    ensure_world_pools(world.conn(), world)
    webdav = start_webdav_server(tmp_path / "webdav", token="s3cr3t-fileserver")
    try:
        docs = [
            {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
             "metadata": {"name": "proxmox-to-kvm", "namespace": "default"},
             "spec": {"sourceName": "database-server", "sourceNamespace": "proxmox-vms",
                      "targetProviderRef": {"name": "kvm-host1", "namespace": "default"},
                      "targetName": "database-server-kvm", "targetStorageHint": world.target_pool,
                      "storage": {"type": "http", "endpoint": webdav.url.rstrip("/"),
                                  "credentialsSecretRef": {"name": "fileserver-token"}},
                      "cleanupPolicy": {"deleteIntermediate": True, "deleteSnapshot": True, "deleteSource": False},
                      "retryPolicy": {"maxAttempts": 2, "backoffDuration": "1s"}}},
            vw.vm_doc("database-server", "proxmox-vms", "pve-cluster", "database-server"),
            *pw.provider_docs(proxmox, "pve-cluster", "proxmox-vms"),
            {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "ReferenceGrant",
             "metadata": {"name": "from-default", "namespace": "proxmox-vms"},
             "spec": {"from": [{"group": "infra.virtrigaud.io", "kind": "VMMigration", "namespace": "default"}],
                      "to": [{"group": "infra.virtrigaud.io", "kind": "VirtualMachine"},
                             {"group": "infra.virtrigaud.io", "kind": "Provider", "name": "pve-cluster"}]}},
            *vw.libvirt_provider_docs(world, "kvm-host1", "default"),
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fileserver-token", "namespace": "default"},
             "stringData": {"token": "s3cr3t-fileserver"}},
        ]
        write_store(store, "proxmox-to-kvm.yaml", docs)
        dagrun = run_migration("vmmigration__default__proxmox-to-kvm")
        assert str(dagrun.state) == "success", task_states(dagrun)
    finally:
        webdav.stop()
    status = _status(store, "proxmox-to-kvm")
    assert status["phase"] == "Ready"
    assert [d["name"] for d in status["disks"]] == ["sda", "sdb"]
    conn = world.conn()
    try:
        pool = conn.storagePoolLookupByName(world.target_pool)
        pool.refresh(0)
        for disk, key in (("sda", "scsi0"), ("sdb", "scsi1")):
            dst = pool.storageVolLookupByName(f"database-server-kvm-{disk}.qcow2").path()
            assert diskio.compare(raws[key], dst, "raw", "qcow2"), f"{disk} differs from its source"
    finally:
        # the guide's target name carries no world prefix: the world's teardown would not find the domain
        if "database-server-kvm" in conn.listDefinedDomains():
            conn.lookupByName("database-server-kvm").undefine()
        conn.close()
    snaps = proxmox.proxmox().nodes("pve1").qemu(100).snapshot.get()
    assert [s["name"] for s in snaps] == ["current"], "no snapshot is left on the source (none is taken: it stays off)"


def kvm_to_pve_docs(world, pve, name: str, *, storage_hint: str = "local-lvm", bridge: str = "vmbr0",
                    token_secret: str | None = None, node: str | None = None) -> list[dict]:
    from include.demo import store_documents

    docs = store_documents(world, name=name, target_format=None, bridge=bridge, cpu=2, memory=1024)
    docs[0]["spec"]["targetProviderRef"] = {"name": "pve"}
    docs[0]["spec"]["targetStorageHint"] = storage_hint
    docs[0]["spec"]["targetNetworkHints"] = [{"name": "eth0", "bridge": bridge}]
    return [d for d in docs if not (d["kind"] == "Provider" and d["metadata"]["name"].endswith("kvm-target"))] \
        + pw.provider_docs(pve, "pve", token_secret=token_secret, node=node)


def test_libvirt_to_proxmox_through_nfs(airflow_db, store, world, proxmox):
    log = proxmox.request_log
    seen = len(log.read_text().splitlines()) if log.exists() else 0  # the log may be the session's
    create_source_vm(world)
    write_store(store, "k2p.yaml", kvm_to_pve_docs(world, proxmox, "k2p"))
    dagrun = run_migration("vmmigration__default__k2p")
    assert str(dagrun.state) == "success", task_states(dagrun)
    assert _status(store, "k2p")["phase"] == "Ready"
    config, disks = _migrated_disks(proxmox, f"{world.vm_name}-migrated")
    assert (config["cores"], int(config["memory"])) == (2, 1024)
    assert config["net0"].split(",")[0].split("=")[0] == "virtio" and "bridge=vmbr0" in config["net0"]
    assert config["net0"].startswith("virtio=BC:24:11:"), "the node gave the NIC a MAC of its own"
    assert sorted(disks) == ["virtio0", "virtio1"]  # virtio disks stay virtio-blk
    for key, disk in (("virtio0", "vda"), ("virtio1", "vdb")):
        src = world.root / "pools" / "src" / f"{world.vm_name}-{disk}.qcow2"
        assert disks[key].startswith("local-lvm:vm-")
        assert diskio.compare(src, proxmox.volume_path(disks[key]), "qcow2", "raw"), f"{disk} differs"
    leftovers = [c["volid"] for c in proxmox.proxmox().nodes("pve1").storage("local").content.get(content="import")]
    assert leftovers == [], "the import volumes are removed once the VM holds the disks"
    uploads = [r for r in map(json.loads, log.read_text().splitlines()[seen:]) if r["path"].endswith("/upload")]
    assert len(uploads) == 2 and all(r["params"].get("checksum-algorithm") == "sha256"
                                     and len(r["params"].get("checksum", "")) == 64 for r in uploads), uploads


def test_scenario2_vsphere_to_proxmox_through_nfs(airflow_db, store, world, proxmox, vcsim, tmp_path):
    """The guide's Scenario 2 (its names; NFS on the test's share): a vSphere VM with two disks to local-lvm."""
    vm = f"windows-server-{uuid.uuid4().hex[:4]}"
    raws = vw.create_vm(vcsim, vm, [("a", 32), ("b", 16)], work=tmp_path)
    docs = [
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
         "metadata": {"name": "vsphere-to-proxmox", "namespace": "default"},
         "spec": {"sourceName": "windows-server", "sourceNamespace": "vmware-vms",
                  "targetProviderRef": {"name": "proxmox-cluster", "namespace": "default"},
                  "targetName": "windows-server-pve", "targetStorageHint": "local-lvm",
                  "storage": {"type": "nfs", "path": str(world.share), "endpoint": "nfs.local"},
                  "cleanupPolicy": {"deleteIntermediate": True, "deleteSnapshot": True, "deleteSource": False}}},
        vw.vm_doc("windows-server", "vmware-vms", "vcenter", vm),
        *vw.provider_docs(vcsim, "vcenter", "vmware-vms"),
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "ReferenceGrant",
         "metadata": {"name": "from-default", "namespace": "vmware-vms"},
         "spec": {"from": [{"group": "infra.virtrigaud.io", "kind": "VMMigration", "namespace": "default"}],
                  "to": [{"group": "infra.virtrigaud.io", "kind": "VirtualMachine"},
                         {"group": "infra.virtrigaud.io", "kind": "Provider", "name": "vcenter"}]}},
        *pw.provider_docs(proxmox, "proxmox-cluster"),
    ]
    world.share.mkdir(parents=True, exist_ok=True)
    write_store(store, "vsphere-to-proxmox.yaml", docs)
    dagrun = run_migration("vmmigration__default__vsphere-to-proxmox")
    assert str(dagrun.state) == "success", task_states(dagrun)
    config, disks = _migrated_disks(proxmox, "windows-server-pve")
    assert sorted(disks) == ["scsi0", "scsi1"]  # from paravirtual SCSI and LSI Logic: scsi (virtio-scsi)
    for key, label in (("scsi0", "a"), ("scsi1", "b")):
        assert diskio.compare(raws[label], proxmox.volume_path(disks[key]), "raw", "raw"), f"{key} differs"


def test_proxmox_to_vsphere_through_nfs(airflow_db, store, world, proxmox, vcsim, tmp_path):
    raws = pw.create_vm(proxmox, 101, "pve-src", tmp_path)
    target = f"from-pve-{uuid.uuid4().hex[:6]}"
    docs = [
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
         "metadata": {"name": "p2v", "namespace": "default"},
         "spec": {"sourceName": "pve-src", "targetProviderRef": {"name": "vc"}, "targetName": target,
                  "targetStorageHint": "datastore1",
                  "storage": {"type": "nfs", "path": str(world.share), "endpoint": "nfs.local"}}},
        vw.vm_doc("pve-src", "default", "pve", "pve-src"),
        *pw.provider_docs(proxmox, "pve"),
        *vw.provider_docs(vcsim, "vc"),
    ]
    world.share.mkdir(parents=True, exist_ok=True)
    write_store(store, "p2v.yaml", docs)
    dagrun = run_migration("vmmigration__default__p2v")
    assert str(dagrun.state) == "success", task_states(dagrun)
    for disk, key in (("sda", "scsi0"), ("sdb", "scsi1")):
        got = vw.download(vcsim, "datastore1", f"{target}/{target}-{disk}.vmdk", tmp_path / f"{disk}.vmdk")
        assert diskio.compare(raws[key], got, "raw", "vmdk"), f"{disk} differs from its source"


# -- bad input and PVE faults ------------------------------------------------------------------------------------

def _validating_condition(store, name: str) -> dict:
    status = _status(store, name)
    assert (status["phase"], status.get("failedPhase")) == ("Failed", "Validating"), status
    return next(c for c in status["conditions"] if c["type"] == "Validated")


@pytest.mark.parametrize(("kwargs", "field", "named"), [
    ({"storage_hint": "no-such-storage"}, "spec.targetStorageHint", "no-such-storage"),
    ({"bridge": "vmbr9"}, "spec.targetNetworkHints[0].bridge", "vmbr9"),
    ({"node": "pve9"}, "spec.defaults.cluster", "pve9"),
])
def test_unknown_storage_bridge_or_node_fails_in_validating(airflow_db, store, world, proxmox, kwargs, field, named):
    create_source_vm(world)
    write_store(store, "k2p.yaml", kvm_to_pve_docs(world, proxmox, "k2p", **kwargs))
    dagrun = run_migration("vmmigration__default__k2p")
    assert str(dagrun.state) == "failed"
    cond = _validating_condition(store, "k2p")
    assert field in cond["message"] and named in cond["message"], cond
    assert proxmox.proxmox().cluster.resources.get(type="vm") == [], "nothing created"


def test_unknown_source_vm_and_wrong_token_fail_in_validating_without_retries(airflow_db, store, world, proxmox,
                                                                             tmp_path):
    ensure_world_pools(world.conn(), world)
    docs = [
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
         "metadata": {"name": "p2k", "namespace": "default"},
         "spec": {"sourceName": "no-such-vm", "targetProviderRef": {"name": "kvm"}, "targetName": "x-kvm",
                  "targetStorageHint": world.target_pool,
                  "storage": {"type": "nfs", "path": str(world.share), "endpoint": "nfs.local"},
                  "retryPolicy": {"maxAttempts": 3, "backoffDuration": "1s"}}},
        vw.vm_doc("no-such-vm", "default", "pve", "no-such-vm"),
        *pw.provider_docs(proxmox, "pve"),
        *vw.libvirt_provider_docs(world, "kvm", "default"),
    ]
    world.share.mkdir(parents=True, exist_ok=True)
    write_store(store, "p2k.yaml", docs)
    dagrun = run_migration("vmmigration__default__p2k")
    assert str(dagrun.state) == "failed"
    cond = _validating_condition(store, "p2k")
    assert "spec.sourceName" in cond["message"] and "no-such-vm" in cond["message"]
    pw.create_vm(proxmox, 102, "auth-src", tmp_path)
    docs[0]["spec"]["sourceName"] = "auth-src"
    docs[1] = vw.vm_doc("auth-src", "default", "pve", "auth-src")
    docs[2:4] = pw.provider_docs(proxmox, "pve", token_secret=str(uuid.uuid4()))
    write_store(store, "p2k.yaml", docs)
    dagrun = run_migration("vmmigration__default__p2k")
    assert str(dagrun.state) == "failed"
    validate = next(ti for ti in dagrun.get_task_instances() if ti.task_id == "validate_migration")
    assert validate.try_number == 1, "a refused token is not retried"
    cond = _validating_condition(store, "p2k")
    assert cond["reason"] == "HypervisorAuthenticationFailed", cond


def test_a_failed_pve_task_ends_creating_with_its_log_and_rolls_back(store, world, proxmox):
    """The import volume removed from the node after Importing: the create task fails ("volume ... does not
    exist"), Creating ends with the task's log lines, and rollback removes the other import volume and any VM."""
    create_source_vm(world)
    write_store(store, "k2p.yaml", kvm_to_pve_docs(world, proxmox, "k2p"))
    ctx = phases.MigrationContext("default", "k2p", store=SpecStore(store))
    phases.validate(ctx)
    phases.snapshot(ctx)
    for disk in ("vda", "vdb"):
        for step in (phases.export_disk, phases.transfer_disk, phases.convert_disk, phases.import_disk):
            step(ctx, disk)
    imports = proxmox.storage_path("local") / "import"
    names = sorted(p.name for p in imports.iterdir())
    assert len(names) == 2
    (imports / names[1]).unlink()  # gone behind the engine's back
    with pytest.raises(TargetCreationError, match="does not exist") as err:
        phases.create_vm(phases.MigrationContext("default", "k2p", store=SpecStore(store)))
    assert "task log" in str(err.value)
    result = phases.finalize(phases.MigrationContext("default", "k2p", store=SpecStore(store)), succeeded=False)
    assert not (imports / names[0]).exists(), result
    assert proxmox.proxmox().cluster.resources.get(type="vm") == []


def test_an_overlay_disk_is_refused_in_validating(airflow_db, store, world, proxmox, tmp_path):
    """A linked clone's disk (a qcow2 overlay on its template's base image) is not the whole disk: refused in
    Validating, naming the disk and what it is an overlay on, and nothing is created."""
    pw.create_vm(proxmox, 103, "clone-src", tmp_path)
    disk = proxmox.volume_path(proxmox.vm_config(103)["scsi0"].split(",")[0])
    base = disk.with_name("base-103-disk-0.qcow2")
    disk.rename(base)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(disk)], check=True)
    ensure_world_pools(world.conn(), world)
    world.share.mkdir(parents=True, exist_ok=True)
    docs = [
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
         "metadata": {"name": "p2k", "namespace": "default"},
         "spec": {"sourceName": "clone-src", "targetProviderRef": {"name": "kvm"}, "targetName": "clone-kvm",
                  "targetStorageHint": world.target_pool,
                  "storage": {"type": "nfs", "path": str(world.share), "endpoint": "nfs.local"}}},
        vw.vm_doc("clone-src", "default", "pve", "clone-src"),
        *pw.provider_docs(proxmox, "pve"),
        *vw.libvirt_provider_docs(world, "kvm", "default"),
    ]
    write_store(store, "p2k.yaml", docs)
    dagrun = run_migration("vmmigration__default__p2k")
    assert str(dagrun.state) == "failed"
    cond = _validating_condition(store, "p2k")
    assert "spec.sourceName" in cond["message"] and "overlay on base-103-disk-0.qcow2" in cond["message"], cond
    assert cond["reason"] == "UnsupportedDiskFormat"


def _p2k_docs(world, vm: str, target: str) -> list[dict]:
    return [
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
         "metadata": {"name": "p2k", "namespace": "default"},
         "spec": {"sourceName": vm, "targetProviderRef": {"name": "kvm"}, "targetName": target,
                  "targetStorageHint": world.target_pool,
                  "storage": {"type": "nfs", "path": str(world.share), "endpoint": "nfs.local"}}},
        vw.vm_doc(vm, "default", "pve", vm),
        *vw.libvirt_provider_docs(world, "kvm", "default"),
    ]


def test_a_running_vm_is_exported_as_it_was_at_a_snapshot_taken_while_it_runs(airflow_db, store, world, proxmox,
                                                                            tmp_path):
    """A running VM with a qcow2 disk on a directory storage (made as PVE makes them, with
    preallocation=metadata) and a raw one on LVM-thin, whose guest goes on writing to both right after the
    snapshot: the migrated disks hold what they held at the snapshot (the qcow2 read at its internal snapshot
    through its own tables, the LVM-thin volume through its snapshot volume), not what the volumes hold now; the
    snapshot is removed and the VM runs on."""
    raws, disks = {}, []
    for index, (key, storage, fmt, size) in enumerate((("scsi0", "local-lvm", "raw", 40),
                                                       ("virtio0", "local", "qcow2", 24))):
        raw = tmp_path / f"live-{key}.raw"
        vw.pattern_disk(raw, size, seed=index + 51)
        raws[key] = raw
        disks.append((key, storage, fmt, size * pw.MiB, raw))
    proxmox.add_vm("pve1", 104, "live-src", disks=disks, running=True, agent="1")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "preallocation=metadata",
                    str(raws["virtio0"]), str(proxmox.disk_files(104)["virtio0"])], check=True)
    proxmox.guest_writes(104)
    ensure_world_pools(world.conn(), world)
    world.share.mkdir(parents=True, exist_ok=True)
    target = f"{world.vm_name}-from-live"
    write_store(store, "p2k.yaml", [*_p2k_docs(world, "live-src", target), *pw.provider_docs(proxmox, "pve")])
    dagrun = run_migration("vmmigration__default__p2k")
    assert str(dagrun.state) == "success", task_states(dagrun)
    status = _status(store, "p2k")
    assert status["phase"] == "Ready" and status["pointInTime"]["consistency"] == "crash-consistent", status
    assert "guest agent is enabled" in status["pointInTime"]["detail"]
    files = proxmox.disk_files(104)
    conn = world.conn()
    try:
        pool = conn.storagePoolLookupByName(world.target_pool)
        pool.refresh(0)
        for disk, key in (("sda", "scsi0"), ("vda", "virtio0")):
            dst = pool.storageVolLookupByName(f"{target}-{disk}.qcow2").path()
            assert diskio.compare(raws[key], dst, "raw", "qcow2"), f"{disk} is not the disk at the snapshot"
            fmt = "raw" if key == "scsi0" else "qcow2"
            assert not diskio.compare(raws[key], files[key], "raw", fmt), f"the guest wrote to {key} after it"
    finally:
        if target in conn.listDefinedDomains():
            conn.lookupByName(target).undefine()
        conn.close()
    api = proxmox.proxmox()
    assert [s["name"] for s in api.nodes("pve1").qemu(104).snapshot.get()] == ["current"], "the snapshot is removed"
    assert api.nodes("pve1").qemu(104).status.current.get()["status"] == "running"


def test_a_running_vm_with_a_disk_pve_cannot_snapshot_is_refused_in_validating(airflow_db, store, world, proxmox):
    """Raw on a directory storage (PVE cannot snapshot it): refused before anything is made."""
    storage, shown = "local", "raw on dir storage local"
    proxmox.add_vm("pve1", 105, "raw-live", disks=[("scsi0", storage, "raw", 8 << 20)], running=True)
    ensure_world_pools(world.conn(), world)
    world.share.mkdir(parents=True, exist_ok=True)
    write_store(store, "p2k.yaml", [*_p2k_docs(world, "raw-live", "raw-live-kvm"), *pw.provider_docs(proxmox, "pve")])
    dagrun = run_migration("vmmigration__default__p2k")
    assert str(dagrun.state) == "failed"
    cond = _validating_condition(store, "p2k")
    assert "spec.sourceName" in cond["message"] and "is running" in cond["message"], cond
    assert f"sda ({storage}:" in cond["message"] and shown in cond["message"], cond
    assert [s["name"] for s in proxmox.proxmox().nodes("pve1").qemu(105).snapshot.get()] == ["current"]


def test_libvirt_to_proxmox_8_3_imports_each_disk_with_qm_importdisk_over_ssh(airflow_db, store, world, proxmox):
    """A node on PVE 8.3 has no ``import`` content (uploading a disk image came with 8.4): each disk is copied
    over SFTP into a 0700 folder of the run's under /var/tmp on the node, the VM created without disks, each file
    imported with ``qm importdisk`` and attached where planned; the files and the folder go afterwards."""
    proxmox.set_version("8.3.5")
    before = set(glob.glob("/var/tmp/vmmigration-*"))
    log = proxmox.request_log
    seen = len(log.read_text().splitlines()) if log.exists() else 0  # the log may be the session's
    create_source_vm(world)
    write_store(store, "k2p.yaml", kvm_to_pve_docs(world, proxmox, "k2p"))
    dagrun = run_migration("vmmigration__default__k2p")
    assert str(dagrun.state) == "success", task_states(dagrun)
    config, disks = _migrated_disks(proxmox, f"{world.vm_name}-migrated")
    assert sorted(disks) == ["virtio0", "virtio1"] and not [k for k in config if k.startswith("unused")], config
    assert config["boot"] == "order=virtio0"
    for key, disk in (("virtio0", "vda"), ("virtio1", "vdb")):
        src = world.root / "pools" / "src" / f"{world.vm_name}-{disk}.qcow2"
        assert disks[key].startswith("local-lvm:vm-")
        assert diskio.compare(src, proxmox.volume_path(disks[key]), "qcow2", "raw"), f"{disk} differs"
    assert set(glob.glob("/var/tmp/vmmigration-*")) == before, "the node folder and its files are removed"
    plan = SpecStore(store).load_plan("default", "k2p")
    assert (plan["target"]["options"]["diskImport"], plan["target"]["options"]["node"]) == ("ssh", "pve1"), \
        "the way disks travel and the node are pinned at Validating"
    requests = [json.loads(line) for line in log.read_text().splitlines()[seen:]]
    assert [r for r in requests if r["path"].endswith("/version")], "the node's version was asked"
    assert not [r for r in requests if r["path"].endswith("/upload")], "nothing is uploaded to an 8.3 node"


def test_a_bad_disk_import_annotation_fails_validating_naming_it(airflow_db, store, world, proxmox):
    create_source_vm(world)
    docs = kvm_to_pve_docs(world, proxmox, "k2p")
    pve_provider = next(d for d in docs if d["kind"] == "Provider" and d["metadata"]["name"] == "pve")
    pve_provider["metadata"]["annotations"] = {"vmmigration.virtrigaud.io/proxmox-disk-import": "ftp"}
    write_store(store, "k2p.yaml", docs)
    dagrun = run_migration("vmmigration__default__k2p")
    assert str(dagrun.state) == "failed"
    cond = _validating_condition(store, "k2p")
    assert "proxmox-disk-import='ftp'" in cond["message"] and "auto, upload, ssh" in cond["message"], cond


def test_a_failed_qm_importdisk_rolls_back_the_vm_and_the_node_files(store, world, proxmox):
    """The SSH path's failure, made for real: one copied file removed from the node before Creating, so ``qm
    importdisk`` fails on it; Creating ends with its message, and rollback destroys the VM this run created and
    removes the other file and the run's folder on the node."""
    proxmox.set_version("8.3.5")
    before = set(glob.glob("/var/tmp/vmmigration-*"))
    create_source_vm(world)
    write_store(store, "k2p.yaml", kvm_to_pve_docs(world, proxmox, "k2p"))
    ctx = phases.MigrationContext("default", "k2p", store=SpecStore(store))
    phases.validate(ctx)
    phases.snapshot(ctx)
    for disk in ("vda", "vdb"):
        for step in (phases.export_disk, phases.transfer_disk, phases.convert_disk, phases.import_disk):
            step(ctx, disk)
    (folder,) = set(glob.glob("/var/tmp/vmmigration-*")) - before
    files = sorted(os.listdir(folder))
    assert len(files) == 2 and oct(os.stat(folder).st_mode & 0o777) == "0o700"
    os.unlink(os.path.join(folder, files[1]))  # gone behind the engine's back
    with pytest.raises(Exception, match="does not exist"):
        phases.create_vm(phases.MigrationContext("default", "k2p", store=SpecStore(store)))
    assert len(proxmox.proxmox().cluster.resources.get(type="vm")) == 1, "the VM was created before the import"
    phases.finalize(phases.MigrationContext("default", "k2p", store=SpecStore(store)), succeeded=False)
    assert not os.path.exists(folder), "the run's folder and the file left in it are removed"
    assert proxmox.proxmox().cluster.resources.get(type="vm") == []


def test_cdrom_cloudinit_efi_and_tpm_are_named_in_the_plan_as_not_migrated(store, world, proxmox, tmp_path):
    from include.plan import describe

    pw.create_vm(proxmox, 106, "uefi-src", tmp_path)
    with proxmox.store.transaction() as state:
        state["vms"]["106"]["config"].update({
            "ide2": "local:iso/debian-12.iso,media=cdrom", "ide0": "local-lvm:vm-106-cloudinit,media=cdrom",
            "efidisk0": "local-lvm:vm-106-disk-2,efitype=4m,size=4M", "tpmstate0": "local-lvm:vm-106-disk-3,size=4M"})
    ensure_world_pools(world.conn(), world)
    world.share.mkdir(parents=True, exist_ok=True)
    write_store(store, "p2k.yaml", [*_p2k_docs(world, "uefi-src", "uefi-kvm"), *pw.provider_docs(proxmox, "pve")])
    ctx = phases.MigrationContext("default", "p2k", store=SpecStore(store))
    phases.validate(ctx)
    plan = ctx.load_plan(required=True)
    assert [d.name for d in plan.disks] == ["sda", "sdb"]
    text = describe(plan)
    for key, why in (("ide2", "CD-ROM"), ("ide0", "cloud-init"), ("efidisk0", "UEFI variables"),
                     ("tpmstate0", "TPM state")):
        assert any(key in s and why in s for s in plan.source.skipped), (key, plan.source.skipped)
        assert f"not migrated: {key} (" in text
    cond = next(c for c in _status(store, "p2k")["conditions"] if c["type"] == "Validated")
    assert "not migrated: " in cond["message"] and "efidisk0" in cond["message"], cond
    phases.finalize(phases.MigrationContext("default", "p2k", store=SpecStore(store)), succeeded=False)


def test_libvirt_to_proxmox_grows_the_first_disk_to_the_resource_hint(airflow_db, store, world, proxmox):
    """targetResourceHints.disk (GiB) grows the first disk after Creating (PVE's resize, a task); the data stays."""
    create_source_vm(world)
    docs = kvm_to_pve_docs(world, proxmox, "k2p")
    docs[0]["spec"].setdefault("targetResourceHints", {})["disk"] = 1
    write_store(store, "k2p.yaml", docs)
    dagrun = run_migration("vmmigration__default__k2p")
    assert str(dagrun.state) == "success", task_states(dagrun)
    config, disks = _migrated_disks(proxmox, f"{world.vm_name}-migrated")
    grown = proxmox.volume_path(disks["virtio0"])
    assert grown.stat().st_size == 2 ** 30 and "size=1G" in config["virtio0"], config["virtio0"]
    src = world.root / "pools" / "src" / f"{world.vm_name}-vda.qcow2"
    raw = subprocess.run(["qemu-img", "info", "--output=json", str(src)], capture_output=True, text=True, check=True)
    size = json.loads(raw.stdout)["virtual-size"]
    with open(grown, "rb") as fh:
        head = fh.read(size)
    converted = world.root / "vda.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(src), str(converted)], check=True)
    assert head == converted.read_bytes(), "the data before the growth is the source's"


def test_a_vmid_another_client_takes_first_is_never_touched_and_the_next_one_is_claimed(airflow_db, store, world,
                                                                                        proxmox):
    """/cluster/nextid only proposes: twice another client takes the VMID it gave before our create (the test
    server plays that client, as two migrations asking at one instant would); the create is refused for each
    ("already exists"), the next free VMID is claimed, and the other VMs stay as they are."""
    proxmox.race_nextid(2)
    create_source_vm(world)
    write_store(store, "k2p.yaml", kvm_to_pve_docs(world, proxmox, "k2p"))
    dagrun = run_migration("vmmigration__default__k2p")
    assert str(dagrun.state) == "success", task_states(dagrun)
    vms = {r["vmid"]: r["name"] for r in proxmox.proxmox().cluster.resources.get(type="vm")}
    assert vms == {100: "someone-else-100", 101: "someone-else-101", 102: f"{world.vm_name}-migrated"}, vms
    create = next(ti for ti in dagrun.get_task_instances() if ti.task_id == "create_vm")
    assert create.try_number == 1, "taken VMIDs are passed over within one try"
