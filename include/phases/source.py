"""The source side: Snapshotting, and Exporting (making each disk readable in its transit format,
converting on this host only when the plan says so)."""

from __future__ import annotations

from typing import Any

from include import diskio, safefs
from include.errors import InvalidMigration, UnsupportedDiskFormat
from include.model import Conversion, ExportMode
from include.phases.bookkeeping import begin, finish
from include.phases.checks import ensure_same_source, ensure_source_off, local_source_path, source_file_size
from include.phases.context import MigrationContext
from include.phases.staging import convert, discard, ensure_space, seal, space_errors
from include.status import Phase


def snapshot(ctx: MigrationContext) -> dict[str, Any]:
    begin(ctx, Phase.SNAPSHOTTING, message="Creating source VM snapshot")
    snap, src = ctx.plan.snapshot, ctx.plan.source
    disks = [d.source_disk() for d in ctx.plan.disks]
    ensure_same_source(ctx)
    if ctx.source.get_vm(src.vm).running:
        raise InvalidMigration(f"VM {src.vm} was started after Validating; shut it down", field="spec.sourceName")
    ident = {"vm": src.vm_id, "name": snap.name}
    existed = ctx.source.has_snapshot(src.vm, snap.name)
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
    ctx.update_status(lambda s: s.__setitem__("snapshot", snap.name if covered else None))
    finish(ctx, Phase.SNAPSHOTTING, message)
    return {"snapshot": snap.name if covered else None, "disks": covered}


def export_disk(ctx: MigrationContext, disk: str) -> dict[str, Any]:
    """Exporting: make the disk readable in its transit format, converting here when the plan says so
    (a raw source, or a compact one bound for raw, which is read in place as guest data)."""
    d = ctx.disk_plan(disk)
    begin(ctx, Phase.EXPORTING, disk=disk, message=f"Exporting disk {disk}")
    ensure_source_off(ctx)
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
            tracker = ctx.progress(Phase.EXPORTING, disk, source_file_size(ctx, d), "exporting")
            with space_errors(disk, fetched), safefs.create_private(fetched) as fh:
                diskio.write_segments(ctx.source.read_disk(d.source_disk()), fh, tracker)
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
