"""Faults of a real data center, each produced for real, each outcome checked by content, the source
intact in every case:

1. the task process SIGKILLed mid-transfer inside a real Airflow worker: Airflow retries, the retry
   resumes the upload, the target is byte-identical;
2. libvirtd restarted while Importing streams the target volume: the retry succeeds, or the run fails
   with the partial volume removed;
3. the NFS share (a real 64 MiB tmpfs) runs out of space: Failed, naming the disk and the share, with
   nothing of anyone else's on the share touched;
4. two migrations racing for one target name through the real scheduler: one Ready, one Conflict.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from include.demo import DemoWorld, create_source_vm, store_documents, teardown, write_store
from include.store import SpecStore
from tests.e2e import fault_tools as ft
from tests.e2e.helpers import assert_target_matches_source, run_migration, task_states
from tests.servers.sshd import start_ssh_server

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


@pytest.fixture
def sshd(tmp_path):
    server = start_ssh_server(tmp_path / "sshd")
    yield server
    server.stop()


# -- 1. SIGKILL of the task process in a real worker ------------------------------------------------------
def test_task_process_sigkilled_mid_transfer_is_retried_and_resumes(tmp_path, store, world, s3):
    background = ft.BackgroundStack(tmp_path / "airflow", {
        # the supervisor reports a dead child at once; these only bound the worst case
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
    })
    try:
        created = create_source_vm(world, vda_mib=1024, data_scale=4)  # ~390 MB of data in vda: seconds to upload
        before = ft.source_fingerprint(world)
        name = "sigkill"
        write_store(store, f"{name}.yaml", ft.s3_documents(world, name, s3, retry={"maxAttempts": 3,
                                                                                   "backoffDuration": "1s"}))
        dag_id = f"vmmigration__default__{name}"
        stack = background.get()
        stack.wait_for_dag(dag_id)
        run_id = stack.trigger(dag_id)
        caught = ft.wait_status(store, name, ft.in_progress("Transferring", "vda", min_fraction=0.1), timeout=120,
                                interval=0.05)
        ti = ft.task_instance(stack, dag_id, run_id, "disk.transfer_disk", 0)
        assert ti["state"] == "running" and ti["try_number"] == 1, ti
        pids = ft.task_runner_pids(ti["id"])
        assert len(pids) == 1, f"no single task runner process for {ti['id']}: {pids} (REST pid {ti.get('pid')})"
        if ti.get("pid"):
            assert pids[0] == ti["pid"], (pids, ti["pid"])
        os.kill(pids[0], signal.SIGKILL)
        killed_at = ft.disk_status(caught, "vda")
        assert ft.wait_gone(pids[0], 10)

        # the Airflow run decides when it is over: the status may look final earlier (see the end)
        state = ft.wait_run_state(stack, dag_id, run_id, timeout=240)
        status = ft.wait_status(store, name, ft.finished, timeout=10)
        states = stack.task_states(dag_id, run_id)
        assert state == "success", (status.get("message"), states)
        assert status["phase"] == "Ready", (status.get("message"), states)
        ti = ft.task_instance(stack, dag_id, run_id, "disk.transfer_disk", 0)
        assert ti["state"] == "success" and ti["try_number"] >= 2, ti  # Airflow retried the killed try
    finally:
        background.stop()
    record = SpecStore(store).disk_record("default", name, "vda")
    # the retry kept the parts uploaded before the kill
    assert record["resumedBytes"] > 0, (record, killed_at)
    assert_target_matches_source(world)
    ft.assert_source_intact(world, before, created)
    client = s3.client()
    assert client.list_objects_v2(Bucket="vm-migrations").get("KeyCount", 0) == 0
    assert not client.list_multipart_uploads(Bucket="vm-migrations").get("Uploads")
    # while Airflow was retrying, the status must not have claimed the migration Failed (a final phase)
    ft.assert_no_failed_interlude(status)


# -- 2. libvirtd restarted while Importing writes the target volume -----------------------------------------
@pytest.fixture
def libvirtd_back(libvirt_uri):
    """Whatever a test does to libvirtd, it is running again afterwards (the world teardown needs it)."""
    yield
    if not ft.libvirtd_pids():
        ft.start_libvirtd()


def test_libvirtd_restarted_during_import(airflow_db, store, world, sshd, libvirtd_back, tmp_path, monkeypatch):
    monkeypatch.setenv("VMMIGRATION_ALLOWED_ROOTS", str(tmp_path))
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")  # the "remote" target is sshd on 127.0.0.1
    created = create_source_vm(world, vda_mib=1024, data_scale=4)  # ~390 MB to stream into vda's volume
    before = ft.source_fingerprint(world)
    name = "lvrestart"
    docs = store_documents(world, name=name, target_format="raw",
                           extra_spec={"retryPolicy": {"maxAttempts": 3, "backoffDuration": "1s"}})
    # the target is reached over qemu+ssh, so Importing writes through the libvirt stream API (the
    # daemon itself writes the volume), not through the local-file shortcut
    target = next(d for d in docs if d["kind"] == "Provider" and d["metadata"]["name"].endswith("target"))
    target["spec"]["endpoint"] = sshd.libvirt_uri(with_keyfile=False)
    target["spec"]["credentialSecretRef"] = {"name": "ssh-key"}
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ssh-key", "namespace": "default"},
                 "type": "kubernetes.io/ssh-auth", "stringData": {"ssh-privatekey": sshd.private_key}})
    write_store(store, f"{name}.yaml", docs)
    restart: dict = {}
    errors: list[BaseException] = []

    def restarter() -> None:
        try:
            restart["caught"] = ft.disk_status(
                ft.wait_status(store, name, ft.in_progress("Importing", "vda", min_fraction=0.05), timeout=150,
                               interval=0.02), "vda")
            restart.update(ft.restart_libvirtd())
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    thread = threading.Thread(target=restarter, daemon=True)
    thread.start()
    dagrun = run_migration(f"vmmigration__default__{name}")
    thread.join(60)
    assert not errors, errors
    assert restart.get("new") and set(restart["new"]).isdisjoint(restart["old"]), restart
    states = task_states(dagrun)
    status = ft.wait_status(store, name, ft.finished, timeout=5)
    imports = [t for t in dagrun.get_task_instances() if t.task_id == "disk.import_disk" and t.map_index == 0]
    after = ft.target_state(world, f"{world.vm_name}-migrated")
    if status["phase"] == "Ready":
        # the retry wrote the whole volume again through the new daemon
        assert str(dagrun.state) == "success", states
        assert imports[0].try_number >= 2, states  # the stream broke; Airflow retried it
        assert after["vm"], after
        assert_target_matches_source(world)
        ft.assert_source_intact(world, before, created)
        ft.assert_no_failed_interlude(status)  # the status did not claim Failed while Airflow retried
    else:
        # a clean failure: no half-written volume, no VM
        assert str(dagrun.state) == "failed", states
        assert not after["vm"] and after["volumes"] == [], after
    ft.assert_source_intact(world, before, created)


# -- 3. the NFS share runs out of space ------------------------------------------------------------------
@pytest.fixture
def small_share(tmp_path):
    """A real 64 MiB tmpfs mounted as the NFS share; unmounted afterwards, whatever happens."""
    share = tmp_path / "share"
    share.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(share)], check=True)
    try:
        yield share
    finally:
        if subprocess.run(["umount", str(share)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(share)], check=False)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_nfs_share_out_of_space_fails_naming_disk_and_share(airflow_db, store, world, small_share, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("VMMIGRATION_ALLOWED_ROOTS", str(tmp_path))
    name = "nospace"
    # what others keep on the share, including a file in this migration's own <namespace>/<name>/ folder
    others = {
        "README.txt": b"the storage team's share\n",
        "other-team/vm-a/vda.raw": os.urandom(2 * MiB),
        f"default/{name}/operator-notes.txt": b"kept by the operator, not by the migration\n",
        f"default/{name}-old/vda.raw": os.urandom(MiB),
    }
    for rel, data in others.items():
        (small_share / rel).parent.mkdir(parents=True, exist_ok=True)
        (small_share / rel).write_bytes(data)
    # vda (16 MiB) fits; vdb (128 MiB virtual, 32 MiB of data) does not fit the 64 MiB share
    created = create_source_vm(world, vda_mib=16, vdb_mib=128, data_scale=0.125)
    before = ft.source_fingerprint(world)
    write_store(store, f"{name}.yaml", store_documents(world, name=name, target_format="raw", extra_spec={
        "storage": {"type": "nfs", "path": str(small_share), "endpoint": "nfs.local"},
        "retryPolicy": {"maxAttempts": 1, "backoffDuration": "1s"},
    }))
    dagrun = run_migration(f"vmmigration__default__{name}")
    states = task_states(dagrun)
    assert str(dagrun.state) == "failed", states
    status = SpecStore(store).read_json(SpecStore(store).status_path("default", name))
    assert status["phase"] == "Failed", status
    assert status["failedPhase"] == "Transferring", status
    # the run's own files (vda's object and manifest, any part file) are gone; everything else is as it was
    assert not [p for p in small_share.rglob(".*.part")]
    assert _tree(small_share) == others, sorted(_tree(small_share))
    after = ft.target_state(world, f"{world.vm_name}-migrated")
    assert not after["vm"] and after["volumes"] == [], after
    ft.assert_source_intact(world, before, created)
    message = ft.failed_condition(status).get("message", "")
    assert message == status["message"]
    assert str(small_share) in message, message  # names the share ...
    assert "space" in message.lower() or "free" in message.lower(), message
    assert "vdb" in message, message  # ... and the disk


# -- 4. two migrations racing for one target name ----------------------------------------------------------
@pytest.fixture
def second_world(libvirt_uri, tmp_path):
    w = DemoWorld(uri=libvirt_uri, prefix=f"t{uuid.uuid4().hex[:8]}", root=tmp_path / "world2")
    w.share.mkdir(parents=True)
    yield w
    teardown(w)


def test_two_migrations_racing_for_one_target_name(tmp_path, store, world, second_world, monkeypatch, request):
    monkeypatch.setenv("VMMIGRATION_ALLOWED_ROOTS", str(tmp_path))
    a, b = world, second_world
    background = ft.BackgroundStack(tmp_path / "airflow")  # starts while the sources are written
    request.addfinalizer(background.stop)
    # two different sources (different sizes, so different content), one target provider, pool and name
    created = {"race-a": create_source_vm(a, vda_mib=128, vdb_mib=64, data_scale=0.5),
               "race-b": create_source_vm(b, vda_mib=160, vdb_mib=80, data_scale=0.75)}
    before = {"race-a": ft.source_fingerprint(a), "race-b": ft.source_fingerprint(b)}
    target_name = f"{a.prefix}-contested"
    common = {"targetName": target_name, "targetStorageHint": a.target_pool,
              "targetProviderRef": {"name": f"{a.prefix}-kvm-target", "namespace": "default"},
              "retryPolicy": {"maxAttempts": 1, "backoffDuration": "1s"}}
    write_store(store, "race-a.yaml", store_documents(a, name="race-a", extra_spec=dict(common)))
    write_store(store, "race-b.yaml", store_documents(b, name="race-b", extra_spec={
        **common, "storage": {"type": "nfs", "path": str(b.share), "endpoint": "nfs.local"}}))
    stack = background.get()
    try:
        for name in ("race-a", "race-b"):
            stack.wait_for_dag(f"vmmigration__default__{name}")
        runs = {name: stack.trigger(f"vmmigration__default__{name}") for name in ("race-a", "race-b")}
        run_states = {name: ft.wait_run_state(stack, f"vmmigration__default__{name}", run, timeout=240)
                      for name, run in runs.items()}
        statuses = {name: ft.wait_status(store, name, ft.finished, timeout=10) for name in runs}
        task_info = {name: stack.task_states(f"vmmigration__default__{name}", run) for name, run in runs.items()}
    finally:
        stack.stop()
    phases = {name: s["phase"] for name, s in statuses.items()}
    assert sorted(phases.values()) == ["Failed", "Ready"], (phases, {n: s.get("message") for n, s in
                                                                      statuses.items()}, task_info)
    winner = next(n for n, p in phases.items() if p == "Ready")
    loser = next(n for n, p in phases.items() if p == "Failed")
    assert run_states[winner] == "success" and run_states[loser] == "failed", (run_states, task_info)
    failed = ft.failed_condition(statuses[loser])
    assert failed.get("reason") == "Conflict", statuses[loser]
    assert target_name in failed.get("message", ""), failed
    # the winner's VM and volumes are intact: its source's content, not the loser's
    from include import diskio

    state = ft.target_state(a, target_name)
    assert state["vm"], state
    assert state["volumes"] == [f"{target_name}-vda.raw", f"{target_name}-vdb.raw"], state
    for disk, info in before[winner]["disks"].items():
        dst = state["paths"][f"{target_name}-{disk}.raw"]
        assert diskio.compare(info["path"], dst, info["format"], "raw"), f"{winner}'s {disk} differs on the target"
        assert ft.guest_sha256(dst, "raw") == created[winner][disk]
    conn = a.conn()
    try:
        xml = conn.lookupByName(target_name).XMLDesc(0)
    finally:
        conn.close()
    assert all(state["paths"][v] in xml or f"volume='{v}'" in xml for v in state["volumes"]), xml
    # neither source was touched
    ft.assert_source_intact(a, before["race-a"], created["race-a"])
    ft.assert_source_intact(b, before["race-b"], created["race-b"])


# -- 3b. staging runs out of space, in the middle of a conversion ------------------------------------------------
def test_staging_out_of_space_mid_conversion_fails_naming_disk_and_path(store, world, tmp_path, monkeypatch):
    """A real tmpfs as the staging space, sized so that the up-front check passes (it holds the disk's
    allocated bytes) but qemu-img's qcow2 output, a little larger with its metadata, does not fit: the
    conversion hits ENOSPC half way. The error names the disk and the path, the partial file is removed,
    and the source is intact."""
    from include import phases
    from include.errors import StorageError

    create_source_vm(world, vdb_format="raw")  # raw -> qcow2: converted into staging before upload
    vdb = world.root / "pools" / "src" / f"{world.vm_name}-vdb.raw"
    before = hashlib.sha256(vdb.read_bytes()).hexdigest()
    allocated = vdb.stat().st_blocks * 512
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o700)
    size = (allocated + 64 * 1024 + 4095) // 4096 * 4096 + 16 * 4096  # room for the folder, not for the image
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(staging)], check=True)
    try:
        monkeypatch.setenv("VMMIGRATION_STAGING", str(staging))
        write_store(store, "fullstage.yaml", store_documents(world, name="fullstage", target_format="qcow2"))
        ctx = phases.MigrationContext("default", "fullstage", store=SpecStore(store))
        phases.validate(ctx)
        phases.snapshot(ctx)
        with pytest.raises(StorageError) as info:
            phases.export_disk(ctx, "vdb")
        message = str(info.value)
        assert "disk vdb" in message and str(staging) in message and "no space left writing" in message, message
        assert [p for p in staging.rglob("*") if p.is_file()] == []  # the partial image is gone
        phases.finalize(phases.MigrationContext("default", "fullstage", store=SpecStore(store)), succeeded=False,
                        failure=message)
        assert list(staging.iterdir()) == []  # and the private staging folder with it
    finally:
        if subprocess.run(["umount", str(staging)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(staging)], check=False)
    assert hashlib.sha256(vdb.read_bytes()).hexdigest() == before
