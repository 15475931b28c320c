"""The source side: Snapshotting, and Exporting (making each disk readable in its transit format,
converting on this host only when the plan says so)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from include import diskio, safefs
from include.errors import Conflict, InvalidMigration, PlanChanged, UnsupportedDiskFormat
from include.model import Conversion, ExportMode
from include.phases.bookkeeping import begin, finish
from include.phases.checks import (
    ensure_same_source,
    ensure_source_stable,
    local_source_path,
    point_in_time,
    source_stream,
)
from include.phases.context import MigrationContext, host_scope
from include.phases.staging import convert, discard, ensure_space, seal, space_errors
from include.plan import live_root
from include.providers.base import DiskInfo
from include.status import Phase


def snapshot(ctx: MigrationContext) -> dict[str, Any]:
    begin(ctx, Phase.SNAPSHOTTING, message="Creating source VM snapshot")
    snap, src = ctx.plan.snapshot, ctx.plan.source
    disks = [d.source_disk() for d in ctx.plan.disks]
    ensure_same_source(ctx)
    if snap.live:
        return _point_in_time(ctx, disks)
    if ctx.source.get_vm(src.vm).running:
        raise InvalidMigration(f"VM {src.vm} was started after Validating; shut it down", field="spec.sourceName")
    ident = {"vm": src.vm_id, "name": snap.name}
    existed = ctx.source.has_snapshot(src.vm, snap.name)
    owned = ctx.ledger.find("snapshot", ctx.scope_source, **ident)
    if existed and ctx.source.exports_from_snapshot:
        # the disks are read from the snapshot itself: one left by an earlier run (kept for its rollback) or by a
        # killed try would hand over the disks as they were then; this run takes its own
        if owned is None:
            raise Conflict(f"VM {src.vm} already has a snapshot named {snap.name!r} that this migration did not "
                           f"take; its disks would be exported as they were then: remove or rename it",
                           field="spec.sourceName")
        ctx.logger.info("removing snapshot %s of an earlier try, to take this run's", snap.name)
        ctx.source.delete_snapshot(src.vm, snap.name)
        ctx.ledger.forget(owned)
        existed = False
    # a snapshot that appears between this check and the create makes the create fail (and the retry
    # finds it existing, not ours): it is never recorded as made by this migration
    covered = ctx.source.create_snapshot(src.vm, snap.name, disks, exists_ok=existed)
    if covered and not existed:
        # only a snapshot this migration made is ever deleted by it
        ctx.ledger.record("snapshot", ctx.scope_source, **ident)
    elif covered and not ctx.ledger.owns("snapshot", ctx.scope_source, **ident):
        ctx.logger.warning("snapshot %s already existed and was not made by this migration: it will be kept",
                           snap.name)
    if covered:
        message = f"Snapshot {snap.name} of {', '.join(covered)} created"
    else:
        message = ("No snapshot: the source hypervisor cannot snapshot these disks (libvirt: only when every disk is "
                   "qcow2); the VM is shut off, so its disks are stable, and Exporting checks that it stays off")
    for d in disks:
        if d.name not in covered:
            ctx.logger.warning("disk %s (%s) is not covered by the snapshot", d.name, d.format)

    def mutate(s: dict[str, Any]) -> None:
        s["snapshot"] = snap.name if covered else None
        s.pop("pointInTime", None)  # an earlier run's, of a VM that was running then
        s.pop("bootCheck", None)

    ctx.update_status(mutate)
    finish(ctx, Phase.SNAPSHOTTING, message)
    return {"snapshot": snap.name if covered else None, "disks": covered}


def _live_folder(ctx: MigrationContext) -> Path:
    """A fresh folder of this run for the point in time's socket and scratch files: ours, 0711 (QEMU's user
    passes through to its own 0700 folder inside, nobody can list it), recorded in the ledger."""
    base = live_root()
    if not os.path.lexists(base):
        os.makedirs(base, mode=0o711)  # made here: QEMU's user must pass through it (ensure_base would 0700 it)
    safefs.ensure_base(base)
    # a short name: the socket inside must fit a unix socket path (107 bytes) whatever the migration is called
    path = Path(tempfile.mkdtemp(prefix="vmm-", dir=base))
    os.chmod(path, 0o711)
    ctx.ledger.record("dir", host_scope(), role="live", path=str(path))
    return path


def _point_in_time(ctx: MigrationContext, disks: list[DiskInfo]) -> dict[str, Any]:
    """Snapshotting a running VM: every disk held at one instant while the VM keeps running."""
    src = ctx.plan.source
    if not ctx.source.get_vm(src.vm).running:
        raise PlanChanged(f"VM {src.vm} was running at Validating and is shut off now; run the migration again "
                          f"(a shut-off VM is exported from its own snapshot)", field="spec.sourceName")
    held = point_in_time(ctx)
    if held is not None and ctx.source.point_in_time_active(src.vm, held.ident["handle"]):
        info = ctx.store.run_record(ctx.namespace, ctx.name).get("pointInTime") or {}
        message = f"Point in time of {', '.join(d.name for d in disks)} already held since {info.get('takenAt')}"
        finish(ctx, Phase.SNAPSHOTTING, message)
        return {"snapshot": None, "disks": [d.name for d in disks], "pointInTime": info}
    # anything left (lost, or started by a task killed before it recorded it as taken) ends first: a new
    # instant for every disk, never for some only; what earlier disks stored from the old one is void
    end_point_in_time(ctx)
    for d in ctx.plan.disks:
        ctx.record(d.name, export_mode=None, transit_sha256=None)
    folder = _live_folder(ctx)
    handle = ctx.source.point_in_time_handle(str(folder))
    # recorded before it exists: a failure, a retry or a kill at any point has it ended through the ledger
    ctx.ledger.record("point-in-time", ctx.scope_source, state="creating", vm=src.vm_id, handle=handle)
    pit = ctx.source.begin_point_in_time(src.vm, disks, str(folder))
    ctx.ledger.record("point-in-time", ctx.scope_source, vm=src.vm_id, handle=pit.handle)
    info = {"takenAt": pit.taken_at, "consistency": pit.consistency, "detail": pit.detail,
            "disks": list(pit.disks)}
    ctx.store.update_run_record(ctx.namespace, ctx.name, pointInTime=info)

    def mutate(s: dict[str, Any]) -> None:
        s["snapshot"] = None
        s["pointInTime"] = info
        s.pop("bootCheck", None)

    ctx.update_status(mutate)
    message = (f"Point in time of {', '.join(pit.disks)} taken at {pit.taken_at} while VM {src.vm} keeps running: "
               f"{pit.consistency} ({pit.detail})")
    finish(ctx, Phase.SNAPSHOTTING, message)
    return {"snapshot": None, "disks": list(pit.disks), "pointInTime": info}


def end_point_in_time(ctx: MigrationContext) -> list[str]:
    """End this run's point in time (if still held) and remove its folder; what was ended."""
    done = []
    for entry in ctx.ledger.entries("point-in-time"):
        if entry.scope != ctx.scope_source:
            continue
        ensure_same_source(ctx)  # the job is looked up on the VM of that name: it must be the VM validated
        if entry.state == "creating":  # its task died while taking it: the guest may still be frozen
            thawed = ctx.source.recover_point_in_time(ctx.plan.source.vm, entry.ident["handle"])
            if thawed:
                ctx.logger.warning("%s", thawed)
                done.append(thawed)
        if ctx.source.end_point_in_time(ctx.plan.source.vm, entry.ident["handle"]):
            done.append(f"point-in-time export of VM {ctx.plan.source.vm}")
        ctx.ledger.forget(entry)  # reached only when it is ended or gone (errors propagate, the entry stays)
    here = host_scope()
    for entry in ctx.ledger.entries("dir"):
        if entry.scope == here and entry.ident.get("role") == "live":
            path = Path(entry.ident["path"])
            if _own_live_folder(path):
                shutil.rmtree(path, onerror=_gone_ok)  # a parallel task may be removing it too
                done.append(f"point-in-time folder {path}")
            ctx.ledger.forget(entry)
    return done


def _gone_ok(func: Any, path: str, exc_info: Any) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def _own_live_folder(path: Path) -> bool:
    try:
        st_ = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st_.st_mode) and st_.st_uid == os.geteuid() and stat.S_IMODE(st_.st_mode) == 0o711


def export_disk(ctx: MigrationContext, disk: str) -> dict[str, Any]:
    """Exporting: make the disk readable in its transit format, converting here when the plan says so
    (a raw source, or a compact one bound for raw, which is read in place as guest data)."""
    d = ctx.disk_plan(disk)
    begin(ctx, Phase.EXPORTING, disk=disk, message=f"Exporting disk {disk}")
    held = ensure_source_stable(ctx)
    if held is not None:
        _segments, size, data = ctx.source.read_point_in_time(held.ident["handle"], d.source_disk())
        _segments.close()  # type: ignore[attr-defined]
        ctx.record(disk, export_mode=ExportMode.POINT_IN_TIME, export_path=None, export_format=d.transit_format,
                   export_bytes=data)
        what = "raw guest data" if d.transit_format == "raw" else f"a {d.transit_format} stream"
        finish(ctx, Phase.EXPORTING, f"Disk {disk} exported live from the point in time as {what} "
                                     f"({data} bytes of data in {size} bytes)", disk=disk)
        return {"disk": disk, "staged": False}
    if d.conversion is not Conversion.SOURCE:
        # The disk travels in its own format: it is streamed straight from the provider by Transferring.
        ctx.record(disk, export_mode=ExportMode.STREAM, export_path=None, export_format=d.source_format,
                   export_bytes=d.allocated_bytes)
        message = f"Disk {disk} exported as a {d.source_format} stream from {d.source_pool}/{d.source_volume}"
        finish(ctx, Phase.EXPORTING, message, disk=disk)
        return {"disk": disk, "staged": False}
    local = local_source_path(ctx, d)
    if d.transit_format == "raw" and local is not None:
        try:
            extents = diskio.guest_extents(local, d.source_format)
        except diskio.UnsafeImage as err:
            raise UnsupportedDiskFormat(f"disk {disk}: {err}", field="spec.sourceName") from err
        if diskio.readable_in_place(extents):
            # Transferring reads the guest data straight from the file through its map: no staging copy
            data = sum(int(e["length"]) for e in extents if e.get("data") and not e.get("zero"))
            ctx.record(disk, export_mode=ExportMode.MAP, export_path=None, export_format="raw", export_bytes=data)
            finish(ctx, Phase.EXPORTING, f"Disk {disk} exported as its guest data ({d.source_format} -> raw "
                                         f"read in place, {data} bytes of data)", disk=disk)
            return {"disk": disk, "staged": False}
    staging = ctx.staging
    staged = staging / f"{disk}.export.{d.transit_format}"
    ensure_space(staging, d.allocated_bytes, disk)
    fetched = None
    try:
        if local is None:  # remote provider: fetch the disk once (sparse), then convert here
            fetched = staging / f"{disk}.export.src.{d.source_format}"
            tracker = ctx.progress(Phase.EXPORTING, disk, None, "exporting")
            with space_errors(disk, fetched), safefs.create_private(fetched) as fh:
                diskio.write_segments(source_stream(ctx, d), fh, tracker)
            tracker.finish()
            local = fetched
        with space_errors(disk, staged):
            convert(ctx, Phase.EXPORTING, disk, local, d.source_format, staged, d.transit_format)
        staged_sha = seal(staged)  # Transferring uploads exactly this file
    except BaseException:
        discard(staged)
        raise
    finally:
        discard(fetched)
    ctx.record(disk, export_mode=ExportMode.STAGED, export_path=str(staged), export_format=d.transit_format,
               export_bytes=staged.stat().st_size, export_sha256=staged_sha)
    finish(ctx, Phase.EXPORTING, f"Disk {disk} exported and converted {d.source_format} -> {d.transit_format}",
           disk=disk)
    return {"disk": disk, "staged": True}
