"""A running source VM migrated from one point in time while it keeps running and writing, and the boot
check of the migrated VM: the test guest of tests/guest under KVM on the real libvirtd."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from include import phases
from include.bootcheck import BOOT_CHECK, BOOT_MARKER, BOOT_TIMEOUT, DELETE_RUNNING
from include.demo import DemoWorld, store_documents, teardown, write_store
from include.diskio import qemu_img_path
from include.errors import InvalidMigration, TargetValidationError
from include.phases import source as source_phase
from include.store import FileStatusSink, SpecStore
from tests.e2e import live
from tests.e2e.helpers import run_migration, task_states, unknown_status_fields
from tests.guest import records

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def guest_image():
    return live.build_guest()


@pytest.fixture
def kind(guest_image, monkeypatch):
    """The domain type that boots the guest here; the engine defines its targets with the same one."""
    value = live.virt_type()
    monkeypatch.setenv("VMMIGRATION_LIBVIRT_VIRT_TYPE", value)
    return value


@pytest.fixture
def bridge():
    b = live.Bridge()
    yield b.name
    b.remove()


@pytest.fixture
def live_world(libvirt_uri, monkeypatch):
    root = live.reachable_root()
    (root / "live").mkdir(mode=0o711)
    os.chmod(root / "live", 0o711)
    monkeypatch.setenv("VMMIGRATION_LIVE_DIR", str(root / "live"))
    monkeypatch.setenv("VMMIGRATION_ALLOWED_ROOTS", str(root))
    w = DemoWorld(uri=libvirt_uri, prefix=f"t{uuid.uuid4().hex[:8]}", root=root / "world")
    w.share.mkdir(parents=True)
    yield w
    teardown(w)
    live.remove_root(root)


def _docs(world, name, *, annotations=None, target_format="qcow2", bridge=None, **spec):
    docs = store_documents(world, name=name, target_format=target_format, bridge=bridge or "virbr0",
                           extra_spec=spec or None)
    if bridge is None:
        docs[0]["spec"]["targetNetworkHints"] = []
    docs[0]["metadata"]["annotations"] = annotations or {}
    return docs


def _copy_phases(ctx, disks=("vda", "vdb")):
    for disk in disks:
        for step in (phases.export_disk, phases.transfer_disk, phases.convert_disk, phases.import_disk):
            step(ctx, disk)


def _target_volume(world, disk, fmt):
    return world.root / "pools" / "dst" / f"{world.vm_name}-migrated-{disk}.{fmt}"


def _wait_records(path, at_least, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        report = records.scan(path)
        if report.highest >= at_least or time.monotonic() > deadline:
            return report
        time.sleep(0.2)


def test_a_running_vm_is_migrated_from_one_point_in_time_and_boots(store, live_world, guest_image, kind, bridge,
                                                                   tmp_path):
    world = live_world
    src = live.define_guest(world, guest_image, bridge=bridge, kind=kind)
    boot = live.start_and_wait(world)
    before = _wait_records(src["vdb"], 20)
    assert before.highest >= 20, "the test guest does not write records"
    write_store(store, "live.yaml", _docs(world, "live", bridge=bridge, annotations={
        BOOT_CHECK: "serial", BOOT_MARKER: live.MARKER, BOOT_TIMEOUT: "60"}))
    ctx = phases.MigrationContext("default", "live", store=SpecStore(store))
    phases.validate(ctx)
    plan = SpecStore(store).load_plan("default", "live")
    assert plan["snapshot"]["mode"] == "point-in-time" and all(d["live"] for d in plan["disks"])
    assert [d["transitFormat"] for d in plan["disks"]] == ["raw", "raw"]
    result = phases.snapshot(ctx)
    # the guest has an agent channel and the test guest's agent freezes its writer around the point in time
    assert result["pointInTime"]["consistency"] == "application-consistent", result["pointInTime"]
    [entry] = ctx.ledger.entries("point-in-time")
    sock = entry.ident["handle"]["socket"]
    # an independent point-in-time copy, made by a plain tool through the same export
    pit = {d: live.raw_copy(f"nbd+unix:///{d}?socket={sock}", "raw", tmp_path / f"pit-{d}.raw") for d in ("vda", "vdb")}
    time.sleep(1.0)  # the guest goes on writing past the point in time
    _copy_phases(ctx)
    # every disk is stored: the point in time is released, its folder gone; the source never stopped
    assert not ctx.ledger.entries("point-in-time")
    assert not os.path.exists(os.path.dirname(os.path.dirname(sock)))
    assert live.is_running(world)
    phases.create_vm(ctx)
    for disk in ("vda", "vdb"):
        got = live.raw_copy(_target_volume(world, disk, "qcow2"), "qcow2", tmp_path / f"target-{disk}.raw")
        cmp = subprocess.run([qemu_img_path(), "compare", "-q", "-f", "raw", "-F", "raw", str(got), str(pit[disk])])
        assert cmp.returncode == 0, f"disk {disk} on the target differs from the point-in-time copy"
    migrated = records.scan(tmp_path / "target-vdb.raw")
    records.check_consistent(migrated)
    assert migrated.highest >= before.highest
    # quiesced: the writer was paused between records, its header already past the last one
    assert migrated.header_next == migrated.highest + 1, records.summary(migrated)
    after = records.scan(src["vdb"])  # the source still writes, past what was migrated
    records.check_consistent(after)
    assert after.highest > migrated.highest and live.is_running(world)
    phases.validate_target(ctx)
    status = FileStatusSink(SpecStore(store)).get("default", "live")
    assert status["bootCheck"]["result"] == "Passed" and live.MARKER in status["bootCheck"]["seen"]
    assert status["pointInTime"]["consistency"] == "application-consistent"
    phases.finalize(ctx, succeeded=True)
    assert live.is_running(world)
    print(f"source boot {boot:.1f} s; target boot {status['bootCheck']['seconds']} s; migrated {migrated.highest} "
          f"records, source at {after.highest}")


def test_deleting_a_running_source_needs_saying_so(store, live_world, guest_image, kind):
    world = live_world
    live.define_guest(world, guest_image, bridge=None, kind=kind)
    live.start_and_wait(world)
    write_store(store, "del.yaml", _docs(world, "del", cleanupPolicy={
        "deleteIntermediate": True, "deleteSnapshot": True, "deleteSource": True}))
    ctx = phases.MigrationContext("default", "del", store=SpecStore(store))
    with pytest.raises(InvalidMigration, match="spec.cleanupPolicy.deleteSource: .* is running.*" + DELETE_RUNNING):
        phases.validate(ctx)
    assert SpecStore(store).load_plan("default", "del") is None


def test_a_damaged_boot_disk_fails_the_boot_check_and_is_rolled_back(store, live_world, guest_image, kind, tmp_path):
    world = live_world
    live.define_guest(world, guest_image, bridge=None, vda_format="raw", kind=kind)  # shut off: the cold path
    write_store(store, "bad.yaml", _docs(world, "bad", target_format="raw", annotations={
        BOOT_CHECK: "serial", BOOT_MARKER: live.MARKER, BOOT_TIMEOUT: "20"}))
    ctx = phases.MigrationContext("default", "bad", store=SpecStore(store))
    phases.validate(ctx)
    phases.snapshot(ctx)
    _copy_phases(ctx)
    phases.create_vm(ctx)
    vda = _target_volume(world, "vda", "raw")
    # the kernel's initramfs overwritten with garbage: syslinux and the kernel still start and say so
    garbage = tmp_path / "initrd.img"
    garbage.write_bytes(os.urandom(64 * 1024))
    subprocess.run(["mcopy", "-o", "-i", str(vda), str(garbage), "::initrd.img"], check=True)
    with pytest.raises(TargetValidationError, match="boot check failed: .* no marker") as err:
        phases.validate_target(ctx)
    assert "Kernel panic" in str(err.value) or "initramfs" in str(err.value).lower()
    status = FileStatusSink(SpecStore(store)).get("default", "bad")
    assert status["bootCheck"]["result"] == "Failed"
    phases.finalize(ctx, succeeded=False, failure=str(err.value))
    conn = world.conn()
    try:
        assert f"{world.vm_name}-migrated" not in [d.name() for d in conn.listAllDomains(0)]
    finally:
        conn.close()
    assert not vda.exists()  # rolled back per the ledger


def _backup_job(world) -> bool:
    """Whether the source domain has a backup job (``virsh domjobinfo`` names it)."""
    import libvirt

    conn = world.conn()
    try:
        conn.lookupByName(world.vm_name).backupGetXMLDesc(0)
        return True
    except libvirt.libvirtError as err:
        if err.get_error_code() != 104:  # VIR_ERR_NO_DOMAIN_BACKUP; anything else is not an answer
            raise
        return False
    finally:
        conn.close()


def _foreign_backup(world, folder) -> None:
    """A backup job of someone else's (its own socket), begun with virsh."""
    os.makedirs(folder, mode=0o777)
    os.chmod(folder, 0o777)
    xml = os.path.join(folder, "backup.xml")
    with open(xml, "w") as fh:
        fh.write(f"<domainbackup mode='pull'><server transport='unix' socket='{folder}/theirs.sock'/><disks>"
                 f"<disk name='vda' backup='yes' type='file'><scratch file='{folder}/vda.scratch'/></disk>"
                 f"<disk name='vdb' backup='no'/></disks></domainbackup>")
    subprocess.run(["virsh", "-c", world.uri, "backup-begin", world.vm_name, xml], check=True, capture_output=True)


def test_the_dag_migrates_a_running_vm_without_agent_then_boots_it_to_its_agent(airflow_db, store, live_world,
                                                                                guest_image, kind):
    """``dag.test()`` of the generated DAG: every task, the status as the Kubernetes writer would send it."""
    world = live_world
    src = live.define_guest(world, guest_image, bridge=None, kind=kind, agent=False)
    live.start_and_wait(world)
    _wait_records(src["vdb"], 10)
    # the target gets a guest agent channel from the engine (the source had none): its agent answers
    write_store(store, "dagrun.yaml", _docs(world, "dagrun", annotations={BOOT_CHECK: "guest-agent",
                                                                          BOOT_TIMEOUT: "90"}))
    dagrun = run_migration("vmmigration__default__dagrun")
    assert str(dagrun.state) == "success", task_states(dagrun)
    status = FileStatusSink(SpecStore(store)).get("default", "dagrun")
    assert status["phase"] == "Ready" and unknown_status_fields(status) == []
    assert status["pointInTime"]["consistency"] == "crash-consistent"
    assert "no guest agent channel" in status["pointInTime"]["detail"]
    snapped = next(c for c in status["conditions"] if c["type"] == "Snapshotted")
    assert "crash-consistent" in snapped["message"] and "keeps running" in snapped["message"]
    assert status["bootCheck"]["result"] == "Passed" and "guest agent answered" in status["bootCheck"]["seen"]
    validated = next(c for c in status["conditions"] if c["type"] == "TargetValidated")
    assert "booted in" in validated["message"]
    assert live.is_running(world) and not _backup_job(world)
    migrated = records.scan_image(_target_volume(world, "vdb", "qcow2"), "qcow2")
    records.check_consistent(migrated)  # what it received, plus what its one boot appended


def _snapshotted_then_aborted(store, world, guest_image, kind, name):
    """A running guest without agent, validated and snapshotted; then its backup job aborted behind our back."""
    live.define_guest(world, guest_image, bridge=None, kind=kind, agent=False)
    live.start_and_wait(world)
    write_store(store, f"{name}.yaml", _docs(world, name))
    ctx = phases.MigrationContext("default", name, store=SpecStore(store))
    phases.validate(ctx)
    phases.snapshot(ctx)
    assert _backup_job(world)
    subprocess.run(["virsh", "-c", world.uri, "domjobabort", world.vm_name], check=True, capture_output=True)
    for _ in range(100):  # the abort completes asynchronously
        if not _backup_job(world):
            break
        time.sleep(0.1)
    return ctx


def test_a_point_in_time_lost_midway_fails_and_a_failure_ends_it(store, live_world, guest_image, kind):
    world = live_world
    ctx = _snapshotted_then_aborted(store, world, guest_image, kind, "lost")
    with pytest.raises(InvalidMigration, match="no longer held"):
        phases.export_disk(ctx, "vda")
    # a new point in time on the retry of Snapshotting, never for one disk only
    phases.snapshot(ctx)
    [entry] = ctx.ledger.entries("point-in-time")
    folder = os.path.dirname(os.path.dirname(entry.ident["handle"]["socket"]))
    phases.export_disk(ctx, "vda")
    phases.finalize(ctx, succeeded=False, failure="stopped by the test")
    assert not _backup_job(world) and not os.path.exists(folder)
    assert live.is_running(world)  # the source was never touched
    assert not ctx.ledger.entries("point-in-time")


def test_a_backup_job_that_is_not_ours_is_never_ended(store, live_world, guest_image, kind):
    world = live_world
    ctx = _snapshotted_then_aborted(store, world, guest_image, kind, "theirs")
    # someone else starts a backup job on the VM while our entry is still in the ledger
    _foreign_backup(world, str(world.root / "theirs"))
    with pytest.raises(InvalidMigration, match="no longer held"):
        phases.transfer_disk(ctx, "vda")
    phases.finalize(ctx, succeeded=False, failure="stopped by the test")
    assert _backup_job(world), "cleanup ended a backup job this run did not start"
    subprocess.run(["virsh", "-c", world.uri, "domjobabort", world.vm_name], check=True, capture_output=True)


def test_a_guest_left_frozen_by_an_interrupted_snapshotting_is_thawed_by_the_retry(store, live_world, guest_image,
                                                                                  kind):
    world = live_world
    src = live.define_guest(world, guest_image, bridge=None, kind=kind)
    live.start_and_wait(world)
    _wait_records(src["vdb"], 5)
    write_store(store, "frozen.yaml", _docs(world, "frozen"))
    ctx = phases.MigrationContext("default", "frozen", store=SpecStore(store))
    phases.validate(ctx)
    # what a Snapshotting killed between its freeze and its thaw leaves: the ledger entry recorded before the
    # job (state creating) and a frozen guest; the freeze itself is libvirt's, through the guest agent
    folder = source_phase._live_folder(ctx)
    ctx.ledger.record("point-in-time", ctx.scope_source, state="creating", vm=ctx.plan.source.vm_id,
                      handle=ctx.source.point_in_time_handle(str(folder)))
    subprocess.run(["virsh", "-c", world.uri, "domfsfreeze", world.vm_name], check=True, capture_output=True)
    frozen = records.scan(src["vdb"]).highest
    time.sleep(1.5)
    assert records.scan(src["vdb"]).highest == frozen  # the writer is paused
    result = phases.snapshot(ctx)  # the retry
    assert result["pointInTime"]["consistency"] == "application-consistent"
    after = _wait_records(src["vdb"], frozen + 5)
    assert after.highest >= frozen + 5, "the guest was left frozen"
    assert not os.path.exists(folder)  # the interrupted try's folder is gone
    phases.finalize(ctx, succeeded=False, failure="stopped by the test")
    assert not _backup_job(world)


def test_delete_source_keeps_a_vm_started_during_the_migration(store, live_world, guest_image, kind):
    world = live_world
    src = live.define_guest(world, guest_image, bridge=None, kind=kind)  # shut off: the cold path
    write_store(store, "started.yaml", _docs(world, "started", cleanupPolicy={
        "deleteIntermediate": True, "deleteSnapshot": True, "deleteSource": True}))
    ctx = phases.MigrationContext("default", "started", store=SpecStore(store))
    phases.validate(ctx)
    phases.snapshot(ctx)
    _copy_phases(ctx)
    phases.create_vm(ctx)
    phases.validate_target(ctx)
    live.start_and_wait(world)  # someone starts the source before cleanup
    result = phases.finalize(ctx, succeeded=True)
    assert any("it is running" in k for k in result["kept"]), result
    assert live.is_running(world) and src["vda"].exists() and src["vdb"].exists()
