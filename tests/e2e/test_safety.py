"""Safe by construction, on the real libvirtd and real files: a migration destroys only what it created,
claims its target name, keeps to its validated plan, and trusts no file another user could touch.

Each test reproduces an attack or accident that lost data (or ran as root where it should not) before
the ownership ledger, the name claims and the plan pinning existed.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from include import phases
from include.demo import create_source_vm, store_documents, write_store
from include.errors import ChecksumError, Conflict, InvalidMigration, PlanChanged, StorageError
from include.runstate import LEDGER
from include.store import FileStatusSink, SpecStore
from tests.e2e.helpers import assert_target_matches_source, run_migration, task_states

pytestmark = pytest.mark.e2e

DISKS = ("vda", "vdb")


def ctx_for(store: Path, name: str) -> phases.MigrationContext:
    return phases.MigrationContext("default", name, store=SpecStore(store))


def run_phases(ctx: phases.MigrationContext, *, until: str | None = None) -> None:
    phases.validate(ctx)
    phases.snapshot(ctx)
    for disk in DISKS:
        for step in (phases.export_disk, phases.transfer_disk, phases.convert_disk, phases.import_disk):
            step(ctx, disk)
            if until == f"{step.__name__}:{disk}":
                return
    phases.create_vm(ctx)
    phases.validate_target(ctx)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def volumes(world, pool: str) -> set[str]:
    conn = world.conn()
    try:
        p = conn.storagePoolLookupByName(pool)
        p.refresh(0)
        return set(p.listVolumes())
    finally:
        conn.close()


def domains(world) -> set[str]:
    conn = world.conn()
    try:
        return {d.name() for d in conn.listAllDomains(0)}
    finally:
        conn.close()


# -- destroy only what this run created -----------------------------------------------------------------------

@pytest.mark.parametrize("succeeded", [True, False])
def test_nfs_cleanup_keeps_files_it_did_not_write_under_the_migrations_folder(store, world, succeeded):
    """Before: cleanup ran rmtree(<path>/<namespace>/<name>), taking everything in that folder with it."""
    create_source_vm(world)
    name = "keepers"
    write_store(store, f"{name}.yaml", store_documents(world, name=name, target_format="qcow2"))
    folder = world.share / "default" / name
    folder.mkdir(parents=True, mode=0o700)
    (folder / "notes.txt").write_text("somebody else's")
    (folder / "archive").mkdir(mode=0o700)
    (folder / "archive" / "old-vda.qcow2").write_bytes(b"an older export kept on purpose")
    ctx = ctx_for(store, name)
    if succeeded:
        run_phases(ctx)
    else:
        run_phases(ctx, until="transfer_disk:vda")
    result = phases.finalize(ctx_for(store, name), succeeded=succeeded, failure="test")
    assert (folder / "notes.txt").read_text() == "somebody else's"
    assert (folder / "archive" / "old-vda.qcow2").read_bytes() == b"an older export kept on purpose"
    # what the run wrote is gone, and only that
    assert sorted(p.name for p in folder.iterdir()) == ["archive", "notes.txt"]
    assert any("intermediate object" in item for item in result["removed"])


def test_an_object_already_at_the_key_is_never_overwritten(store, world):
    create_source_vm(world)
    write_store(store, "squat.yaml", store_documents(world, name="squat", target_format="qcow2"))
    folder = world.share / "default" / "squat"
    folder.mkdir(parents=True, mode=0o700)
    (folder / "vda.qcow2").write_bytes(b"not ours")
    with pytest.raises(Conflict, match="already exists in the intermediate storage and was not written by this"):
        phases.validate(ctx_for(store, "squat"))
    phases.finalize(ctx_for(store, "squat"), succeeded=False)
    assert (folder / "vda.qcow2").read_bytes() == b"not ours"


def test_a_volume_that_appears_after_validating_fails_the_run_and_is_left_alone(store, world):
    """Before: import deleted any volume of the target name and wrote its own in its place."""
    create_source_vm(world)
    docs = store_documents(world, name="late", target_format="qcow2")
    write_store(store, "late.yaml", docs)
    ctx = ctx_for(store, "late")
    phases.validate(ctx)
    phases.snapshot(ctx)
    phases.export_disk(ctx, "vda")
    phases.transfer_disk(ctx, "vda")
    phases.convert_disk(ctx, "vda")
    # another team creates a volume of that name in the target pool
    theirs = f"{world.vm_name}-migrated-vda.qcow2"
    subprocess.run(["virsh", "-q", "-c", world.uri, "vol-create-as", world.target_pool, theirs, "1M",
                    "--format", "qcow2"], check=True, capture_output=True)
    conn = world.conn()
    try:
        key = conn.storagePoolLookupByName(world.target_pool).storageVolLookupByName(theirs).key()
    finally:
        conn.close()
    before = sha(Path(key))
    with pytest.raises(Conflict, match=f"volume '{theirs}' already exists in {world.target_pool} and was not created"):
        phases.import_disk(ctx, "vda")
    phases.finalize(ctx_for(store, "late"), succeeded=False, failure="conflict")
    assert theirs in volumes(world, world.target_pool)
    assert sha(Path(key)) == before


def test_two_migrations_for_one_target_name_only_one_proceeds(store, world):
    """Before: the second one's import replaced the first one's volumes and its rollback deleted them, after the
    first had deleted its source (deleteSource): the VM was lost on both sides."""
    sums = create_source_vm(world)  # the guest-visible sha256 of each source disk
    first = store_documents(world, name="first", target_format="qcow2")
    first[0]["spec"]["cleanupPolicy"]["deleteSource"] = True
    second = store_documents(world, name="second", target_format="qcow2")
    write_store(store, "first.yaml", first)
    write_store(store, "second.yaml", second[:1])
    a, b = ctx_for(store, "first"), ctx_for(store, "second")
    phases.validate(a)
    with pytest.raises(Conflict, match="is claimed by migration default/first"):
        phases.validate(b)
    phases.finalize(ctx_for(store, "second"), succeeded=False, failure="conflict")  # releases nothing of first's
    run_phases(a)
    phases.finalize(ctx_for(store, "first"), succeeded=True)
    assert f"{world.vm_name}-migrated" in domains(world)
    assert world.vm_name not in domains(world)  # deleteSource: the first one's source went, as asked
    assert_target_matches_source_sums(world, sums)
    # the name is free again once first has finished; second now meets the VM (or the deleted source) and stops
    with pytest.raises(InvalidMigration, match="already exists on provider|not found"):
        phases.validate(ctx_for(store, "second"))
    phases.finalize(ctx_for(store, "second"), succeeded=False, failure="conflict")
    assert_target_matches_source_sums(world, sums)


def assert_target_matches_source_sums(world, sums: dict[str, str]) -> None:
    """The target volumes hold what the source disks held: the same guest-visible sha256."""
    from include import diskio

    dst = world.root / "pools" / "dst"
    assert set(sums) == set(DISKS)
    for disk in DISKS:
        target = dst / f"{world.vm_name}-migrated-{disk}.qcow2"
        hasher = hashlib.sha256()
        for _ in diskio.hash_segments(diskio.guest_segments(target, "qcow2"), hasher):
            pass
        assert hasher.hexdigest() == sums[disk], f"{disk} differs from its source"


def test_delete_source_keeps_a_volume_another_vm_uses(airflow_db, store, world):
    """deleteSource removes the validated VM and its planned disks, never a volume another domain also uses."""
    create_source_vm(world)
    src = world.root / "pools" / "src"
    vdb = src / f"{world.vm_name}-vdb.qcow2"
    other = f"{world.prefix}-shares-vdb"
    conn = world.conn()
    try:
        conn.defineXML(f"<domain type='kvm'><name>{other}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
                       f"<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
                       f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{vdb}'/>"
                       f"<target dev='vda' bus='virtio'/><readonly/></disk></devices></domain>")
    finally:
        conn.close()
    try:
        docs = store_documents(world, name="delsrc2", target_format="qcow2")
        docs[0]["spec"]["cleanupPolicy"]["deleteSource"] = True
        write_store(store, "delsrc2.yaml", docs)
        dagrun = run_migration("vmmigration__default__delsrc2")
        assert str(dagrun.state) == "success", task_states(dagrun)
        assert world.vm_name not in domains(world)
        assert not (src / f"{world.vm_name}-vda.qcow2").exists()  # planned and used by nobody else: deleted
        assert vdb.exists()  # used by another VM too: kept
        assert other in domains(world)
    finally:
        subprocess.run(["virsh", "-q", "-c", world.uri, "undefine", other], capture_output=True)


def test_a_run_after_ready_is_refused_and_leaves_the_migration_as_it_was(airflow_db, store, world):
    """Before: a second run of a Ready migration's DAG (its Trigger button) failed at Validating on the target VM
    it had made, and finalize then marked the migration Failed: the VM had moved, the status said it had not."""
    create_source_vm(world)
    name = "once"
    write_store(store, f"{name}.yaml", store_documents(world, name=name, target_format="qcow2"))
    first = run_migration(f"vmmigration__default__{name}")
    assert str(first.state) == "success", task_states(first)
    specs = SpecStore(store)
    before = (FileStatusSink(specs).get("default", name), specs.run_record("default", name),
              specs.load_plan("default", name), specs.state.read("default", name, LEDGER),
              sorted(p.name for p in world.share.rglob("*")))
    assert before[0]["phase"] == "Ready" and before[0]["summary"]

    again = run_migration(f"vmmigration__default__{name}")
    states = task_states(again)
    assert str(again.state) == "failed"
    assert states["validate_migration[-1]"] == "failed" and states["finalize_migration[-1]"] == "failed", states
    assert all(state == "upstream_failed" for task, state in states.items()
               if task not in ("validate_migration[-1]", "finalize_migration[-1]")), states
    after = (FileStatusSink(specs).get("default", name), specs.run_record("default", name),
             specs.load_plan("default", name), specs.state.read("default", name, LEDGER),
              sorted(p.name for p in world.share.rglob("*")))
    assert after == before, "the status, run record, plan, ledger and share are as the Ready run left them"
    assert world.vm_name in domains(world) and f"{world.vm_name}-migrated" in domains(world)
    assert_target_matches_source(world, "qcow2")
    with pytest.raises(InvalidMigration, match="ended Ready") as err:
        phases.validate(ctx_for(store, name))
    assert err.value.field == "metadata.name" and err.value.reason == "AlreadyReady"


# -- plan-pinned execution --------------------------------------------------------------------------------------

def test_a_provider_edited_after_validating_stops_the_run_and_cleanup_keeps_to_the_plan(store, world, tmp_path):
    """Before: a Provider endpoint edited after Validating was used by the next phase."""
    create_source_vm(world)
    docs = store_documents(world, name="moved", target_format="qcow2")
    path = write_store(store, "moved.yaml", docs)
    ctx = ctx_for(store, "moved")
    phases.validate(ctx)
    phases.snapshot(ctx)
    phases.export_disk(ctx, "vda")
    phases.transfer_disk(ctx, "vda")
    phases.convert_disk(ctx, "vda")
    phases.import_disk(ctx, "vda")  # the target volume of vda exists now
    for doc in docs:
        if doc["kind"] == "Provider" and doc["metadata"]["name"].endswith("-kvm-target"):
            doc["spec"] = {**doc["spec"], "endpoint": "qemu+ssh://root@kvm-elsewhere.invalid/system"}
    write_store(store, path.name, docs)
    with pytest.raises(PlanChanged, match="the target Provider's type or endpoint changed since Validating"):
        phases.import_disk(ctx_for(store, "moved"), "vdb")
    status = FileStatusSink(SpecStore(store)).get("default", "moved")
    assert status is not None
    # the rollback works on the validated endpoint: vda's target volume, made by this run, is removed there
    phases.finalize(ctx_for(store, "moved"), succeeded=False, failure="plan changed")
    assert not any(v.startswith(f"{world.vm_name}-migrated") for v in volumes(world, world.target_pool))


def test_a_source_vm_replaced_under_its_name_is_not_touched(store, world):
    create_source_vm(world)
    write_store(store, "swap.yaml", store_documents(world, name="swap", target_format="qcow2"))
    ctx = ctx_for(store, "swap")
    phases.validate(ctx)
    conn = world.conn()
    try:
        dom = conn.lookupByName(world.vm_name)
        xml = dom.XMLDesc(0)
        dom.undefine()
        conn.defineXML(xml.replace(f"<uuid>{dom.UUIDString()}</uuid>", ""))  # same name, another VM
    finally:
        conn.close()
    with pytest.raises(PlanChanged, match="is not the VM validated"):
        phases.snapshot(ctx_for(store, "swap"))


# -- storage roots ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/etc", "/etc/ssh", "/usr/lib", "/var/lib/libvirt/images"])
def test_a_share_in_a_system_folder_is_refused(store, world, path):
    create_source_vm(world)
    docs = store_documents(world, name="sys")
    docs[0]["spec"]["storage"]["path"] = path
    write_store(store, "sys.yaml", docs)
    with pytest.raises(InvalidMigration) as info:
        phases.validate(ctx_for(store, "sys"))
    assert info.value.field == "spec.storage.path"
    assert "system folder" in str(info.value)


def test_a_share_outside_the_allowed_roots_is_refused(store, world, monkeypatch, tmp_path):
    create_source_vm(world)
    monkeypatch.setenv("VMMIGRATION_ALLOWED_ROOTS", str(tmp_path / "shares"))
    write_store(store, "out.yaml", store_documents(world, name="out"))
    with pytest.raises(InvalidMigration, match="is outside the allowed storage roots") as info:
        phases.validate(ctx_for(store, "out"))
    assert info.value.field == "spec.storage.path"
    monkeypatch.delenv("VMMIGRATION_ALLOWED_ROOTS")
    with pytest.raises(InvalidMigration, match="no storage roots are configured"):
        phases.validate(ctx_for(store, "out"))


# -- files other local users can touch ---------------------------------------------------------------------------

def _as_nobody(*cmd: str) -> None:
    nobody = pwd.getpwnam("nobody")
    subprocess.run(list(cmd), check=True, user=nobody.pw_uid, group=nobody.pw_gid)


@pytest.fixture
def shared_folder():
    """A world-writable sticky folder that other local users can reach (as an NFS export often is)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="vmmig-shared-"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _on_shared_folder(store: Path, world, shared_folder: Path, name: str) -> Path:
    """A migration whose NFS share is ``shared_folder``; returns a file there that must never change."""
    create_source_vm(world)
    docs = store_documents(world, name=name, target_format="qcow2")
    docs[0]["spec"]["storage"]["path"] = str(shared_folder)
    write_store(store, f"{name}.yaml", docs)
    victim = shared_folder / "victim"
    victim.write_text("precious")
    return victim


def test_a_part_symlink_planted_by_another_user_is_never_written_through(store, world, shared_folder):
    """Before: a `.part` symlink planted on the share made the engine, as root, overwrite the file it named."""
    victim = _on_shared_folder(store, world, shared_folder, "planted")
    _as_nobody("mkdir", "-m", "0777", str(shared_folder / "default"))
    _as_nobody("mkdir", "-m", "0777", str(shared_folder / "default" / "planted"))
    _as_nobody("ln", "-s", str(victim), str(shared_folder / "default" / "planted" / ".vda.qcow2.part"))
    ctx = ctx_for(store, "planted")
    # Validating already looks below the share for objects in the way, and refuses another user's folder
    with pytest.raises(StorageError, match="belongs to uid 65534 or is writable by others; refusing to write below"):
        phases.validate(ctx)
    assert victim.read_text() == "precious"
    phases.finalize(ctx_for(store, "planted"), succeeded=False, failure="planted")
    assert victim.read_text() == "precious"
    assert (shared_folder / "default" / "planted" / ".vda.qcow2.part").is_symlink()  # not ours: left alone


def test_a_part_symlink_in_our_own_folder_is_refused(store, world, shared_folder):
    """Even in a folder the engine owns, a symlink in place of the part file is never followed."""
    victim = _on_shared_folder(store, world, shared_folder, "planted2")
    (shared_folder / "default" / "planted2").mkdir(parents=True, mode=0o700)
    os.chmod(shared_folder / "default", 0o700)
    (shared_folder / "default" / "planted2" / ".vda.qcow2.part").symlink_to(victim)
    ctx = ctx_for(store, "planted2")
    phases.validate(ctx)
    phases.snapshot(ctx)
    phases.export_disk(ctx, "vda")
    with pytest.raises(StorageError, match="is a symlink; refusing to write through it"):
        phases.transfer_disk(ctx, "vda")
    assert victim.read_text() == "precious"


def test_staging_is_private_and_a_swapped_staged_file_is_caught(store, world, monkeypatch, tmp_path):
    """Before: staging was /tmp/vmmigration/<ns>/<name>, and a file swapped between Exporting and Transferring
    reached the target with a 'verified' checksum."""
    create_source_vm(world, vdb_format="raw")
    monkeypatch.setenv("VMMIGRATION_STAGING", str(tmp_path / "staging"))
    write_store(store, "staged.yaml", store_documents(world, name="staged", target_format="qcow2"))
    ctx = ctx_for(store, "staged")
    phases.validate(ctx)
    phases.snapshot(ctx)
    phases.export_disk(ctx, "vdb")  # raw -> qcow2 before upload: staged
    staged = Path(ctx.disk_record("vdb").export_path)
    assert staged.parent.parent == tmp_path / "staging"
    assert staged.parent.name.startswith("default.staged.") and len(staged.parent.name) > len("default.staged.")
    assert staged.parent.stat().st_mode & 0o777 == 0o700
    assert staged.stat().st_mode & 0o777 == 0o600
    # swap the staged image for another valid qcow2 of the same size
    fake = tmp_path / "fake.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(fake), "128M"], check=True)
    os.replace(fake, staged)
    os.chmod(staged, 0o600)
    with pytest.raises(ChecksumError, match="it changed in staging"):
        phases.transfer_disk(ctx_for(store, "staged"), "vdb")
    phases.finalize(ctx_for(store, "staged"), succeeded=False, failure="swapped")
    assert not staged.parent.exists()  # our staging folder, and nothing else, was removed
    assert (tmp_path / "staging").is_dir()


# -- namespaces ---------------------------------------------------------------------------------------------------

def _cross_namespace_docs(world, *, grant: bool) -> list[dict]:
    """The guide's Scenario 1 shape: the VM (and its Provider) in kvm-vms, the migration in default."""
    docs = store_documents(world, name="scenario1", target_format="qcow2")
    migration, vm, source, target, secret = docs
    migration["spec"]["sourceNamespace"] = "kvm-vms"
    for doc in (vm, source):
        doc["metadata"]["namespace"] = "kvm-vms"
    source_secret = {**secret, "metadata": {**secret["metadata"], "namespace": "kvm-vms"}}
    out = [migration, vm, source, target, secret, source_secret]
    if grant:
        out.append({"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "ReferenceGrant",
                    "metadata": {"name": "migrations-from-default", "namespace": "kvm-vms"},
                    "spec": {"from": [{"kind": "VMMigration", "namespace": "default"}],
                             "to": [{"kind": "VirtualMachine"}, {"kind": "Provider"}]}})
    return out


def test_a_vm_in_another_namespace_needs_that_namespaces_grant(airflow_db, store, world):
    create_source_vm(world)
    write_store(store, "scenario1.yaml", _cross_namespace_docs(world, grant=False))
    dagrun = run_migration("vmmigration__default__scenario1")
    assert str(dagrun.state) == "failed"
    status = FileStatusSink(SpecStore(store)).get("default", "scenario1")
    assert status["phase"] == "Failed"
    assert "spec.sourceNamespace" in status["message"] and "ReferenceGrant in kvm-vms" in status["message"]
    assert f"{world.vm_name}-migrated" not in domains(world)


def test_with_the_grant_the_cross_namespace_migration_runs(airflow_db, store, world):
    create_source_vm(world)
    write_store(store, "scenario1.yaml", _cross_namespace_docs(world, grant=True))
    dagrun = run_migration("vmmigration__default__scenario1")
    assert str(dagrun.state) == "success", task_states(dagrun)
    assert_target_matches_source(world, "qcow2")


# -- identities strong enough, crashes between create and record, pinned storage endpoints --------------------

def _virsh(world, *args: str) -> None:
    subprocess.run(["virsh", "-q", "-c", world.uri, *args], check=True, capture_output=True)


def test_a_volume_deleted_and_made_again_by_someone_else_under_the_same_path_is_kept(store, world):
    """The ledger holds a volume's identity (its key and creation time), not a name or a path."""
    import time

    create_source_vm(world)
    write_store(store, "again.yaml", store_documents(world, name="again", target_format="qcow2"))
    ctx = ctx_for(store, "again")
    run_phases(ctx, until="import_disk:vda")
    ours = f"{world.vm_name}-migrated-vda.qcow2"
    _virsh(world, "vol-delete", "--pool", world.target_pool, ours)
    time.sleep(0.05)
    _virsh(world, "vol-create-as", world.target_pool, ours, "1M", "--format", "qcow2")  # somebody else's now
    phases.finalize(ctx_for(store, "again"), succeeded=False, failure="test")
    assert ours in volumes(world, world.target_pool)


def test_a_volume_made_by_a_try_that_died_before_recording_it_is_recognised(store, world):
    """The state a SIGKILL between creating the target volume and recording it leaves (the window is a few
    instructions wide, so the state is made directly: the intent entry, then the volume): the retry adopts
    the volume as its own instead of failing with a Conflict for ever, and a rollback removes it."""
    create_source_vm(world)
    write_store(store, "died.yaml", store_documents(world, name="died", target_format="qcow2"))
    ctx = ctx_for(store, "died")
    run_phases(ctx, until="convert_disk:vda")
    volume = f"{world.vm_name}-migrated-vda.qcow2"
    ctx.ledger.record("volume", ctx.scope_target, state="creating", pool=world.target_pool, volume=volume)
    _virsh(world, "vol-create-as", world.target_pool, volume, "1M", "--format", "qcow2")
    phases.import_disk(ctx_for(store, "died"), "vda")  # adopts it, writes it anew
    assert volume in volumes(world, world.target_pool)
    phases.finalize(ctx_for(store, "died"), succeeded=False, failure="test")
    assert volume not in volumes(world, world.target_pool)


def test_a_vm_defined_by_a_try_that_died_before_recording_it_is_recognised(store, world):
    """Same for the target VM: define_vm tags it with the migration; a retry finds its tag and takes it over.
    A VM of that name without the tag stays a Conflict."""

    create_source_vm(world)
    write_store(store, "diedvm.yaml", store_documents(world, name="diedvm", target_format="qcow2"))
    ctx = ctx_for(store, "diedvm")
    run_phases(ctx, until="import_disk:vdb")
    tgt = ctx.plan.target
    disks = [d.target_disk() for d in ctx.plan.disks]
    ctx.target.define_vm(tgt.vm, 1, 128, disks, [], owner=f"default/diedvm {ctx.ledger.run()}")
    phases.create_vm(ctx_for(store, "diedvm"))
    phases.validate_target(ctx_for(store, "diedvm"))  # the VM defined by the plan, not the one the dead try left
    phases.finalize(ctx_for(store, "diedvm"), succeeded=False, failure="test")
    assert tgt.vm not in domains(world)
    # an untagged VM of that name is somebody else's
    conn = world.conn()
    try:
        conn.defineXML(f"<domain type='kvm'><name>{tgt.vm}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
                       f"<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>")
    finally:
        conn.close()
    try:
        with pytest.raises(Conflict, match="already exists"):
            phases.validate(ctx_for(store, "diedvm"))
        phases.finalize(ctx_for(store, "diedvm"), succeeded=False, failure="test")
        assert tgt.vm in domains(world)
    finally:
        _virsh(world, "undefine", tgt.vm)


def test_a_staging_folder_another_user_made_first_is_refused(store, world, shared_folder, monkeypatch):
    create_source_vm(world, vdb_format="raw")
    base = shared_folder / "staging"
    _as_nobody("mkdir", "-m", "0777", str(base))
    monkeypatch.setenv("VMMIGRATION_STAGING", str(base))
    write_store(store, "base.yaml", store_documents(world, name="base", target_format="qcow2"))
    ctx = ctx_for(store, "base")
    phases.validate(ctx)
    phases.snapshot(ctx)
    with pytest.raises(InvalidMigration, match="belongs to uid 65534, not to this engine"):
        phases.export_disk(ctx, "vdb")  # raw -> qcow2: needs staging
    assert list(base.iterdir()) == []


def test_a_hard_link_in_place_of_a_staged_file_is_refused(store, world, monkeypatch, tmp_path):
    create_source_vm(world, vdb_format="raw")
    monkeypatch.setenv("VMMIGRATION_STAGING", str(tmp_path / "staging"))
    write_store(store, "hl.yaml", store_documents(world, name="hl", target_format="qcow2"))
    ctx = ctx_for(store, "hl")
    phases.validate(ctx)
    phases.snapshot(ctx)
    phases.export_disk(ctx, "vdb")
    staged = Path(ctx.disk_record("vdb").export_path)
    os.link(staged, tmp_path / "elsewhere")
    with pytest.raises(InvalidMigration, match="a hard link"):
        phases.transfer_disk(ctx_for(store, "hl"), "vdb")


def test_a_storage_secret_pointing_elsewhere_mid_run_stops_the_run(store, world, tmp_path, monkeypatch):
    """An S3 Secret's endpoint wins over the spec's: editing it after Validating must not redirect uploads
    or the cleanup's deletes."""
    from tests.servers.s3 import start_s3_server

    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    server = start_s3_server(tmp_path / "s3")
    try:
        server.create_bucket("vm-migrations")
        create_source_vm(world)
        docs = store_documents(world, name="redir", target_format="qcow2", extra_spec={
            "storage": {"type": "s3", "bucket": "vm-migrations", "endpoint": server.endpoint,
                        "credentialsSecretRef": {"name": "redir-s3"}}})
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redir-s3", "namespace": "default"},
                  "stringData": {"accessKey": server.access_key, "secretKey": server.secret_key}}
        path = write_store(store, "redir.yaml", [*docs, secret])
        ctx = ctx_for(store, "redir")
        phases.validate(ctx)
        phases.snapshot(ctx)
        phases.export_disk(ctx, "vda")
        secret["stringData"]["endpoint"] = "http://127.0.0.2:9"
        write_store(store, path.name, [*docs, secret])
        with pytest.raises(PlanChanged, match="the storage changed since Validating"):
            phases.transfer_disk(ctx_for(store, "redir"), "vda")
        result = phases.finalize(ctx_for(store, "redir"), succeeded=False, failure="test")
        assert not any("intermediate" in item for item in result["removed"])  # nothing sent to the new endpoint
    finally:
        server.stop()


def test_two_endpoints_of_one_hypervisor_share_one_claim(store, world):
    """qemu:///system and qemu+unix:///system reach the same libvirtd: the claim is taken on the host's UUID."""
    create_source_vm(world)
    first = store_documents(world, name="viasystem", target_format="qcow2")
    second = store_documents(world, name="viaunix", target_format="qcow2")[0]
    second["spec"]["targetProviderRef"] = {"name": f"{world.prefix}-unix-target", "namespace": "default"}
    alt = {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "Provider",
           "metadata": {"name": f"{world.prefix}-unix-target", "namespace": "default"},
           "spec": {"type": "libvirt", "endpoint": "qemu+unix:///system"}}
    write_store(store, "viasystem.yaml", first)
    write_store(store, "viaunix.yaml", [second, alt])
    phases.validate(ctx_for(store, "viasystem"))
    with pytest.raises(Conflict, match="is claimed by migration default/viasystem"):
        phases.validate(ctx_for(store, "viaunix"))
    for name in ("viaunix", "viasystem"):
        phases.finalize(ctx_for(store, name), succeeded=False, failure="test")


def test_a_snapshot_of_the_migrations_name_made_by_someone_else_is_never_deleted(store, world):
    """An existing snapshot is used, but not recorded as ours; and a create that meets one (made between the
    check and the create) fails instead of taking it over."""
    from include.errors import HypervisorError

    create_source_vm(world)
    write_store(store, "snapfoe.yaml", store_documents(world, name="snapfoe", target_format="qcow2"))
    _virsh(world, "snapshot-create-as", world.vm_name, "vmmigration-snapfoe", "made by the VM's owner")
    ctx = ctx_for(store, "snapfoe")
    run_phases(ctx)
    phases.finalize(ctx_for(store, "snapfoe"), succeeded=True)  # deleteSnapshot: true
    conn = world.conn()
    try:
        dom = conn.lookupByName(world.vm_name)
        assert "vmmigration-snapfoe" in dom.snapshotListNames(0)
        disks = [ctx.disk_plan(d).source_disk() for d in DISKS]
        with pytest.raises(HypervisorError, match="snapshot vmmigration-snapfoe of .* failed"):
            ctx.source.create_snapshot(world.vm_name, "vmmigration-snapfoe", disks)
        dom.snapshotLookupByName("vmmigration-snapfoe").delete(0)
    finally:
        conn.close()


def test_rollback_removes_a_vm_this_run_tagged_but_never_one_of_another_run(store, world):
    """A try that died right after define_vm leaves a VM tagged with this run: the rollback removes it. A VM
    tagged by an earlier run of the same migration (a migrated VM handed over) is never touched."""

    create_source_vm(world)
    write_store(store, "tagged.yaml", store_documents(world, name="tagged", target_format="qcow2"))
    ctx = ctx_for(store, "tagged")
    run_phases(ctx, until="import_disk:vdb")
    tgt = ctx.plan.target
    disks = [d.target_disk() for d in ctx.plan.disks]
    ctx.target.define_vm(tgt.vm, 1, 128, disks, [], owner="default/tagged some-earlier-run")
    with pytest.raises(Conflict, match="already exists on the target and was not created by this migration"):
        phases.create_vm(ctx_for(store, "tagged"))
    phases.finalize(ctx_for(store, "tagged"), succeeded=False, failure="test")
    assert tgt.vm in domains(world)  # another run's VM: kept
    _virsh(world, "undefine", tgt.vm)
    ctx = ctx_for(store, "tagged")
    run_phases(ctx, until="import_disk:vdb")
    ctx.target.define_vm(tgt.vm, 1, 128, disks, [], owner=f"default/tagged {ctx.ledger.run()}")
    phases.finalize(ctx_for(store, "tagged"), succeeded=False, failure="test")
    assert tgt.vm not in domains(world)  # this run's, never recorded: removed
