"""Transferring: stream each disk's export into intermediate storage through the byte path
(``include.bytepath``), hashing every byte once, holes never sent."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from include import diskio, safefs
from include import status as st
from include.bytepath import Encoder, Manifest, decode
from include.diskio import Segment
from include.errors import ChecksumError, InvalidMigration
from include.ledger import Entry
from include.model import DiskRecord, ExportMode
from include.phases.bookkeeping import begin, finish
from include.phases.checks import (
    ensure_object_key_free,
    ensure_source_stable,
    local_source_path,
    source_file_size,
    source_stream,
    stat_key,
)
from include.phases.context import READ_CHUNK, MigrationContext
from include.phases.source import end_point_in_time
from include.status import Phase


def _export_stream(ctx: MigrationContext, disk: str, rec: DiskRecord,
                   held: Entry | None) -> tuple[Iterator[Segment], int, Path | None]:
    """(the disk's export as segments, its length, a local source file to check unchanged afterwards);
    ``held``: the running source's point in time, which every disk of a live plan is read from."""
    d = ctx.disk_plan(disk)
    if held is not None:
        segments, size, _data = ctx.source.read_point_in_time(held.ident["handle"], d.source_disk())
        return segments, size, None
    if rec.export_mode is ExportMode.STAGED:
        staged = Path(rec.export_path or "")
        if staged.parent != ctx.staging:
            raise InvalidMigration(f"disk {disk}: the staged export {staged} is not in this migration's staging "
                                   f"folder on this host; run Exporting again")
        safefs.check_private_file(staged)
        return diskio.file_segments(staged, chunk=READ_CHUNK), staged.stat().st_size, None
    local = local_source_path(ctx, d)
    if rec.export_mode is ExportMode.MAP and local is not None:
        return diskio.guest_segments(local, d.source_format, chunk=READ_CHUNK), d.size_bytes, local
    if local is not None:  # on this host the (shut-off) disk's file is read directly
        return diskio.file_segments(local, chunk=READ_CHUNK), source_file_size(ctx, d), local
    # elsewhere through the driver's stream
    return source_stream(ctx, d), source_file_size(ctx, d), None


def transfer_disk(ctx: MigrationContext, disk: str) -> dict[str, Any]:
    d = ctx.disk_plan(disk)
    rec = ctx.disk_record(disk)
    begin(ctx, Phase.TRANSFERRING, disk=disk, message=f"Uploading disk {disk}")
    held = ensure_source_stable(ctx)
    source, total, watched = _export_stream(ctx, disk, rec, held)
    key = d.object_key
    # the data that moves: what Exporting counted (the guest data read in place, the staged file), else the plan's
    tracker = ctx.progress(Phase.TRANSFERRING, disk, rec.export_bytes or None, "uploading")
    before = stat_key(watched)
    ensure_object_key_free(ctx, key, ctx.scope_storage)
    # recorded before the first byte goes out: a half-written upload (a part file, a multipart upload)
    # is this migration's to resume or remove
    ctx.ledger.record("object", ctx.scope_storage, state="creating", key=key)
    encoder = Encoder(keep_holes=ctx.storage.supports_holes, compression=ctx.plan.storage.compression)
    try:
        # size the upload by the larger of the allocated and the file size (allocation may be compressed)
        with ctx.storage.open_writer(key, size_hint=max(rec.export_bytes or 0, total)) as writer:
            # reading (prefetch thread), hashing (here) and uploading (the backend's part threads) overlap
            for seg in encoder.encode(_counted(diskio.prefetched(source), tracker)):
                writer.write(seg)
            # the disk must not have changed while it was read: still shut off and its file untouched, or
            # its point in time still held
            ensure_source_stable(ctx)
            if stat_key(watched) != before:
                raise InvalidMigration(f"disk {disk} changed while it was read ({watched}); run the migration "
                                       f"again with the VM shut off", field="spec.sourceName")
            if rec.export_sha256 and encoder.sha256 != rec.export_sha256:
                raise ChecksumError(f"disk {disk}: the staged export {rec.export_path} has sha256 {encoder.sha256}, "
                                    f"but Exporting wrote {rec.export_sha256}: it changed in staging; run the "
                                    f"migration again")
            writer.commit()
            resumed = int(getattr(writer, "reused", 0))
        tracker.finish()
        manifest = encoder.manifest(disk=disk, fmt=d.transit_format, virtual_size=d.size_bytes,
                                    migration=ctx.plan.migration)
        ctx.storage.put_manifest(key, manifest.to_dict())
    finally:
        # folders made on the share are ours whether the upload went through or not
        for folder in ctx.storage.created_dirs:
            ctx.ledger.record("dir", ctx.scope_storage, key=folder)
    ctx.ledger.record("object", ctx.scope_storage, key=key)
    digest, written, stored = manifest.sha256, manifest.size, manifest.stored_bytes
    ctx.record(disk, object_key=key, transit_sha256=digest, transit_bytes=written, sent_bytes=stored,
               resumed_bytes=resumed)
    if rec.export_mode is ExportMode.STAGED and rec.export_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rec.export_path)

    def mutate(s: dict[str, Any]) -> None:
        entry = st.disk_entry(s, disk)
        entry["sha256"] = digest
        entry["transitBytes"] = written
        entry["sentBytes"] = stored

    ctx.update_status(mutate)
    if ctx.plan.snapshot.live and all(ctx.disk_record(p.name).transit_sha256 for p in ctx.plan.disks):
        # every disk is stored: the running source is released now rather than at cleanup (its scratch
        # files grow with every block the guest overwrites)
        try:
            for item in end_point_in_time(ctx):
                ctx.logger.info("released %s", item)
        except Exception:  # noqa: BLE001 - the disk is stored; cleanup ends the point in time in any case
            ctx.logger.warning("releasing the point in time failed; cleanup ends it", exc_info=True)
    finish(ctx, Phase.TRANSFERRING, f"Disk {disk} stored at {ctx.storage.location(key)} "
                                    f"({written} bytes, sha256 {digest[:12]}...)", disk=disk)
    return {"disk": disk, "sha256": digest, "bytes": written}


def _counted(segments: Iterator[Segment], tracker: diskio.ProgressTracker) -> Iterator[Segment]:
    for seg in segments:
        yield seg
        tracker.add_segment(seg)


def stored_manifest(ctx: MigrationContext, disk: str) -> Manifest:
    """The disk's manifest (read once per phase), checked against what Transferring computed."""
    d = ctx.disk_plan(disk)
    where = ctx.storage.location(d.object_key)
    manifest = Manifest.from_dict(ctx.storage.get_manifest(d.object_key), disk=disk, where=where)
    recorded = ctx.disk_record(disk).transit_sha256
    if recorded and recorded != manifest.sha256:
        raise ChecksumError(f"disk {disk}: the manifest's sha256 differs from the one computed on upload")
    return manifest


def verified_segments(ctx: MigrationContext, disk: str, manifest: Manifest) -> Iterator[Segment]:
    """The stored object's logical segments; a ChecksumError at the end unless they hash to the manifest's."""
    key = ctx.disk_plan(disk).object_key
    # a generator: the object is opened when the first segment is asked for, never before
    yield from decode(ctx.storage.read(key), manifest, where=f"disk {disk}: the object {ctx.storage.location(key)}")
