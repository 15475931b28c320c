"""Status bookkeeping of per-disk phases when disks run in parallel (include.phases begin/finish)."""

from __future__ import annotations

from include import phases
from include.model import (
    CleanupPlan,
    Conversion,
    DiskPlan,
    Plan,
    SnapshotPlan,
    SourcePlan,
    StoragePlan,
    TargetPlan,
)
from include.status import Phase
from include.store import SpecStore


def _plan(*disks: str) -> Plan:
    """A plan as Validating would save it for two disks (no pin: nothing to compare with)."""
    return Plan(
        migration="default/par", dag_id="vmmigration__default__par",
        source=SourcePlan(provider="default/src", type="libvirt", endpoint="qemu:///system", vm="par", vm_id=None,
                          running=False, vcpus=1, memory_mib=128),
        target=TargetPlan(provider="default/dst", type="libvirt", endpoint="qemu:///system", vm="par-new",
                          storage="default", vcpus=1, memory_mib=128),
        storage=StoragePlan(type="nfs", prefix="default/par", compression=None, spec={"type": "nfs", "path": "/x"}),
        snapshot=SnapshotPlan(name="vmmigration-par", disks=()),
        disks=tuple(DiskPlan(name=d, size_bytes=1, allocated_bytes=1, source_format="raw", source_path=f"/{d}",
                             source_pool=None, source_volume=None, bus="virtio", transit_format="raw",
                             conversion=Conversion.NONE, target_format="raw", object_key=f"default/par/{d}.raw",
                             target_storage="default", target_volume=f"par-new-{d}.raw", target_capacity=1,
                             target_bus="virtio")
                    for d in disks),
        cleanup=CleanupPlan(delete_intermediate=True, delete_snapshot=True, delete_source=False))


def _ctx(tmp_path):
    store = SpecStore(tmp_path)
    store.save_plan("default", "par", _plan("vda", "vdb").to_dict())
    return phases.MigrationContext("default", "par", store=store)


def test_phase_completes_when_the_last_disk_does_even_if_another_moved_on(tmp_path):
    ctx = _ctx(tmp_path)
    phases.begin(ctx, Phase.TRANSFERRING, disk="vda")
    phases.begin(ctx, Phase.TRANSFERRING, disk="vdb")
    phases.finish(ctx, Phase.TRANSFERRING, "vda stored", disk="vda")
    phases.begin(ctx, Phase.CONVERTING, disk="vda")  # vda runs ahead
    status = ctx.sink.get("default", "par")
    assert not any(c["type"] == "Transferred" for c in status["conditions"])
    phases.finish(ctx, Phase.TRANSFERRING, "vdb stored", disk="vdb")
    status = ctx.sink.get("default", "par")
    types = {c["type"]: c for c in status["conditions"]}
    assert types["Transferred"]["status"] == "True"
    assert "Transferring" not in types  # the in-progress condition is gone once every disk is done
    assert types["Converting"]["status"] == "True"
    assert status["phase"] == "Converting"
