"""vSphere as target and source, against govmomi's vCenter simulator over TLS (tests/servers/vsphere.py):
the guide's Scenario 1 (Libvirt -> vSphere through S3) from its YAML, vSphere -> Libvirt through NFS,
and the bad inputs and vCenter faults, each produced for real.

How each path is verified: the simulator keeps datastore files as real files and serves a snapshot's
NFC export from them, so uploads (target) and exports (source) are checked by content; the VM's
configuration is read back through the API."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from include import diskio, phases
from include.demo import create_source_vm, write_store
from include.errors import HypervisorAuthError, NotFound, TargetCreationError
from include.store import FileStatusSink, SpecStore
from tests.e2e import vsphere_world as vw
from tests.e2e.helpers import ROOT, run_migration, task_states

pytestmark = pytest.mark.e2e

S3_BUCKET = "migrations"  # the guide's Scenario 1 bucket


@pytest.fixture
def vsphere(vcsim, monkeypatch):
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    return vcsim


def scenario1_docs(world, vcsim, s3, *, target_name: str, storage_hint: str = "datastore1",
                   network: str = "VM Network") -> list[dict]:
    """The guide's Scenario 1 from examples/migration/libvirt-to-vsphere.yaml: the source VirtualMachine in
    ``kvm-vms`` (granted to migrations from ``default``), the Provider ``vcenter-prod`` on the simulator, and
    the S3 storage on the project's S3 test server."""
    migration = yaml.safe_load((ROOT / "examples" / "migration" / "libvirt-to-vsphere.yaml").read_text())
    spec = migration["spec"]
    assert (spec["sourceName"], spec["sourceNamespace"], spec["targetStorageHint"]) == \
        ("ubuntu-server", "kvm-vms", "datastore1")
    spec["targetName"] = target_name
    spec["targetStorageHint"] = storage_hint
    spec["targetNetworkHints"] = [{"name": "eth0", "network": network}]
    spec["targetResourceHints"] = {"cpu": 2, "memory": 1024}
    spec["storage"]["endpoint"] = s3.endpoint  # the guide's S3 is AWS; ours is on loopback
    spec["retryPolicy"] = {"maxAttempts": 2, "backoffDuration": "1s", "maxBackoffDuration": "2s"}
    return [
        migration,
        vw.vm_doc("ubuntu-server", "kvm-vms", "kvm-host", world.vm_name),
        *vw.libvirt_provider_docs(world, "kvm-host", "kvm-vms"),
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "ReferenceGrant",
         "metadata": {"name": "migrations-from-default", "namespace": "kvm-vms"},
         "spec": {"from": [{"group": "infra.virtrigaud.io", "kind": "VMMigration", "namespace": "default"}],
                  "to": [{"group": "infra.virtrigaud.io", "kind": "VirtualMachine"},
                         {"group": "infra.virtrigaud.io", "kind": "Provider", "name": "kvm-host"}]}},
        *vw.provider_docs(vcsim, "vcenter-prod"),
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": "default"},
         "stringData": {"accessKey": s3.access_key, "secretKey": s3.secret_key}},
    ]


def test_scenario1_libvirt_to_vsphere_through_s3(airflow_db, store, world, s3, vsphere, tmp_path):
    from pyVmomi import vim

    create_source_vm(world)
    target = f"ubuntu-server-vcenter-{uuid.uuid4().hex[:6]}"
    write_store(store, "kvm-to-vsphere.yaml", scenario1_docs(world, vsphere, s3, target_name=target))
    dagrun = run_migration("vmmigration__default__kvm-to-vsphere")
    assert str(dagrun.state) == "success", task_states(dagrun)
    status = FileStatusSink(SpecStore(store)).get("default", "kvm-to-vsphere")
    assert status["phase"] == "Ready" and status["progress"] == 100
    # the datastore files, fetched through the vSphere file API, hold the source disks' content
    for disk in ("vda", "vdb"):
        got = vw.download(vsphere, "datastore1", f"{target}/{target}-{disk}.vmdk", tmp_path / f"{disk}.vmdk")
        src = world.root / "pools" / "src" / f"{world.vm_name}-{disk}.qcow2"
        assert diskio.compare(src, got, "qcow2", "vmdk"), f"{disk} differs from its source"
    # the VM as the API shows it: the hints' CPUs and memory, NIC on the port group, both disks
    si, vm = vw.find_vm(vsphere, target)
    try:
        assert vm is not None
        hw = vm.config.hardware
        assert (hw.numCPU, hw.memoryMB) == (2, 1024)
        nics = [d for d in hw.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        assert [(type(n).__name__.rsplit(".", 1)[-1], n.backing.deviceName) for n in nics] == \
            [("VirtualVmxnet3", "VM Network")]
        disks = [d for d in hw.device if isinstance(d, vim.vm.device.VirtualDisk)]
        assert sorted(d.backing.fileName for d in disks) == \
            [f"[datastore1] {target}/{target}-vda.vmdk", f"[datastore1] {target}/{target}-vdb.vmdk"]
        controllers = {d.key: d for d in hw.device if isinstance(d, vim.vm.device.ParaVirtualSCSIController)}
        assert all(d.controllerKey in controllers for d in disks), "virtio disks land on paravirtual SCSI"
        owner = {o.key: o.value for o in vm.config.extraConfig}["vmmigration.owner"]
        assert owner.startswith("default/kvm-to-vsphere ")
    finally:
        vsphere.disconnect(si)
    # deleteIntermediate emptied the bucket; the source VM is kept (deleteSource: false)
    assert s3.client().list_objects_v2(Bucket=S3_BUCKET).get("KeyCount", 0) == 0
    assert world.conn().lookupByName(world.vm_name) is not None
    # create_vm links to the VM on the vSphere Client; snapshot_vm's source is libvirt, which has no web UI
    host = vsphere.url.split("//", 1)[1].split("/", 1)[0]
    assert _link(dagrun, "create_vm", "TargetVMLink") == f"https://{host}/ui/app/search?query={target}"
    assert _link(dagrun, "snapshot_vm", "SourceVMLink") in (None, "")


def _link(dagrun, task_id: str, link: str):
    """The URL Airflow kept for a task's extra link (computed on the worker at the end of the task)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter_by(dag_id=dagrun.dag_id, run_id=dagrun.run_id, task_id=task_id,
                                                 key=f"_link_{link}").one_or_none()
        return XComModel.deserialize_value(row) if row is not None else None


def vsphere_source_docs(world, vcsim, name: str, vm: str, *, storage: dict, target_format: str = "qcow2",
                        password: str | None = None) -> list[dict]:
    return [
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
         "metadata": {"name": name, "namespace": "default"},
         "spec": {"sourceName": vm, "targetProviderRef": {"name": "kvm-target"}, "targetName": f"{vm}-kvm",
                  "targetStorageHint": world.target_pool, "targetDiskFormat": target_format,
                  "targetNetworkHints": [{"name": "eth0", "bridge": "virbr0"}],
                  "storage": storage,
                  "cleanupPolicy": {"deleteIntermediate": True, "deleteSnapshot": True, "deleteSource": False},
                  "retryPolicy": {"maxAttempts": 3, "backoffDuration": "1s", "maxBackoffDuration": "2s"}}},
        vw.vm_doc(vm, "default", "vcenter-src", vm),
        *vw.provider_docs(vcsim, "vcenter-src", password=password),
        *vw.libvirt_provider_docs(world, "kvm-target", "default"),
    ]


def test_vsphere_to_libvirt_through_nfs(airflow_db, store, world, vsphere, tmp_path):
    from include.demo import ensure_world_pools

    conn = world.conn()
    ensure_world_pools(conn, world)
    vm = f"{world.prefix}-vsrc"
    raws = vw.create_vm(vsphere, vm, [("a", 48), ("b", 24)], work=tmp_path)
    si, obj = vw.find_vm(vsphere, vm)
    instance_uuid = obj.config.instanceUuid
    vsphere.disconnect(si)
    storage = {"type": "nfs", "path": str(world.share), "endpoint": "nfs.local"}
    docs = vsphere_source_docs(world, vsphere, "v2k", vm, storage=storage)
    docs[1]["status"]["id"] = instance_uuid  # the VirtualMachine names the VM by its instance UUID
    write_store(store, "v2k.yaml", docs)
    dagrun = run_migration("vmmigration__default__v2k")
    assert str(dagrun.state) == "success", task_states(dagrun)
    status = FileStatusSink(SpecStore(store)).get("default", "v2k")
    assert status["phase"] == "Ready"
    assert [d["name"] for d in status["disks"]] == ["sda", "sdb"]
    pool = conn.storagePoolLookupByName(world.target_pool)
    pool.refresh(0)
    for disk, label in (("sda", "a"), ("sdb", "b")):
        dst = pool.storageVolLookupByName(f"{vm}-kvm-{disk}.qcow2").path()
        assert diskio.compare(raws[label], dst, "raw", "qcow2"), f"{disk} differs from its source"
    dom = conn.lookupByName(f"{vm}-kvm")
    assert "<target dev='sda' bus='scsi'/>" in dom.XMLDesc(0)  # pvscsi and LSI Logic disks land on scsi
    # deleteSnapshot: the snapshot the run took is gone again
    si, src = vw.find_vm(vsphere, vm)
    try:
        assert src is not None and not getattr(src, "snapshot", None)
    finally:
        vsphere.disconnect(si)
    conn.close()


# -- bad input: Failed in Validating, the name in the condition, nothing created --------------------------

def _validating_failure(store: Path, name: str) -> dict:
    """The Validated condition of a migration that failed in Validating (False, with the reason and message)."""
    status = FileStatusSink(SpecStore(store)).get("default", name)
    assert (status["phase"], status.get("failedPhase")) == ("Failed", "Validating"), status
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert validated["status"] == "False"
    return validated


@pytest.mark.parametrize(("what", "kwargs", "field", "named"), [
    ("datastore", {"storage_hint": "no-such-datastore"}, "spec.targetStorageHint", "no-such-datastore"),
    ("port group", {"network": "No Such Network"}, "spec.targetNetworkHints[0].network", "No Such Network"),
])
def test_unknown_datastore_or_port_group_fails_in_validating(airflow_db, store, world, s3, vsphere, what, kwargs,
                                                             field, named):
    create_source_vm(world)
    target = f"never-{uuid.uuid4().hex[:6]}"
    write_store(store, "kvm-to-vsphere.yaml", scenario1_docs(world, vsphere, s3, target_name=target, **kwargs))
    dagrun = run_migration("vmmigration__default__kvm-to-vsphere")
    assert str(dagrun.state) == "failed"
    states = task_states(dagrun)
    assert states["validate_migration[-1]"] == "failed" and states.get("snapshot_vm[-1]") != "success"
    cond = _validating_failure(store, "kvm-to-vsphere")
    assert field in cond["message"] and named in cond["message"], cond
    assert not vsphere.datastore_path("datastore1", target).exists()
    si, vm = vw.find_vm(vsphere, target)
    vsphere.disconnect(si)
    assert vm is None


def test_unknown_source_vm_fails_in_validating(airflow_db, store, world, vsphere):
    storage = {"type": "nfs", "path": str(world.share), "endpoint": "nfs.local"}
    write_store(store, "v2k.yaml", vsphere_source_docs(world, vsphere, "v2k", "no-such-vm", storage=storage))
    dagrun = run_migration("vmmigration__default__v2k")
    assert str(dagrun.state) == "failed"
    cond = _validating_failure(store, "v2k")
    assert "spec.sourceName" in cond["message"] and "no-such-vm" in cond["message"]


def test_wrong_password_fails_at_once_without_retries(airflow_db, store, world, vsphere, tmp_path):
    vm = f"{world.prefix}-vauth"
    vw.create_vm(vsphere, vm, [("a", 8)], work=tmp_path)
    storage = {"type": "nfs", "path": str(world.share), "endpoint": "nfs.local"}
    write_store(store, "v2k.yaml", vsphere_source_docs(world, vsphere, "v2k", vm, storage=storage,
                                                       password="not-the-password"))
    dagrun = run_migration("vmmigration__default__v2k")
    assert str(dagrun.state) == "failed"
    validate = next(ti for ti in dagrun.get_task_instances() if ti.task_id == "validate_migration")
    assert validate.try_number == 1, "a refused login is not retried"
    cond = _validating_failure(store, "v2k")
    assert cond["reason"] == "HypervisorAuthenticationFailed" and "refused the login" in cond["message"]
    assert "not-the-password" not in str(FileStatusSink(SpecStore(store)).get("default", "v2k"))
    with pytest.raises(HypervisorAuthError):
        from include.providers.vsphere_driver import VSphereDriver

        VSphereDriver(vsphere.url, {"username": vsphere.username, "password": "nope",
                                    "caBundle": vsphere.ca_file.read_text()}).check()


def test_a_vcenter_task_fault_ends_creating_with_its_message_and_rolls_back(store, world, s3, vsphere):
    """A disk file removed from the datastore after Importing: CreateVM_Task fails with vCenter's
    FileNotFound fault, Creating fails with that fault, and rollback removes the run's other disk and its
    folder, and nothing else on the datastore."""
    create_source_vm(world)
    target = f"fault-{uuid.uuid4().hex[:6]}"
    write_store(store, "kvm-to-vsphere.yaml", scenario1_docs(world, vsphere, s3, target_name=target))
    ctx = phases.MigrationContext("default", "kvm-to-vsphere", store=SpecStore(store))
    phases.validate(ctx)
    phases.snapshot(ctx)
    for disk in ("vda", "vdb"):
        for step in (phases.export_disk, phases.transfer_disk, phases.convert_disk, phases.import_disk):
            step(ctx, disk)
    folder = vsphere.datastore_path("datastore1", target)
    (folder / f"{target}-vdb.vmdk").unlink()  # gone behind the engine's back
    bystander = folder / "someone-elses.txt"
    bystander.write_text("not ours")
    with pytest.raises(TargetCreationError, match="FileNotFound|not found") as err:
        phases.create_vm(phases.MigrationContext("default", "kvm-to-vsphere", store=SpecStore(store)))
    assert f"creating VM {target}" in str(err.value)
    result = phases.finalize(phases.MigrationContext("default", "kvm-to-vsphere", store=SpecStore(store)),
                             succeeded=False, failure=str(err.value))
    assert not (folder / f"{target}-vda.vmdk").exists()
    assert any("target disk" in item for item in result["removed"]), result
    assert bystander.read_text() == "not ours", "a file the run did not create is never deleted"
    si, vm = vw.find_vm(vsphere, target)
    vsphere.disconnect(si)
    assert vm is None


def test_driver_refuses_what_is_not_there(vsphere):
    from include.providers.vsphere_driver import VSphereDriver

    driver = VSphereDriver(vsphere.url, {"username": vsphere.username, "password": vsphere.password,
                                         "caBundle": vsphere.ca_file.read_text()})
    try:
        assert driver.storage_exists("datastore2") and not driver.storage_exists("datastore9")
        driver.api.si.content.sessionManager.Logout()  # the session ends (expired, or ended by an admin)
        assert driver.network_exists("VM Network 2"), "a call after the session ended logs in again"
        with pytest.raises(NotFound, match="no-such"):
            driver.get_vm("no-such")
        assert "not booted from here" in (driver.boot_check_refusal() or "")
    finally:
        driver.close()


def test_a_running_vsphere_vm_is_exported_from_a_snapshot_taken_while_it_runs(airflow_db, store, world, vsphere,
                                                                                tmp_path):
    """Powered on, it stays on: one snapshot of every disk (the point in time), each exported through NFC while
    the VM runs, the snapshot removed once the disks are stored. Nothing writes to the simulator's disks and
    its snapshots make no delta, so this shows the running-VM path end to end, not that the bytes are the
    snapshot's rather than the disk's as it is now."""
    from include.demo import ensure_world_pools

    conn = world.conn()
    ensure_world_pools(conn, world)
    vm = f"{world.prefix}-vlive"
    raws = vw.create_vm(vsphere, vm, [("a", 16), ("b", 8)], work=tmp_path)
    si, obj = vw.find_vm(vsphere, vm)
    try:
        vw._wait(obj.PowerOnVM_Task())
    finally:
        vsphere.disconnect(si)
    storage = {"type": "nfs", "path": str(world.share), "endpoint": "nfs.local"}
    write_store(store, "vlive.yaml", vsphere_source_docs(world, vsphere, "vlive", vm, storage=storage))
    dagrun = run_migration("vmmigration__default__vlive")
    assert str(dagrun.state) == "success", task_states(dagrun)
    status = FileStatusSink(SpecStore(store)).get("default", "vlive")
    assert status["phase"] == "Ready"
    assert status["pointInTime"]["consistency"] == "crash-consistent"
    assert "VMware Tools do not run" in status["pointInTime"]["detail"]
    pool = conn.storagePoolLookupByName(world.target_pool)
    pool.refresh(0)
    for disk, label in (("sda", "a"), ("sdb", "b")):
        dst = pool.storageVolLookupByName(f"{vm}-kvm-{disk}.qcow2").path()
        assert diskio.compare(raws[label], dst, "raw", "qcow2"), f"{disk} differs from its source"
    si, obj = vw.find_vm(vsphere, vm)
    try:
        assert str(obj.runtime.powerState) == "poweredOn", "the source kept running"
        assert not getattr(obj, "snapshot", None), "the point-in-time snapshot is removed"
    finally:
        vsphere.disconnect(si)
    conn.close()


def test_a_boot_check_on_a_vsphere_target_is_reported_not_performed(store, world, s3, vsphere):
    create_source_vm(world)
    target = f"boot-{uuid.uuid4().hex[:6]}"
    docs = scenario1_docs(world, vsphere, s3, target_name=target)
    docs[0]["metadata"]["annotations"] = {"vmmigration.virtrigaud.io/boot-check": "serial"}
    write_store(store, "kvm-to-vsphere.yaml", docs)
    ctx = phases.MigrationContext("default", "kvm-to-vsphere", store=SpecStore(store))
    phases.validate(ctx)
    phases.snapshot(ctx)
    for disk in ("vda", "vdb"):
        for step in (phases.export_disk, phases.transfer_disk, phases.convert_disk, phases.import_disk):
            step(ctx, disk)
    phases.create_vm(ctx)
    phases.validate_target(ctx)
    phases.finalize(ctx, succeeded=True)
    status = FileStatusSink(SpecStore(store)).get("default", "kvm-to-vsphere")
    assert status["phase"] == "Ready"
    assert status["bootCheck"]["result"] == "NotPerformed"
    assert "not booted from here" in status["bootCheck"]["message"]
    validated = next(c for c in status["conditions"] if c["type"] == "TargetValidated")
    assert "boot check NOT performed" in validated["message"]


def test_a_vsphere_export_of_one_disk_with_airflow_tasks_test(airflow_db, store, world, vsphere, tmp_path):
    """As a user tries one step locally: Validating, Snapshotting, then Exporting and Transferring of disk 0,
    each a separate ``airflow tasks test``; the stored object is the disk as the snapshot's NFC export gave it."""
    from include.demo import ensure_world_pools
    from tests.e2e.test_tasks_test_per_phase import tasks_test

    conn = world.conn()
    ensure_world_pools(conn, world)
    conn.close()
    vm = f"{world.prefix}-vtt"
    vw.create_vm(vsphere, vm, [("a", 8), ("b", 4)], work=tmp_path)
    storage = {"type": "nfs", "path": str(world.share), "endpoint": "nfs.local"}
    write_store(store, "vtt.yaml", vsphere_source_docs(world, vsphere, "vtt", vm, storage=storage))
    dag_id = "vmmigration__default__vtt"
    out = tasks_test("validate_migration", dag_id=dag_id)
    assert "plan:" in out and "sda" in out and "vmdk" in out
    tasks_test("snapshot_vm", dag_id=dag_id)
    out = tasks_test("disk.export_disk", 0, dag_id=dag_id)
    assert "exported as a vmdk stream" in out
    out = tasks_test("disk.transfer_disk", 0, dag_id=dag_id)
    stored = world.share / "default" / "vtt" / "sda.vmdk"
    source = vsphere.datastore_path("datastore1", f"{vm}/{vm}-a.vmdk")
    assert stored.read_bytes() == source.read_bytes(), "the object is the snapshot's export of the disk"
    assert vsphere.password not in out
    result = phases.finalize(phases.MigrationContext("default", "vtt", store=SpecStore(store)), succeeded=False)
    assert any("intermediate object" in item for item in result["removed"]), result


def test_certificates_are_verified_unless_the_provider_says_otherwise(vsphere, caplog):
    """Without the CA the simulator's certificate is refused; the Provider's insecureSkipVerify connects, with a
    warning in the log."""
    from include.errors import HypervisorError
    from include.inventory import ProviderInfo
    from include.providers import driver_for

    creds = {"username": vsphere.username, "password": vsphere.password}
    refused = driver_for(ProviderInfo(name="vc", namespace="default", type="vsphere", endpoint=vsphere.url,
                                      credentials=creds))
    with pytest.raises(HypervisorError, match="TLS failed"):
        refused.check()
    insecure = driver_for(ProviderInfo(name="vc", namespace="default", type="vsphere", endpoint=vsphere.url,
                                       credentials=creds, insecure_skip_verify=True))
    try:
        assert "vCenter" in insecure.check()
    finally:
        insecure.close()
    assert "TLS verification is DISABLED" in caplog.text


def test_the_providers_defaults_place_the_vm_and_an_unknown_one_is_named(vsphere):
    from include.inventory import ProviderInfo
    from include.providers import driver_for

    creds = {"username": vsphere.username, "password": vsphere.password, "caBundle": vsphere.ca_file.read_text()}
    driver = driver_for(ProviderInfo(name="vc", namespace="default", type="vsphere", endpoint=vsphere.url,
                                     credentials=creds, defaults={"datastore": "datastore2", "cluster": "DC0_C0"}))
    try:
        assert driver.default_storage() == "datastore2"
        _dc, _folder, pool, host = driver.placement("datastore2")
        assert host.parent == pool.owner
        assert pool.owner.name == "DC0_C0"
        driver.defaults = {"resourcePool": "no-such-pool"}
        with pytest.raises(NotFound, match="no-such-pool"):
            driver.placement("datastore1")
    finally:
        driver.close()


def test_libvirt_to_vsphere_through_the_nfc_import(airflow_db, store, world, s3, vsphere, capfd, caplog, monkeypatch):
    """The default upload for a real vCenter: each disk, streamOptimized, streamed into an ImportVApp lease of
    a one-disk carrier VM (told its progress, then completed), detached and moved into the migrated VM's
    folder; the carriers and their folders are gone afterwards. The simulator accepts the lease's bytes but
    keeps none of them (its imported disk stays an empty one), so what is checked here is the protocol as the
    engine drives it (the progress and complete calls answered without a fault) and the result's shape, not
    the data; the datastore path above is checked by content."""
    import logging

    from pyVmomi import vim

    from include.providers import vsphere_api

    caplog.set_level(logging.DEBUG, logger="include.providers.vsphere_api")
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(vsphere_api, "LEASE_KEEPALIVE", 0.0)  # every chunk tells the lease how far it is
    create_source_vm(world)
    target = f"nfc-{uuid.uuid4().hex[:6]}"
    docs = scenario1_docs(world, vsphere, s3, target_name=target)
    for doc in docs:
        if doc["kind"] == "Provider" and doc["metadata"]["name"] == "vcenter-prod":
            doc["metadata"].pop("annotations")  # the engine's default
    write_store(store, "kvm-to-vsphere.yaml", docs)
    dagrun = run_migration("vmmigration__default__kvm-to-vsphere")
    assert str(dagrun.state) == "success", task_states(dagrun)
    assert FileStatusSink(SpecStore(store)).get("default", "kvm-to-vsphere")["phase"] == "Ready"
    out, err = capfd.readouterr()
    logs = out + err + caplog.text
    assert logs.count("streamed into the NFC lease, lease completed") == 2
    assert "NFC lease told" in logs, "progress calls reached the lease (HttpNfcLeaseProgress)"
    assert "progress call failed" not in logs
    folder = vsphere.datastore_path("datastore1", target)
    assert {f"{target}-vda.vmdk", f"{target}-vdb.vmdk"} <= {p.name for p in folder.iterdir()}
    si, vm = vw.find_vm(vsphere, target)
    try:
        disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
        assert sorted(d.backing.fileName for d in disks) == \
            [f"[datastore1] {target}/{target}-vda.vmdk", f"[datastore1] {target}/{target}-vdb.vmdk"]
        assert sorted(d.capacityInBytes for d in disks) == [128 << 20, 256 << 20]
    finally:
        vsphere.disconnect(si)
    for disk in ("vda", "vdb"):
        si, carrier = vw.find_vm(vsphere, f"{target}-{disk}-import")
        vsphere.disconnect(si)
        assert carrier is None, "the import's carrier VM is removed"
        assert not vsphere.datastore_path("datastore1", f"{target}-{disk}-import").exists()


def test_a_stream_that_fails_its_checksum_aborts_the_nfc_lease(store, world, s3, vsphere, caplog):
    """The converted image changes in staging after Converting (a byte flipped for real): Importing's hash
    no longer matches before the stream's end, so the NFC lease is aborted, never completed, and the carrier
    VM with its disk is removed."""
    import logging

    from include.errors import ChecksumError

    caplog.set_level(logging.INFO)
    create_source_vm(world)
    target = f"abort-{uuid.uuid4().hex[:6]}"
    docs = scenario1_docs(world, vsphere, s3, target_name=target)
    for doc in docs:
        if doc["kind"] == "Provider" and doc["metadata"]["name"] == "vcenter-prod":
            doc["metadata"].pop("annotations")
    write_store(store, "kvm-to-vsphere.yaml", docs)
    ctx = phases.MigrationContext("default", "kvm-to-vsphere", store=SpecStore(store))
    phases.validate(ctx)
    phases.snapshot(ctx)
    for step in (phases.export_disk, phases.transfer_disk, phases.convert_disk):
        step(ctx, "vda")
    staged = Path(ctx.disk_record("vda").converted_path)
    with open(staged, "r+b") as fh:
        fh.seek(staged.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="changed in staging"):
        phases.import_disk(phases.MigrationContext("default", "kvm-to-vsphere", store=SpecStore(store)), "vda")
    assert "the NFC lease is aborted" in caplog.text
    assert "lease completed" not in caplog.text
    si, carrier = vw.find_vm(vsphere, f"{target}-vda-import")
    vsphere.disconnect(si)
    assert carrier is None
    assert not vsphere.datastore_path("datastore1", f"{target}/{target}-vda.vmdk").exists()
    result = phases.finalize(phases.MigrationContext("default", "kvm-to-vsphere", store=SpecStore(store)),
                             succeeded=False)
    left = vsphere.datastore_path("datastore1", target)
    assert not left.exists(), "the run's folder goes with it"
    assert f"empty folder [datastore1] {target}" in result["removed"]


def test_delete_source_removes_the_vsphere_vm_after_the_target_is_validated(airflow_db, store, world, vsphere,
                                                                             tmp_path):
    from include.demo import ensure_world_pools

    conn = world.conn()
    ensure_world_pools(conn, world)
    conn.close()
    vm = f"{world.prefix}-vdel"
    raws = vw.create_vm(vsphere, vm, [("a", 8)], work=tmp_path)
    storage = {"type": "nfs", "path": str(world.share), "endpoint": "nfs.local"}
    docs = vsphere_source_docs(world, vsphere, "vdel", vm, storage=storage)
    docs[0]["spec"]["cleanupPolicy"]["deleteSource"] = True
    write_store(store, "vdel.yaml", docs)
    dagrun = run_migration("vmmigration__default__vdel")
    assert str(dagrun.state) == "success", task_states(dagrun)
    si, src = vw.find_vm(vsphere, vm)
    vsphere.disconnect(si)
    assert src is None, "deleteSource removed the source VM"
    assert not vsphere.datastore_path("datastore1", f"{vm}/{vm}-a.vmdk").exists()
    conn = world.conn()
    try:
        pool = conn.storagePoolLookupByName(world.target_pool)
        pool.refresh(0)
        dst = pool.storageVolLookupByName(f"{vm}-kvm-sda.qcow2").path()
        assert diskio.compare(raws["a"], dst, "raw", "qcow2")
    finally:
        conn.close()


def test_a_disk_in_descriptor_and_extent_form_is_sized_by_its_extent(vsphere, tmp_path):
    """On ESXi a disk is a small descriptor plus its extent (``-flat.vmdk``): the disk's allocation is what the
    descriptor and its extents hold, not the descriptor's few hundred bytes (the transfer sizes its S3 parts
    from it)."""
    from include.providers.vsphere_driver import VSphereDriver

    vm = f"flat-{uuid.uuid4().hex[:6]}"
    vw.create_vm(vsphere, vm, [("a", 16)], work=tmp_path, subformat="monolithicFlat")
    folder = vsphere.datastore_path("datastore1", vm)
    descriptor, extent = folder / f"{vm}-a.vmdk", folder / f"{vm}-a-flat.vmdk"
    assert descriptor.stat().st_size < 4096 and extent.stat().st_size == 16 << 20
    driver = VSphereDriver(vsphere.url, {"username": vsphere.username, "password": vsphere.password,
                                         "caBundle": vsphere.ca_file.read_text()})
    try:
        disk = driver.get_vm(vm).disks[0]
    finally:
        driver.close()
    assert disk.allocation == descriptor.stat().st_size + extent.stat().st_size, disk
