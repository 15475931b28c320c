"""Bad input ends Failed in Validating, with a condition naming the field, and creates nothing."""

from __future__ import annotations

import pytest

from include.demo import create_source_vm, store_documents, write_store
from include.store import FileStatusSink, SpecStore
from tests.e2e.helpers import run_migration, task_states

pytestmark = pytest.mark.e2e


def _assert_failed_in_validating(store, world, name: str, *needles: str) -> dict:
    dagrun = run_migration(f"vmmigration__default__{name}")
    states = task_states(dagrun)
    assert str(dagrun.state) == "failed", states
    assert states["validate_migration[-1]"].endswith("failed"), states
    status = FileStatusSink(SpecStore(store)).get("default", name)
    assert status["phase"] == "Failed"
    assert status["failedPhase"] == "Validating"
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert validated["status"] == "False"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    for needle in needles:
        assert needle in validated["message"], validated
        assert needle in failed["message"]
    # Nothing was created: no target VM, no target volume, nothing on the share, no snapshot.
    conn = world.conn()
    try:
        names = [d.name() for d in conn.listAllDomains(0)]
        assert f"{world.vm_name}-migrated" not in names
        pool = conn.storagePoolLookupByName(world.target_pool)
        pool.refresh(0)
        assert pool.listVolumes() == []
        if world.vm_name in names:
            assert conn.lookupByName(world.vm_name).snapshotListNames(0) == []
    finally:
        conn.close()
    assert not any(world.share.rglob("*"))
    return status


def test_missing_and_invalid_fields(airflow_db, store, world):
    create_source_vm(world)
    docs = store_documents(world, name="badspec")
    spec = docs[0]["spec"]
    del spec["storage"]["path"]  # required when type is nfs
    spec["targetDiskFormat"] = "qcow3"  # not a format
    spec["targetNetworkHints"][0]["bridg"] = "virbr0"  # unknown field, with a suggestion
    write_store(store, "badspec.yaml", docs)
    status = _assert_failed_in_validating(
        store, world, "badspec",
        "spec.storage.path: required when type is nfs",
        "spec.targetDiskFormat: must be one of qcow2, vmdk, raw",
        "spec.targetNetworkHints[0].bridg: unknown field (did you mean 'bridge'?)",
    )
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["reason"] == "ValidationFailed"


def test_missing_source_vm(airflow_db, store, world):
    # the inventory names a VM that the hypervisor does not have
    world.share.mkdir(exist_ok=True)
    from include.demo import ensure_pool

    conn = world.conn()
    ensure_pool(conn, world.target_pool, world.root / "pools" / "dst")
    conn.close()
    write_store(store, "novm.yaml", store_documents(world, name="novm"))
    _assert_failed_in_validating(store, world, "novm", "spec.sourceName", f"VM {world.vm_name!r} not found")


def test_missing_source_in_inventory(airflow_db, store, world):
    create_source_vm(world)
    docs = store_documents(world, name="noinv")
    docs[0]["spec"]["sourceName"] = "not-there"
    write_store(store, "noinv.yaml", docs)
    _assert_failed_in_validating(store, world, "noinv", "spec.sourceName: VirtualMachine default/not-there not found")


def test_missing_target_pool(airflow_db, store, world):
    create_source_vm(world)
    docs = store_documents(world, name="nopool")
    docs[0]["spec"]["targetStorageHint"] = f"{world.prefix}-no-such-pool"
    write_store(store, "nopool.yaml", docs)
    _assert_failed_in_validating(store, world, "nopool", "spec.targetStorageHint",
                                 f"{world.prefix}-no-such-pool")
