"""Checks several phases make before they touch something: the source is still the VM validated and
still shut off, an intermediate object is free to write, and where a source disk can be read."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from include.diskio import Segment
from include.errors import Conflict, InvalidMigration, PlanChanged
from include.ledger import Entry
from include.model import DiskPlan
from include.phases.context import MigrationContext
from include.storage.base import MANIFEST_SUFFIX


def ensure_object_key_free(ctx: MigrationContext, key: str, scope: str) -> None:
    """Conflict when the object (or its manifest) exists and this migration did not write it."""
    if (ctx.storage.exists(key) or ctx.storage.exists(key + MANIFEST_SUFFIX)) and \
            not ctx.ledger.owns("object", scope, key=key):
        raise Conflict(f"{ctx.storage.location(key)} already exists in the intermediate storage and was not "
                       f"written by this migration; it is never overwritten", field="spec.storage")


def ensure_same_source(ctx: MigrationContext) -> None:
    """The source VM is still the one validated (same unique id), not another VM given its name."""
    want = ctx.plan.source.vm_id
    have = ctx.source.vm_id(ctx.plan.source.vm)
    if want and have != want:
        raise PlanChanged(f"VM {ctx.plan.source.vm} on the source is not the VM validated (id {have}, "
                          f"validated {want})", field="spec.sourceName")


def ensure_source_off(ctx: MigrationContext) -> None:
    """Cold migration: the source must stay shut off while its disks are read."""
    if ctx.source.get_vm(ctx.plan.source.vm).running:
        raise InvalidMigration(f"VM {ctx.plan.source.vm} was started during the migration; its disks are no "
                               f"longer stable: shut it down and run the migration again", field="spec.sourceName")


def point_in_time(ctx: MigrationContext) -> Entry | None:
    """This run's point in time of the running source (its ledger entry), if Snapshotting took one."""
    for entry in ctx.ledger.entries("point-in-time"):
        if entry.scope == ctx.scope_source and entry.ident.get("vm") == ctx.plan.source.vm_id \
                and entry.state == "created":
            return entry
    return None


def ensure_source_stable(ctx: MigrationContext) -> Entry | None:
    """The disks being read do not move: a shut-off VM is still off; a running VM's point in time is still
    held (returned). A point in time lost midway is never replaced by a new one for some disks only."""
    if not ctx.plan.snapshot.live:
        ensure_source_off(ctx)
        return None
    entry = point_in_time(ctx)
    if entry is None or not ctx.source.point_in_time_active(ctx.plan.source.vm, entry.ident["handle"]):
        raise InvalidMigration(f"the point in time of VM {ctx.plan.source.vm} taken at Snapshotting is no longer "
                               f"held (the VM stopped, libvirtd restarted or its job was aborted); every disk must "
                               f"come from one instant: run the migration again", field="spec.sourceName")
    return entry


def local_source_path(ctx: MigrationContext, disk: DiskPlan) -> Path | None:
    """The disk's file when the source hypervisor keeps it on this host, for qemu-img to read."""
    path = ctx.source.local_disk_path(disk.source_disk())
    return Path(path) if path else None


def source_stream(ctx: MigrationContext, disk: DiskPlan) -> Iterator[Segment]:
    """The disk's bytes through the source driver, from the run's snapshot where it covers the disk."""
    snap = ctx.plan.snapshot
    return ctx.source.read_disk(disk.source_disk(), vm=ctx.plan.source.vm,
                                snapshot=snap.name if disk.name in snap.disks and not snap.live else None)


def source_file_size(ctx: MigrationContext, disk: DiskPlan) -> int:
    """Length of the byte stream a volume download yields (its file size on the provider)."""
    local = local_source_path(ctx, disk)
    if local is not None:
        return local.stat().st_size
    return max(disk.allocated_bytes, 1)


def stat_key(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    st_ = os.stat(path)
    return st_.st_mtime_ns, st_.st_size
