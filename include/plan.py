"""Planning: from a resolved VMMigration and the source VM's disks to what a run will do.

The plan is a JSON document saved in the spec store by Validating. Every later phase reads it
back from there (not from XCom), which is what lets ``airflow tasks test`` run any one phase.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from include.bootcheck import boot_check_from, delete_running_from
from include.compression import codec_from
from include.errors import InvalidMigration
from include.inventory import Resolved
from include.model import CleanupPlan, Conversion, DiskPlan, Plan, SnapshotPlan, SourcePlan, StoragePlan, TargetPlan
from include.providers.base import HypervisorDriver, NicInfo, VMInfo
from include.registry import native_format, provider
from include.status import Phase, human_bytes
from include.store import dag_id_for

STAGING_ENV = "VMMIGRATION_STAGING"
LIVE_ENV = "VMMIGRATION_LIVE_DIR"
#: targetResourceHints.disk is in GiB (the guide writes GB; one unit system, IEC, across the engine)
GIB = 1024**3


def staging_root() -> Path:
    """Local scratch space for conversions (the guide: "/tmp should have space for largest disk").

    Each migration stages in a private folder of fresh, unpredictable name made inside it (0700), never
    in a predictable path another user could create first (``include.safefs``)."""
    return Path(os.environ.get(STAGING_ENV) or tempfile.gettempdir())


def live_root() -> Path:
    """Where a running source's point in time keeps its NBD socket and scratch files (the blocks the guest
    overwrites while its disks are read): a folder QEMU's user can pass through, with room for what the
    guest writes during the copy. Default: the staging root."""
    return Path(os.environ.get(LIVE_ENV) or staging_root())


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def effective_storage_endpoint(resolved: Resolved) -> str | None:
    """The storage endpoint the backends will use: an S3 Secret's ``endpoint`` key wins over the spec's."""
    creds = resolved.storage_credentials
    from_secret = creds.first("endpoint") if creds is not None else None
    return from_secret or resolved.migration.spec.storage.endpoint


def _provider_settings(provider: Any) -> list[Any]:
    """What else of a Provider a driver acts on: TLS verification, placement defaults, the engine's annotations
    (a Provider edited mid-run must not move the VM elsewhere or turn verification off)."""
    notes = {k: v for k, v in sorted((provider.annotations or {}).items()) if k.startswith("vmmigration.")}
    return [bool(provider.insecure_skip_verify), dict(sorted((provider.defaults or {}).items())), notes]


def pin_of(resolved: Resolved) -> dict[str, str]:
    """What a run is pinned to: digests of the spec (and the annotations the engine reads), both
    providers' type, endpoint and settings, and where the storage is (its block, plus the endpoint and proxy a
    Secret may set). Phases after Validating compare them with the plan's (a mid-run edit fails the run)."""
    from include.compression import ANNOTATION

    migration = resolved.migration
    spec = migration.to_dict()["spec"]
    creds = resolved.storage_credentials
    return {
        "spec": _digest({"spec": spec, "annotations": {ANNOTATION: migration.annotations.get(ANNOTATION)}}),
        "source": _digest([resolved.source.provider.ref, resolved.source.provider.type,
                           resolved.source.provider.endpoint, resolved.source.provider_vm_id,
                           *_provider_settings(resolved.source.provider)]),
        "target": _digest([resolved.target.ref, resolved.target.type, resolved.target.endpoint,
                           *_provider_settings(resolved.target)]),
        "storage": _digest([spec["storage"], effective_storage_endpoint(resolved),
                            creds.first("proxy") if creds is not None else None]),
    }


def snapshot_name(name: str) -> str:
    return f"vmmigration-{name}"


def choose_formats(source_fmt: str, target_fmt: str) -> tuple[str, str]:
    """(transit format, where to convert: "none" | "source" | "target").

    Convert once, on the side that keeps the transfer smallest: a raw source becomes the target's
    compact format before it leaves; a compact source bound for raw leaves as its guest data (read in
    place through ``qemu-img map``, holes never sent), so nothing is converted on arrival; between
    compact formats the disk travels as it is and is converted on arrival.
    """
    if source_fmt == target_fmt:
        return source_fmt, "none"
    if source_fmt == "raw" or target_fmt == "raw":
        return target_fmt, "source"
    return source_fmt, "target"


def _driver_class(type_name: str) -> type[HypervisorDriver]:
    """The driver class of a provider type; the generic one for a type without an adapter (the inventory
    refuses those before a plan is made; tools may still plan with them)."""
    try:
        return provider(type_name).driver_class()
    except InvalidMigration:
        return HypervisorDriver


def _paired(hints: Sequence[Any], nics: Sequence[NicInfo]) -> list[NicInfo | None]:
    """The source NIC in the place of each network hint (None past the source's last NIC)."""
    return [nics[i] if i < len(nics) else None for i in range(len(hints))]


def build_plan(resolved: Resolved, vm: VMInfo, *, target_storage: str) -> Plan:
    migration = resolved.migration
    spec = migration.spec
    target_format = spec.targetDiskFormat or native_format(resolved.target.type)
    # naming and snapshot capability belong to the hypervisors (their driver classes, no connection)
    target_driver, source_driver = _driver_class(resolved.target.type), _driver_class(resolved.source.provider.type)
    if target_driver.target_formats is not None and target_format not in target_driver.target_formats:
        raise InvalidMigration(f"a {resolved.target.type} target takes {', '.join(target_driver.target_formats)} "
                               f"disks, not {target_format}", field="spec.targetDiskFormat")
    prefix = f"{migration.namespace}/{migration.name}"
    hints = spec.targetResourceHints
    boot_check, errors = boot_check_from(migration.annotations)
    delete_running, more = delete_running_from(migration.annotations)
    errors += more
    if errors:
        raise InvalidMigration("; ".join(str(e) for e in errors))
    # a running VM is exported from one point in time while it runs: every disk leaves as its guest data
    live = vm.running and source_driver.live_export
    disks = []
    for index, disk in enumerate(vm.disks):
        if live:  # in the point in time's own format (raw guest data, or the hypervisor's export)
            transit = source_driver.live_format
            conversion = "none" if target_format == transit else "target"
        else:
            transit, conversion = choose_formats(disk.format, target_format)
        capacity = disk.capacity
        if index == 0 and hints.disk is not None:
            wanted = hints.disk * GIB
            if wanted < capacity:
                raise InvalidMigration(
                    f"{hints.disk} GiB is smaller than disk {disk.name} ({human_bytes(capacity)}); disks are "
                    f"never shrunk", field="spec.targetResourceHints.disk")
            capacity = wanted
        disks.append(DiskPlan(
            name=disk.name, size_bytes=disk.capacity, allocated_bytes=disk.allocation, source_format=disk.format,
            source_path=disk.path, source_pool=disk.pool, source_volume=disk.volume, bus=disk.bus,
            transit_format=transit, conversion=Conversion(conversion), target_format=target_format,
            object_key=f"{prefix}/{disk.name}.{transit}", target_storage=target_storage,
            target_volume=target_driver.target_volume_name(spec.targetName, disk.name, target_format),
            target_capacity=capacity, target_bus=target_driver.disk_bus(disk.bus), live=live))
    cleanup = spec.cleanupPolicy
    source = resolved.source.provider
    return Plan(
        migration=migration.key,
        dag_id=dag_id_for(migration.namespace, migration.name),
        source=SourcePlan(provider=source.ref, type=source.type, endpoint=source.endpoint,
                          vm=resolved.source.provider_vm_id, vm_id=vm.id, running=vm.running, vcpus=vm.vcpus,
                          memory_mib=vm.memory_mib, skipped=tuple(vm.skipped)),
        target=TargetPlan(provider=resolved.target.ref, type=resolved.target.type, endpoint=resolved.target.endpoint,
                          vm=spec.targetName, storage=target_storage, vcpus=hints.cpu or vm.vcpus,
                          memory_mib=hints.memory or vm.memory_mib, networks=tuple(spec.targetNetworkHints),
                          nic_models=tuple(target_driver.nic_model(nic.model if nic else None) for nic in
                                           _paired(spec.targetNetworkHints, vm.interfaces)),
                          options=target_driver.plan_options(resolved.target)),
        storage=StoragePlan(type=spec.storage.type, prefix=prefix, compression=codec_from(migration.annotations),
                            spec={"type": spec.storage.type, "bucket": spec.storage.bucket,
                                  "endpoint": spec.storage.endpoint, "region": spec.storage.region,
                                  "path": spec.storage.path},
                            effective_endpoint=effective_storage_endpoint(resolved)),
        pin=pin_of(resolved),
        snapshot=SnapshotPlan(name=snapshot_name(migration.name),
                              disks=tuple(d.name for d in vm.disks) if live else
                              tuple(source_driver.snapshot_disks(vm.disks)),
                              mode="point-in-time" if live else "snapshot"),
        boot_check=boot_check,
        disks=tuple(disks),
        phases=tuple(p.value for p in Phase if p not in (Phase.PENDING, Phase.FAILED)),
        cleanup=CleanupPlan(delete_intermediate=cleanup.deleteIntermediate, delete_snapshot=cleanup.deleteSnapshot,
                            delete_source=cleanup.deleteSource, delete_running_source=delete_running),
    )


def describe(plan: Plan, storage_location: str | None = None) -> str:
    """The plan as text, for ``plan`` on the command line and the Validating log."""
    src, tgt = plan.source, plan.target
    lines = [
        f"Migration {plan.migration}  (DAG {plan.dag_id})",
        f"  source: VM {src.vm} on {src.type} provider {src.provider} ({src.endpoint}), "
        f"{src.vcpus} vCPU, {src.memory_mib} MiB",
        f"  target: VM {tgt.vm} on {tgt.type} provider {tgt.provider} ({tgt.endpoint}), "
        f"storage {tgt.storage}, {tgt.vcpus} vCPU, {tgt.memory_mib} MiB",
    ]
    lines[2:2] = [f"          not migrated: {item}" for item in src.skipped]
    if tgt.options:
        lines.append("          " + ", ".join(f"{k}: {v}" for k, v in sorted(tgt.options.items())))
    for net in tgt.networks:
        where = f"bridge {net.bridge}" if net.bridge else f"network {net.network}"
        lines.append(f"          nic {net.name} -> {where}")
    lines.append(f"  storage: {plan.storage.type} at {storage_location or plan.storage.prefix}"
                 + (f", {plan.storage.compression} compressed" if plan.storage.compression else ""))
    lines.append(f"  disks ({len(plan.disks)}):")
    for d in plan.disks:
        conv = {Conversion.NONE: "no conversion",
                Conversion.SOURCE: f"convert {d.source_format} -> {d.target_format} before upload",
                Conversion.TARGET: f"convert {d.transit_format} -> {d.target_format} after download"}[d.conversion]
        held = "raw guest data (holes left out)" if d.transit_format == "raw" else f"a {d.transit_format} stream"
        live = f"exported live from the point in time as {held}; " if d.live else ""
        lines.append(f"    {d.name}: {human_bytes(d.size_bytes)} virtual, {human_bytes(d.allocated_bytes)} "
                     f"allocated, {d.source_format}; {live}{conv}; travels as {d.transit_format} "
                     f"({d.object_key}); lands as {d.target_storage}/{d.target_volume}")
    lines.append("  phases: " + " -> ".join(plan.phases))
    covered = ", ".join(plan.snapshot.disks) or "no disk (the source hypervisor cannot snapshot these disks)"
    if plan.snapshot.live:
        lines.append(f"  snapshot: the VM keeps running; {covered} held at one point in time (quiesced through the "
                     f"guest agent when it answers, else crash-consistent) and exported from it")
    else:
        lines.append(f"  snapshot: {plan.snapshot.name} of {covered}")
    if plan.boot_check:
        b = plan.boot_check
        what = f"the marker {b.marker!r} on the serial console" if b.mode == "serial" else "the guest agent"
        lines.append(f"  boot check: the target boots once with NIC links down; waits {b.timeout:g} s for {what}")
    c = plan.cleanup
    lines.append("  cleanup after success: "
                 + ", ".join([
                     "delete intermediate files" if c.delete_intermediate else "keep intermediate files",
                     "delete the snapshot" if c.delete_snapshot else "keep the snapshot",
                     ("DELETE THE SOURCE VM (running when validated)" if c.delete_source and plan.source.running
                      else "DELETE THE SOURCE VM") if c.delete_source else "keep the source VM",
                 ]))
    lines.append("  after a failure: the partial target is removed, the source VM is always kept")
    return "\n".join(lines)
