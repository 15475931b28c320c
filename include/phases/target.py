"""The target side: Converting (on arrival, when the plan says so), Importing, Creating and
ValidatingTarget."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from include import diskio, safefs
from include import status as st
from include.diskio import Segment, hash_segments
from include.errors import ChecksumError, InvalidMigration, TargetValidationError
from include.model import Conversion
from include.phases.bookkeeping import begin, finish
from include.phases.context import MigrationContext
from include.phases.staging import convert, discard, ensure_space, seal, space_errors
from include.phases.transfer import stored_manifest, verified_segments
from include.providers.session import VMHandle
from include.status import Phase


def convert_disk(ctx: MigrationContext, disk: str) -> dict[str, Any]:
    """Converting: on arrival, turn a compact transit image into the target format (when they differ)."""
    d = ctx.disk_plan(disk)
    begin(ctx, Phase.CONVERTING, disk=disk, message=f"Converting disk {disk}")
    if d.conversion is not Conversion.TARGET:
        why = "converted before upload" if d.conversion is Conversion.SOURCE else "formats match"
        ctx.record(disk, converted_path=None)
        finish(ctx, Phase.CONVERTING, f"Disk {disk}: no conversion needed on arrival ({why}, "
                                      f"{d.transit_format} -> {d.target_format})", disk=disk)
        return {"disk": disk, "converted": False}
    manifest = stored_manifest(ctx, disk)
    # qemu-img reads a share's file in place, unless it is stored compressed or as data extents
    local = None if manifest.extents is not None or manifest.compression else ctx.storage.local_path(d.object_key)
    fetched = None
    staging = ctx.staging
    ensure_space(staging, d.size_bytes if d.target_format == "raw" else d.allocated_bytes, disk)
    into: str | None = None
    out: Path | None = None
    try:
        tracker = ctx.progress(Phase.CONVERTING, disk, None, "verifying")
        if local is None:  # object storage: fetch it once, verifying on the way
            fetched = staging / f"{disk}.download.{d.transit_format}"
            with space_errors(disk, fetched), safefs.create_private(fetched) as fh:
                diskio.write_segments(verified_segments(ctx, disk, manifest), fh, tracker)
            local = fetched
        else:
            for seg in verified_segments(ctx, disk, manifest):
                tracker.add_segment(seg)
        tracker.finish()
        # into the target volume when its file is here and writable, else into staging for Importing
        into = ctx.target_session.prepare_disk(d) if ctx.target_session.writes_in_place(d) else None
        out = Path(into) if into else staging / f"{disk}.converted.{d.target_format}"
        with space_errors(disk, out):
            convert(ctx, Phase.CONVERTING, disk, local, d.transit_format, out, d.target_format,
                    into_existing=into is not None)
        converted_sha = None if into else seal(out)  # Importing imports exactly this file
    except BaseException:
        if not into:
            discard(out)
        raise
    finally:
        discard(fetched)
    # Written straight into the target volume when it is on this host: no second temporary copy.
    ctx.record(disk, converted_path=None if into else str(out), converted_into=into, converted_sha256=converted_sha)
    finish(ctx, Phase.CONVERTING, f"Disk {disk} verified and converted {d.transit_format} -> {d.target_format}",
           disk=disk)
    return {"disk": disk, "converted": True}


def import_disk(ctx: MigrationContext, disk: str) -> dict[str, Any]:
    """Importing: write the disk into the target storage, verifying its sha256 on the way."""
    d = ctx.disk_plan(disk)
    rec = ctx.disk_record(disk)
    begin(ctx, Phase.IMPORTING, disk=disk, message=f"Importing disk {disk}")
    pool, volume = d.target_storage, d.target_volume
    hasher = hashlib.sha256()
    expected: str | None = None
    if rec.converted_into:
        # Converting already wrote the volume in place from bytes verified against the manifest; reading
        # it back to hash it again would only repeat that work.
        length = Path(rec.converted_into).stat().st_size
        tracker = ctx.progress(Phase.IMPORTING, disk, None, "importing")
        tracker.add(tracker.total)
    else:
        if rec.converted_path:
            path = Path(rec.converted_path)
            if path.parent != ctx.staging:
                raise InvalidMigration(f"disk {disk}: the converted image {path} is not in this migration's staging "
                                       f"folder on this host; run Converting again")
            safefs.check_private_file(path)
            length = path.stat().st_size
            segments: Iterator[Segment] = diskio.file_segments(path)
        else:
            manifest = stored_manifest(ctx, disk)
            length, expected = manifest.size, manifest.sha256
            segments = verified_segments(ctx, disk, manifest)
        tracker = ctx.progress(Phase.IMPORTING, disk, None, "importing")

        def counted() -> Iterator[Segment]:
            # reading and verifying run in the prefetch thread, writing to the target here; a stream
            # verified against its manifest is not hashed a second time
            stream = diskio.prefetched(segments)
            for seg in (stream if expected else hash_segments(stream, hasher)):
                tracker.add_segment(seg)
                yield seg
            # checked before the stream ends, so that a target writing through a lease or a transaction
            # aborts it rather than committing a corrupt disk
            if rec.converted_sha256 and hasher.hexdigest() != rec.converted_sha256:
                raise ChecksumError(f"disk {disk}: the converted image {rec.converted_path} has sha256 "
                                    f"{hasher.hexdigest()}, but Converting wrote {rec.converted_sha256}: it "
                                    f"changed in staging; run the migration again")

        try:
            ctx.target_session.import_disk(d, counted(), length, sha256=expected or rec.converted_sha256)
        except ChecksumError:
            ctx.target_session.discard_disk(d)
            raise
    tracker.finish()
    ctx.target_session.finish_disk(d)
    target_sha = None if rec.converted_into else (expected or hasher.hexdigest())
    ctx.record(disk, imported=True, target_sha256=target_sha, target_bytes=length)
    if rec.converted_path:
        discard(Path(rec.converted_path))

    def mutate(s: dict[str, Any]) -> None:
        entry = st.disk_entry(s, disk)
        entry["targetVolume"] = f"{pool}/{volume}"
        if target_sha:
            entry["targetSha256"] = target_sha
        # every way in was checked: against the manifest on the way (here, or at Converting for a volume
        # converted in place), or against the sha256 Converting sealed its output with
        entry["checksum"] = st.CHECKSUM_VERIFIED

    ctx.update_status(mutate)
    check = "sha256 verified" if expected else ("converted in place" if rec.converted_into
                                                else "converted image written")
    finish(ctx, Phase.IMPORTING, f"Disk {disk} imported into {pool}/{volume} ({check})", disk=disk)
    return {"disk": disk, "volume": f"{pool}/{volume}"}


def create_vm(ctx: MigrationContext) -> dict[str, Any]:
    begin(ctx, Phase.CREATING, message="Creating VM on target provider")
    tgt = ctx.plan.target
    missing = [d.name for d in ctx.plan.disks if not ctx.disk_record(d.name).imported]
    if missing:
        raise InvalidMigration(f"disks {', '.join(missing)} were not imported in this run; refusing to create a VM "
                               f"without them")
    handle = ctx.target_session.commit(ctx.plan.disks)
    # the VM's id is run state: ValidatingTarget checks this VM, not whichever VM has the name now
    ctx.store.update_run_record(ctx.namespace, ctx.name, targetVm={"id": handle.id, "name": handle.name,
                                                                   "run": ctx.ledger.run()})
    ctx.update_status(lambda s: s.__setitem__("targetVM", handle.name))
    finish(ctx, Phase.CREATING, f"VM {handle.name} defined on {tgt.provider} with {tgt.vcpus} vCPU, "
                                f"{tgt.memory_mib} MiB and {len(ctx.plan.disks)} disks")
    return {"vm": handle.name, "id": handle.id}


def committed_vm(ctx: MigrationContext) -> VMHandle:
    """The VM Creating committed in this run (from the run state; for a run that Created before the id
    was kept there, the VM its ledger records under the planned name)."""
    record = ctx.store.run_record(ctx.namespace, ctx.name)
    recorded = record.get("targetVm")
    if not isinstance(recorded, dict) or recorded.get("run") != ctx.ledger.run() or not recorded.get("id"):
        entry = ctx.ledger.find("vm", ctx.scope_target, name=ctx.plan.target.vm)
        if entry is not None and entry.ident.get("id") and "targetVm" not in record:
            return VMHandle(id=str(entry.ident["id"]), name=ctx.plan.target.vm)
        raise InvalidMigration(f"no target VM was created in this run of {ctx.namespace}/{ctx.name}: run the "
                               f"Creating phase first (task create_vm)")
    return VMHandle(id=str(recorded["id"]), name=str(recorded["name"]))


def validate_target(ctx: MigrationContext) -> dict[str, Any]:
    begin(ctx, Phase.VALIDATING_TARGET, message="Validating target VM")
    tgt = ctx.plan.target
    handle = committed_vm(ctx)
    desc = ctx.target.describe_vm(handle.id)
    problems = []
    if desc.vcpus != tgt.vcpus:
        problems.append(f"vcpus {desc.vcpus} != {tgt.vcpus}")
    if desc.memory_mib != tgt.memory_mib:
        problems.append(f"memory {desc.memory_mib} MiB != {tgt.memory_mib} MiB")
    by_name = {d.name: d for d in desc.disks}
    for d in ctx.plan.disks:
        got = by_name.get(d.name)
        if got is None:
            problems.append(f"disk {d.name} missing")
            continue
        if not ctx.target.format_matches(d.target_format, got.format):
            problems.append(f"disk {d.name} format {got.format} != {d.target_format}")
        if got.capacity != d.target_capacity:
            problems.append(f"disk {d.name} size {got.capacity} != {d.target_capacity}")
        if ctx.target.local_disk_path(got):
            try:
                diskio.check(got.path, got.format)
            except diskio.QemuImgError as err:
                problems.append(str(err))
    models = [tgt.nic_models[i] if i < len(tgt.nic_models) else ctx.target.nic_model(None)
              for i in range(len(tgt.networks))]
    wanted = [(n.bridge, n.network, m) for n, m in zip(tgt.networks, models)]
    have = [(i.bridge, i.network, i.model) for i in desc.interfaces]
    if wanted != have:
        problems.append(f"interfaces {have} != {wanted}")
    if problems:
        raise TargetValidationError(f"target VM {tgt.vm} does not match the plan: " + "; ".join(problems))
    booted = boot_check(ctx, handle)
    ctx.store.update_run_record(ctx.namespace, ctx.name, targetValidated=ctx.ledger.run())
    finish(ctx, Phase.VALIDATING_TARGET, f"Target VM {tgt.vm} matches the plan (cpu, memory, "
                                         f"{len(ctx.plan.disks)} disks, networks){booted}")
    return {"vm": tgt.vm}


def boot_check(ctx: MigrationContext, handle: VMHandle) -> str:
    """The opt-in boot check: the migrated VM booted once, NIC links down; what it showed, for the condition.
    A target that cannot be booted from here is reported as not checked, never as passed."""
    check = ctx.plan.boot_check
    if check is None:
        return ""
    what = (f"marker {check.marker!r} on its serial console" if check.mode == "serial"
            else "answer from its guest agent")
    refusal = ctx.target.boot_check_refusal()
    if refusal:
        ctx.logger.warning("boot check not performed: %s", refusal)
        ctx.update_status(lambda s: s.__setitem__("bootCheck", {"mode": check.mode, "result": "NotPerformed",
                                                                "message": refusal}))
        return f"; boot check NOT performed: {refusal}"
    ctx.logger.info("boot check: starting %s once with its NIC links down, waiting up to %g s for a %s",
                    handle.name, check.timeout, what)
    result = ctx.target.boot_check(handle.id, mode=check.mode, marker=check.marker, timeout=check.timeout)
    info = {"mode": check.mode, "result": "Passed" if result.passed else "Failed", "seconds": result.seconds,
            "seen": result.seen}
    ctx.update_status(lambda s: s.__setitem__("bootCheck", info))
    if result.output:
        ctx.logger.info("boot check: last lines of the serial console:\n%s", result.output)
    if not result.passed:
        raise TargetValidationError(
            f"boot check failed: VM {handle.name} showed no {what} within {check.timeout:g} s; last lines of its "
            f"serial console: {result.output or '(nothing)'}")
    return f"; booted in {result.seconds:g} s ({result.seen!r} seen, NIC links down, powered off again)"
