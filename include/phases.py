"""The work of each phase of a migration, free of Airflow.

Operators in ``plugins/operators`` are thin wrappers around these functions; the command line and
the tests can call them too. Every phase reads what it needs from the spec store (the spec, the
plan Validating saved, the per-disk records earlier phases left), so any phase can be run on its
own, and writes its outcome back there and to the status sink.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from include import diskio, safefs
from include import status as st
from include.claims import NameClaims
from include.compression import Compressor, decompress
from include.diskio import ProgressTracker, Segment, format_progress, hash_segments
from include.errors import (
    ChecksumError,
    Conflict,
    ConversionError,
    InvalidMigration,
    MigrationFailure,
    NotFound,
    PlanChanged,
    StorageError,
    TargetCreationError,
    TargetValidationError,
    UnsupportedDiskFormat,
)
from include.inventory import BundleInventory, ProviderInfo, Resolved, TracingInventory, resolve
from include.ledger import Entry, Ledger
from include.plan import build_plan, describe, pin_of, staging_root, storage_scope
from include.providers import driver_for
from include.providers.base import DiskInfo, HypervisorDriver, TargetDisk
from include.spec import SpecValidationError, StorageSpec, VMMigration
from include.status import Phase
from include.storage import backend_for
from include.storage.base import MANIFEST_SUFFIX, StorageBackend
from include.store import FileStatusSink, SpecStore, StatusSink, StoreIndex, locked

log = logging.getLogger(__name__)


def host_scope() -> str:
    """The ledger's scope for files and folders on this worker's own host (staging)."""
    return f"host:{socket.gethostname()}"


_PIN_WHAT = {"spec": "the VMMigration's spec", "source": "the source Provider's type or endpoint",
             "target": "the target Provider's type or endpoint", "storage": "the storage"}
_PIN_FIELD = {"spec": "spec", "source": "spec.sourceName", "target": "spec.targetProviderRef",
              "storage": "spec.storage"}

#: read size for local files: one S3 part (8 MiB), so that a part can go out without being copied
READ_CHUNK = 8 * 1024 * 1024


@dataclass
class MigrationContext:
    """Everything a phase needs about one migration, built lazily from the spec store."""

    namespace: str
    name: str
    store: SpecStore = field(default_factory=SpecStore)
    sink: StatusSink | None = None
    driver_factory: Callable[[ProviderInfo], HypervisorDriver] = driver_for
    storage_factory: Callable[..., StorageBackend] = backend_for
    logger: logging.Logger = log
    status_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.sink is None:
            self.sink = FileStatusSink(self.store)

    # -- lazily resolved pieces --------------------------------------------------------------------
    #: set by Validating: the providers and storage come from the spec as it is now. Every later phase
    #: acts on the endpoints, paths and volumes the validated plan recorded (see ``_pinned``).
    validating: bool = False
    #: set by cleanup: it works on from the plan even when the spec no longer resolves
    cleaning: bool = False

    @cached_property
    def index(self) -> StoreIndex:
        """The spec store as this task needs it. Validating reads every file; later phases read only the
        files the validated run was resolved from (recorded in the plan), so a task's cost does not grow
        with the store. When one of those no longer holds what it held, the whole store is read."""
        index = None if self.validating else self.store.own_index(self.namespace, self.name)
        if index is not None:
            try:
                resolve(self._migration_in(index), BundleInventory(index.objects))
                return index
            except (KeyError, SpecValidationError, MigrationFailure):
                self.logger.info("the spec files of the validated run changed; reading the whole store")
        return self.store.index()

    def _migration_in(self, index: StoreIndex) -> VMMigration:
        entry = self.store.entry(self.namespace, self.name, index)
        if entry.error is not None:
            raise entry.error
        assert entry.migration is not None
        return entry.migration

    @cached_property
    def migration(self) -> VMMigration:
        return self._migration_in(self.index)

    @cached_property
    def resolved(self) -> Resolved:
        return resolve(self.migration, BundleInventory(self.index.objects))

    def spec_files(self) -> list[str]:
        """The store files this migration's resolution reads (relative to the store), for the plan."""
        inventory = TracingInventory(self.index.objects)
        resolve(self.migration, inventory)
        paths = {self.index.migrations[f"{self.namespace}/{self.name}"].path}
        paths |= {self.index.origins[k] for k in inventory.used if k in self.index.origins}
        return sorted(str(p.relative_to(self.store.root)) for p in paths)

    @cached_property
    def plan(self) -> dict[str, Any]:
        plan = self.store.load_plan(self.namespace, self.name)
        if plan is None:
            raise InvalidMigration(f"no plan for {self.namespace}/{self.name}: run the Validating phase first "
                                   f"(task validate_migration)")
        return plan

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger.of(self.store, self.namespace, self.name)

    def _pinned(self, side: str) -> ProviderInfo:
        """The ``side`` provider held to the validated plan: its type and endpoint are the plan's.
        Credentials are read from the Provider's Secret as it is now, and only when the Provider is still
        the one validated; cleanup works on from the plan alone when the spec no longer resolves."""
        if self.validating:
            return self.resolved.source.provider if side == "source" else self.resolved.target
        recorded = self.plan[side]
        try:
            info = self.resolved.source.provider if side == "source" else self.resolved.target
        except (SpecValidationError, MigrationFailure, KeyError):
            if not self.cleaning:
                raise
            namespace, _, name = recorded["provider"].partition("/")
            info = ProviderInfo(name=name, namespace=namespace, type=recorded["type"], endpoint=recorded["endpoint"])
        if info.ref != recorded["provider"]:
            info = dataclasses.replace(info, credentials=None)
        return dataclasses.replace(info, type=recorded["type"], endpoint=recorded["endpoint"])

    @cached_property
    def source(self) -> HypervisorDriver:
        return self.driver_factory(self._pinned("source"))

    @cached_property
    def target(self) -> HypervisorDriver:
        return self.driver_factory(self._pinned("target"))

    @cached_property
    def storage(self) -> StorageBackend:
        if self.validating:
            return self.storage_factory(self.migration.spec.storage, self.resolved.storage_credentials)
        try:
            ref, credentials = self.migration.spec.storage.credentialsSecretRef, self.resolved.storage_credentials
        except (SpecValidationError, MigrationFailure, KeyError):
            if not self.cleaning:
                raise
            ref, credentials = None, None
        spec = StorageSpec(**{**self.plan["storage"]["spec"], "credentialsSecretRef": ref})
        from_secret = credentials.first("endpoint") if credentials is not None else None
        if (from_secret or spec.endpoint) != self.plan["storage"].get("effectiveEndpoint", spec.endpoint):
            raise PlanChanged("the storage Secret now names another endpoint than the one validated; nothing is "
                              "sent there", field="spec.storage.credentialsSecretRef")
        return self.storage_factory(spec, credentials)

    def check_pinned(self) -> None:
        """Fail (PlanChanged) when the spec, a Provider or the storage changed since Validating."""
        was = self.plan.get("pin")
        if not was:  # a plan made by hand (tests, tools): nothing to compare with
            return
        try:
            now = pin_of(self.resolved)
        except KeyError as err:  # the VMMigration is gone from the store
            raise PlanChanged(f"the VMMigration was removed from the spec store after Validating ({err})",
                              field="metadata.name") from None
        except SpecValidationError as err:
            raise PlanChanged(f"the spec or an object it refers to changed since Validating and no longer "
                              f"validates: {failure_message(err)}", field=err.errors[0].path) from None
        changed = sorted(k for k in set(now) | set(was) if now.get(k) != was.get(k))
        if changed:
            raise PlanChanged(
                f"{', '.join(_PIN_WHAT.get(k, k) for k in changed)} changed since Validating; this run keeps "
                f"to the validated plan and stops here (what it created is rolled back on the validated "
                f"endpoints): run the migration again to use the new values", field=_PIN_FIELD[changed[0]])

    @property
    def scope_source(self) -> str:
        return f"{self.plan['source']['type']}:{self.plan['source']['endpoint']}"

    @property
    def scope_target(self) -> str:
        return f"{self.plan['target']['type']}:{self.plan['target']['endpoint']}"

    @property
    def scope_storage(self) -> str:
        return storage_scope(self.plan["storage"])

    @property
    def staging(self) -> Path:
        """This migration's private staging folder on this host (0700, a fresh unpredictable name,
        recorded in the ledger when made); later phases on the same host find it there and check it."""
        scope = host_scope()
        with locked(self.ledger.path.with_name("staging")):
            for entry in self.ledger.entries("dir"):
                if entry.scope != scope or entry.ident.get("role") != "staging":
                    continue
                path = Path(entry.ident["path"])
                if not os.path.lexists(path):
                    continue
                if safefs.is_private_dir(path):
                    return path
                raise InvalidMigration(f"the staging folder {path} is no longer private to this engine (owner, "
                                       f"mode or type changed); refusing to use it")
            base = staging_root()
            safefs.ensure_base(base)
            path = Path(tempfile.mkdtemp(prefix=f"{self.namespace}.{self.name}.", dir=base))
            self.ledger.record("dir", scope, role="staging", path=str(path))
            return path

    def disk_plan(self, disk: str) -> dict[str, Any]:
        for entry in self.plan["disks"]:
            if entry["name"] == disk:
                return entry
        raise InvalidMigration(f"disk {disk!r} is not in the plan of {self.namespace}/{self.name} "
                               f"(planned: {', '.join(d['name'] for d in self.plan['disks'])}); the source VM "
                               f"changed since Validating: run the migration again")

    def disk_info(self, disk: str) -> DiskInfo:
        d = self.disk_plan(disk)
        return DiskInfo(name=d["name"], format=d["sourceFormat"], capacity=d["sizeBytes"],
                        allocation=d["allocatedBytes"], path=d["sourcePath"], pool=d["sourcePool"],
                        volume=d["sourceVolume"], bus=d.get("bus", "virtio"))

    def record(self, disk: str, **values: Any) -> dict[str, Any]:
        return self.store.update_disk_record(self.namespace, self.name, disk, **values)

    def disk_record(self, disk: str) -> dict[str, Any]:
        return self.store.disk_record(self.namespace, self.name, disk)

    def update_status(self, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
        """Status writes never fail a phase: a failed write is logged and the work goes on."""
        try:
            assert self.sink is not None
            return self.sink.update(self.namespace, self.name, mutate)
        except Exception:  # noqa: BLE001 - a status write must never fail a disk copy
            self.logger.warning("could not write the status of %s/%s", self.namespace, self.name, exc_info=True)
            return None

    def progress(self, phase: Phase, disk: str, total: int, verb: str) -> ProgressTracker:
        """A tracker that logs and writes status at least every 5% or ``status_interval`` seconds."""

        def report(done: int, total_: int, rate: float, eta: float | None) -> None:
            self.logger.info("%s %s: %s", verb, disk, format_progress(done, total_, rate, eta))
            self.update_status(lambda s: st.report_bytes(s, phase, disk, done, total_, rate=rate, eta=eta))

        return ProgressTracker(total, report, interval=self.status_interval, percent_step=5.0)

    def close(self) -> None:
        for attr in ("source", "target", "storage"):
            if attr in self.__dict__ and hasattr(self.__dict__[attr], "close"):
                self.__dict__[attr].close()


# -- phase bodies ----------------------------------------------------------------------------------

def begin(ctx: MigrationContext, phase: Phase, *, disk: str | None = None, message: str | None = None) -> None:
    ctx.logger.info("=== %s%s: %s/%s", phase.value, f" [{disk}]" if disk else "", ctx.namespace, ctx.name)
    if phase is not Phase.VALIDATING:
        ctx.check_pinned()  # a spec or Provider edited mid-run never redirects this phase
    ctx.update_status(lambda s: st.enter_phase(s, phase, disk=disk, message=message))


def finish(ctx: MigrationContext, phase: Phase, message: str, *, disk: str | None = None) -> None:
    ctx.logger.info("=== %s done%s: %s", phase.value, f" [{disk}]" if disk else "", message)
    if disk is None:
        ctx.update_status(lambda s: st.complete_phase(s, phase, message=message))
        return

    def mutate(s: dict[str, Any]) -> None:
        # a disk may already be in a later phase: what counts is that it completed this one
        reached = {d["name"] for d in s.get("disks", []) if phase.value in d.get("completed", [])} | {disk}
        last = all(d["name"] in reached for d in ctx.plan["disks"])
        st.complete_phase(s, phase, message=message if not last else _phase_summary(phase, ctx), disk=disk,
                          all_disks_done=last)

    ctx.update_status(mutate)


def _phase_summary(phase: Phase, ctx: MigrationContext) -> str:
    n = len(ctx.plan["disks"])
    return f"{st.DONE_CONDITION[phase]} {n} disk{'s' if n != 1 else ''}"


def validate(ctx: MigrationContext) -> dict[str, Any]:
    """Validating: the spec, its references, the source VM, the target provider and pool, the storage;
    claims the target name, then saves the plan every later phase keeps to."""
    ctx.validating = True
    begin(ctx, Phase.VALIDATING, message="Validating source VM and target provider")
    # the run's outcome is run state, not status: finalize decides from it, whatever sink shows the status;
    # reset first, so that no outcome of an earlier run outlives a Validating that fails early
    ctx.store.update_run_record(ctx.namespace, ctx.name, targetValidated=None, failure=None)
    ctx.store.clear_disk_records(ctx.namespace, ctx.name)
    ctx.store.plan_path(ctx.namespace, ctx.name).unlink(missing_ok=True)  # a stale plan must not outlive its run
    migration = ctx.migration  # raises SpecValidationError naming every bad field
    resolved = ctx.resolved
    spec = migration.spec
    run = ctx.ledger.new_run()
    ctx.store.update_run_record(ctx.namespace, ctx.name, run=run)
    target_scope = f"{resolved.target.type}:{resolved.target.endpoint}"
    # Of two migrations validated at the same instant with one target name, exactly one gets the claim;
    # it is taken on the hypervisor's own identity, so two endpoints of one host share their names.
    claim_scope = f"{resolved.target.type}:{ctx.target.identity()}"
    # recorded first: a crash right after acquiring never strands the claim (release checks the holder)
    ctx.ledger.record("claim", claim_scope, name=spec.targetName)
    NameClaims.of(ctx.store).acquire(claim_scope, spec.targetName, migration.key, run)
    ctx.logger.info("source %s", ctx.source.check())
    try:
        vm = ctx.source.get_vm(resolved.source.provider_vm_id)
    except NotFound as err:
        raise NotFound(f"{err} (provider {resolved.source.provider.ref})", field="spec.sourceName") from err
    if vm.running:
        raise InvalidMigration(
            f"VM {vm.name} is running; shut it down first: this engine does cold migrations (warm migration "
            f"is on the roadmap)", field="spec.sourceName")
    if not vm.disks:
        raise InvalidMigration(f"VM {vm.name} has no disk to migrate", field="spec.sourceName")
    ctx.logger.info("target %s", ctx.target.check())
    pool = spec.targetStorageHint or ctx.target.default_storage()
    if not ctx.target.storage_exists(pool):
        raise NotFound(f"target storage {pool!r} does not exist on provider {resolved.target.ref}",
                       field="spec.targetStorageHint")
    vm_id = ctx.target.vm_id(spec.targetName)
    if vm_id is not None and not ctx.ledger.owns("vm", target_scope, id=vm_id):
        raise Conflict(f"a VM named {spec.targetName!r} already exists on provider {resolved.target.ref} and was "
                       f"not created by this migration", field="spec.targetName")
    plan = build_plan(resolved, vm, target_storage=pool)
    plan["specFiles"] = ctx.spec_files()  # what later phases read instead of the whole store
    for d in plan["disks"]:
        key = ctx.target.volume_key(pool, d["targetVolume"])
        if key is not None and _own_volume_entry(ctx, pool, d["targetVolume"], key, scope=target_scope) is None \
                and _adoptable_intent(ctx, pool, d["targetVolume"], scope=target_scope) is None:
            raise Conflict(f"volume {d['targetVolume']!r} already exists in {pool} and was not created by this "
                           f"migration", field="spec.targetName")
    ctx.logger.info("storage %s", ctx.storage.check())
    for d in plan["disks"]:
        _ensure_object_key_free(ctx, d["objectKey"], storage_scope(plan["storage"]))
    ctx.store.save_plan(ctx.namespace, ctx.name, plan)
    ctx.__dict__["plan"] = plan
    ctx.logger.info("plan:\n%s", describe(plan, ctx.storage.location(plan["storage"]["prefix"])))

    def record_disks(s: dict[str, Any]) -> None:
        s["disks"] = [{"name": d["name"], "sizeBytes": d["sizeBytes"], "sourceFormat": d["sourceFormat"],
                       "targetFormat": d["targetFormat"], "transitFormat": d["transitFormat"]}
                      for d in plan["disks"]]
        s["dagId"] = plan["dagId"]

    ctx.update_status(record_disks)
    finish(ctx, Phase.VALIDATING, f"Source VM {vm.name} ({len(vm.disks)} disks) and target provider "
                                  f"{resolved.target.ref} validated")
    return {"disks": [d["name"] for d in plan["disks"]]}


def snapshot(ctx: MigrationContext) -> dict[str, Any]:
    begin(ctx, Phase.SNAPSHOTTING, message="Creating source VM snapshot")
    snap = ctx.plan["snapshot"]
    disks = [ctx.disk_info(d["name"]) for d in ctx.plan["disks"]]
    _ensure_same_source(ctx)
    if ctx.source.get_vm(ctx.plan["source"]["vm"]).running:
        raise InvalidMigration(f"VM {ctx.plan['source']['vm']} was started after Validating; shut it down",
                               field="spec.sourceName")
    vm = ctx.plan["source"]["vm"]
    ident = {"vm": ctx.plan["source"].get("vmId"), "name": snap["name"]}
    existed = ctx.source.has_snapshot(vm, snap["name"])
    # a snapshot that appears between this check and the create makes the create fail (and the retry
    # finds it existing, not ours): it is never recorded as made by this migration
    covered = ctx.source.create_snapshot(vm, snap["name"], disks, exists_ok=existed)
    if covered and not existed:
        # only a snapshot this migration made is ever deleted by it
        ctx.ledger.record("snapshot", ctx.scope_source, **ident)
    elif covered and not ctx.ledger.owns("snapshot", ctx.scope_source, **ident):
        ctx.logger.warning("snapshot %s already existed and was not made by this migration: it will be kept",
                           snap["name"])
    if covered:
        message = f"Snapshot {snap['name']} of {', '.join(covered)} created"
    else:
        message = ("No snapshot: the source hypervisor cannot snapshot these disks (libvirt: only when every disk is "
                   "qcow2); the VM is shut off, so its disks are stable, and Exporting checks that it stays off")
    for d in disks:
        if d.name not in covered:
            ctx.logger.warning("disk %s (%s) is not covered by the snapshot", d.name, d.format)
    ctx.update_status(lambda s: s.__setitem__("snapshot", snap["name"] if covered else None))
    finish(ctx, Phase.SNAPSHOTTING, message)
    return {"snapshot": snap["name"] if covered else None, "disks": covered}


def _ensure_object_key_free(ctx: MigrationContext, key: str, scope: str) -> None:
    """Conflict when the object (or its manifest) exists and this migration did not write it."""
    if (ctx.storage.exists(key) or ctx.storage.exists(key + MANIFEST_SUFFIX)) and \
            not ctx.ledger.owns("object", scope, key=key):
        raise Conflict(f"{ctx.storage.location(key)} already exists in the intermediate storage and was not "
                       f"written by this migration; it is never overwritten", field="spec.storage")


def _ensure_same_source(ctx: MigrationContext) -> None:
    """The source VM is still the one validated (same unique id), not another VM given its name."""
    want = ctx.plan["source"].get("vmId")
    have = ctx.source.vm_id(ctx.plan["source"]["vm"])
    if want and have != want:
        raise PlanChanged(f"VM {ctx.plan['source']['vm']} on the source is not the VM validated (id {have}, "
                          f"validated {want})", field="spec.sourceName")


def export_disk(ctx: MigrationContext, disk: str) -> dict[str, Any]:
    """Exporting: make the disk readable in its transit format, converting here when the plan says so
    (a raw source, or a compact one bound for raw, which is read in place as guest data)."""
    d = ctx.disk_plan(disk)
    begin(ctx, Phase.EXPORTING, disk=disk, message=f"Exporting disk {disk}")
    info = ctx.disk_info(disk)
    _ensure_source_off(ctx)
    if d["conversion"] != "source":
        # The disk travels in its own format: it is streamed straight from the provider by Transferring.
        ctx.record(disk, exportPath=None, exportFormat=d["sourceFormat"], exportBytes=info.allocation)
        message = f"Disk {disk} exported as a {d['sourceFormat']} stream from {info.pool}/{info.volume}"
        finish(ctx, Phase.EXPORTING, message, disk=disk)
        return {"disk": disk, "staged": False}
    local = _local_source_path(ctx, info)
    if d["transitFormat"] == "raw" and local is not None:
        try:
            extents = diskio.guest_extents(local, d["sourceFormat"])
        except diskio.UnsafeImage as err:
            raise UnsupportedDiskFormat(f"disk {disk}: {err}", field="spec.sourceName") from err
        if diskio.readable_in_place(extents):
            # Transferring reads the guest data straight from the file through its map: no staging copy
            data = sum(int(e["length"]) for e in extents if e.get("data") and not e.get("zero"))
            ctx.record(disk, exportPath=None, exportMode="map", exportFormat="raw", exportBytes=data)
            finish(ctx, Phase.EXPORTING, f"Disk {disk} exported as its guest data ({d['sourceFormat']} -> raw "
                                         f"read in place, {data} bytes of data)", disk=disk)
            return {"disk": disk, "staged": False}
    staging = ctx.staging
    staged = staging / f"{disk}.export.{d['transitFormat']}"
    _ensure_space(staging, info.allocation, disk)
    fetched = None
    try:
        if local is None:  # remote provider: fetch the disk once (sparse), then convert here
            fetched = staging / f"{disk}.export.src.{d['sourceFormat']}"
            tracker = ctx.progress(Phase.EXPORTING, disk, _source_file_size(ctx, info), "exporting")
            with _space_errors(disk, fetched), safefs.create_private(fetched) as fh:
                diskio.write_segments(ctx.source.read_disk(info), fh, tracker)
            tracker.finish()
            local = fetched
        with _space_errors(disk, staged):
            _convert(ctx, Phase.EXPORTING, disk, local, d["sourceFormat"], staged, d["transitFormat"])
        os.chmod(staged, 0o600)
        # the staged image's sha256: Transferring must upload exactly this file, not one swapped in between
        staged_sha = diskio.sha256_file(staged)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        raise
    finally:
        if fetched is not None:
            with contextlib.suppress(FileNotFoundError):
                fetched.unlink()
    size = staged.stat().st_size
    ctx.record(disk, exportPath=str(staged), exportMode="staged", exportFormat=d["transitFormat"], exportBytes=size,
               exportSha256=staged_sha)
    finish(ctx, Phase.EXPORTING, f"Disk {disk} exported and converted {d['sourceFormat']} -> {d['transitFormat']}",
           disk=disk)
    return {"disk": disk, "staged": True}


def _ensure_space(folder: Path, needed: int, disk: str) -> None:
    try:
        diskio.ensure_free_space(folder, needed)
    except OSError as err:
        raise StorageError(f"disk {disk}: {err}") from err


@contextlib.contextmanager
def _space_errors(disk: str, path: Path) -> Iterator[None]:
    """A full filesystem becomes an error naming the disk and the path (the caller removes the partial file)."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"disk {disk}: no space left writing {path} ({err.strerror})") from err
        raise
    except ConversionError as err:
        if "No space left" in str(err):
            raise StorageError(f"disk {disk}: no space left writing {path}: {err}") from err
        raise


def _stat_key(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    st_ = os.stat(path)
    return st_.st_mtime_ns, st_.st_size


def _ensure_source_off(ctx: MigrationContext) -> None:
    """Cold migration: the source must stay shut off while its disks are read."""
    if ctx.source.get_vm(ctx.plan["source"]["vm"]).running:
        raise InvalidMigration(f"VM {ctx.plan['source']['vm']} was started during the migration; its disks are no "
                               f"longer stable: shut it down and run the migration again", field="spec.sourceName")


def _local_source_path(ctx: MigrationContext, info: DiskInfo) -> Path | None:
    """The disk's file when the source hypervisor keeps it on this host, for qemu-img to read."""
    path = ctx.source.local_disk_path(info)
    return Path(path) if path else None


def _convert(ctx: MigrationContext, phase: Phase, disk: str, src: Path, src_fmt: str, dst: Path, dst_fmt: str,
             *, into_existing: bool = False) -> None:
    total = ctx.disk_plan(disk)["sizeBytes"]
    tracker = ctx.progress(phase, disk, total, f"converting {src_fmt}->{dst_fmt}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        subformat = ctx.target.vmdk_subformat
        diskio.convert(src, src_fmt, dst, dst_fmt, into_existing=into_existing, vmdk_subformat=subformat,
                       progress=lambda pct: tracker.add(int(total * pct / 100) - tracker.done))
    except diskio.UnsafeImage as err:
        if not into_existing:
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
        raise UnsupportedDiskFormat(f"disk {disk}: {err}") from err
    except diskio.QemuImgError as err:
        if not into_existing:
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
        raise ConversionError(f"Failed to convert disk format of {disk}: {err}") from err
    tracker.add(total - tracker.done)
    tracker.finish()


def transfer_disk(ctx: MigrationContext, disk: str) -> dict[str, Any]:
    """Transferring: stream the export into intermediate storage, hashing every byte once."""
    d = ctx.disk_plan(disk)
    rec = ctx.disk_record(disk)
    begin(ctx, Phase.TRANSFERRING, disk=disk, message=f"Uploading disk {disk}")
    _ensure_source_off(ctx)
    watched: Path | None = None  # a local source file, checked unchanged after it was read
    if rec.get("exportPath"):
        staged = Path(rec["exportPath"])
        if staged.parent != ctx.staging:
            raise InvalidMigration(f"disk {disk}: the staged export {staged} is not in this migration's staging "
                                   f"folder on this host; run Exporting again")
        safefs.check_private_file(staged)
        source = diskio.file_segments(staged, chunk=READ_CHUNK)
        total = staged.stat().st_size
    else:
        info = ctx.disk_info(disk)
        local = _local_source_path(ctx, info)
        if rec.get("exportMode") == "map" and local is not None:
            source = diskio.guest_segments(local, d["sourceFormat"], chunk=READ_CHUNK)
            total = d["sizeBytes"]
        elif local is not None:  # on this host the (shut-off) disk's file is read directly
            source = diskio.file_segments(local, chunk=READ_CHUNK)
            total = _source_file_size(ctx, info)
        else:  # elsewhere through the driver's stream
            source = ctx.source.read_disk(info)
            total = _source_file_size(ctx, info)
        if local is not None:
            watched = local
    key = d["objectKey"]
    hasher = hashlib.sha256()
    tracker = ctx.progress(Phase.TRANSFERRING, disk, total, "uploading")
    before = _stat_key(watched)
    _ensure_object_key_free(ctx, key, ctx.scope_storage)
    # recorded before the first byte goes out: a half-written upload (a part file, a multipart upload)
    # is this migration's to resume or remove
    ctx.ledger.record("object", ctx.scope_storage, state="creating", key=key)
    try:
        digest, written, stored, resumed = _upload(ctx, disk, key, source, total, rec, watched, before, hasher, tracker)
    finally:
        # folders made on the share are ours whether the upload went through or not
        for folder in ctx.storage.created_dirs:
            ctx.ledger.record("dir", ctx.scope_storage, key=folder)
    ctx.ledger.record("object", ctx.scope_storage, key=key)
    ctx.record(disk, objectKey=key, transitSha256=digest, transitBytes=written, sentBytes=stored,
               resumedBytes=resumed)
    if rec.get("exportPath"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rec["exportPath"])

    def mutate(s: dict[str, Any]) -> None:
        entry = st.disk_entry(s, disk)
        entry["sha256"] = digest
        entry["transitBytes"] = written
        entry["sentBytes"] = stored

    ctx.update_status(mutate)
    finish(ctx, Phase.TRANSFERRING, f"Disk {disk} stored at {ctx.storage.location(key)} "
                                    f"({written} bytes, sha256 {digest[:12]}...)", disk=disk)
    return {"disk": disk, "sha256": digest, "bytes": written}


def _upload(ctx: MigrationContext, disk: str, key: str, source: Iterator[Segment], total: int, rec: dict[str, Any],
            watched: Path | None, before: tuple[int, int] | None, hasher: Any,
            tracker: ProgressTracker) -> tuple[str, int, int, int]:
    """Stream ``source`` into the object ``key``; returns (sha256, logical bytes, bytes sent, bytes resumed)."""
    d = ctx.disk_plan(disk)
    written = 0  # logical bytes (holes included): what the sha256 covers
    stored = 0  # bytes actually sent
    codec = ctx.plan["storage"].get("compression")
    compressor = Compressor() if codec == "zstd" else None
    holes = ctx.storage.supports_holes and compressor is None
    extents: list[list[int]] = []  # where the stored data goes, when the backend cannot keep holes
    # size the upload by the larger of the allocated and the file size (allocation may be compressed)
    with ctx.storage.open_writer(key, size_hint=max(rec.get("exportBytes") or 0, total)) as writer:
        # reading (prefetch thread), hashing (here) and uploading (the backend's part threads) overlap
        for seg in hash_segments(diskio.prefetched(source), hasher):
            if compressor is not None and seg.data is not None:
                packed = compressor.compress(seg.data)
                if packed:
                    writer.write(Segment(length=len(packed), data=packed))
                    stored += len(packed)
            elif seg.data is not None or holes:
                writer.write(seg)
                stored += seg.length if seg.data is not None else 0
            if seg.data is not None and not holes:
                if extents and extents[-1][0] + extents[-1][1] == written:
                    extents[-1][1] += seg.length
                else:
                    extents.append([written, seg.length])
            written += seg.length
            tracker.add(seg.length)
        if compressor is not None:
            tail = compressor.flush()
            writer.write(Segment(length=len(tail), data=tail))
            stored += len(tail)
        tracker.total = written
        # the disk must not have changed while it was read: still shut off, file untouched
        _ensure_source_off(ctx)
        if _stat_key(watched) != before:
            raise InvalidMigration(f"disk {disk} changed while it was read ({watched}); run the migration again "
                                   f"with the VM shut off", field="spec.sourceName")
        if rec.get("exportSha256") and hasher.hexdigest() != rec["exportSha256"]:
            raise ChecksumError(f"disk {disk}: the staged export {rec['exportPath']} has sha256 "
                                f"{hasher.hexdigest()}, but Exporting wrote {rec['exportSha256']}: it changed "
                                f"in staging; run the migration again")
        writer.commit()
        resumed = int(getattr(writer, "reused", 0))
    tracker.finish()
    digest = hasher.hexdigest()
    ctx.storage.put_manifest(key, {"disk": disk, "sha256": digest, "size": written, "storedBytes": stored,
                                   "extents": None if holes else extents, "compression": codec,
                                   "format": d["transitFormat"],
                                   "virtualSize": d["sizeBytes"], "migration": ctx.plan["migration"]})
    return digest, written, stored, resumed


def _source_file_size(ctx: MigrationContext, info: DiskInfo) -> int:
    """Length of the byte stream a volume download yields (its file size on the provider)."""
    local = _local_source_path(ctx, info)
    if local is not None:
        return local.stat().st_size
    return max(info.allocation, 1)


def _inflate(segments: Iterator[Segment], extents: list[list[int]], size: int) -> Iterator[Segment]:
    """Stored data extents back into the logical stream, the gaps between them as holes."""
    pending = memoryview(b"")
    pos = 0
    stream = iter(segments)
    for offset, length in extents:
        if offset > pos:
            yield Segment(length=offset - pos)
        left = length
        while left:
            if not len(pending):
                seg = next(stream, None)
                if seg is None or seg.data is None:
                    raise ChecksumError(f"stored object ends {left} bytes early (extent at {offset})")
                pending = memoryview(seg.data)
            take = pending[:left]  # a view: no copy of what is left
            pending = pending[len(take):]
            left -= len(take)
            yield Segment(length=len(take), data=take)
        pos = offset + length
    if size > pos:
        yield Segment(length=size - pos)


def _verified_segments(ctx: MigrationContext, disk: str, manifest: dict[str, Any]) -> Iterator[Segment]:
    """The stored object's logical segments; raises ChecksumError at the end unless they hash to the
    manifest's sha256."""
    key, expected = ctx.disk_plan(disk)["objectKey"], manifest["sha256"]
    hasher = hashlib.sha256()
    stream = ctx.storage.read(key)
    if manifest.get("compression") == "zstd":
        stream = decompress(stream)
    if manifest.get("extents") is not None:
        stream = _inflate(stream, manifest["extents"], manifest["size"])
    yield from hash_segments(stream, hasher)
    if hasher.hexdigest() != expected:
        raise ChecksumError(f"disk {disk}: the object {ctx.storage.location(key)} has sha256 "
                            f"{hasher.hexdigest()}, expected {expected} (corrupted in storage)")


def _stored_manifest(ctx: MigrationContext, disk: str) -> dict[str, Any]:
    """The disk's manifest (read once per phase), checked against what Transferring computed."""
    d = ctx.disk_plan(disk)
    manifest = ctx.storage.get_manifest(d["objectKey"])
    if not manifest or not manifest.get("sha256") or "size" not in manifest:
        raise ChecksumError(f"disk {disk}: no manifest with a sha256 beside {ctx.storage.location(d['objectKey'])}")
    recorded = ctx.disk_record(disk).get("transitSha256")
    if recorded and recorded != manifest["sha256"]:
        raise ChecksumError(f"disk {disk}: the manifest's sha256 differs from the one computed on upload")
    return manifest


def convert_disk(ctx: MigrationContext, disk: str) -> dict[str, Any]:
    """Converting: on arrival, turn a compact transit image into the target format (when they differ)."""
    d = ctx.disk_plan(disk)
    begin(ctx, Phase.CONVERTING, disk=disk, message=f"Converting disk {disk}")
    if d["conversion"] != "target":
        why = "converted before upload" if d["conversion"] == "source" else "formats match"
        ctx.record(disk, convertedPath=None)
        finish(ctx, Phase.CONVERTING, f"Disk {disk}: no conversion needed on arrival ({why}, "
                                      f"{d['transitFormat']} -> {d['targetFormat']})", disk=disk)
        return {"disk": disk, "converted": False}
    key = d["objectKey"]
    manifest = _stored_manifest(ctx, disk)
    # qemu-img reads a share's file in place, unless it is stored compressed or as data extents
    local = None if manifest.get("extents") is not None or manifest.get("compression") else ctx.storage.local_path(key)
    fetched = None
    staging = ctx.staging
    _ensure_space(staging, d["sizeBytes"] if d["targetFormat"] == "raw" else d["allocatedBytes"], disk)
    into: str | None = None
    out: Path | None = None
    try:
        tracker = ctx.progress(Phase.CONVERTING, disk, int(manifest["size"]), "verifying")
        if local is None:  # object storage: fetch it once, verifying on the way
            fetched = staging / f"{disk}.download.{d['transitFormat']}"
            with _space_errors(disk, fetched), safefs.create_private(fetched) as fh:
                diskio.write_segments(_verified_segments(ctx, disk, manifest), fh, tracker)
            local = fetched
        else:
            for seg in _verified_segments(ctx, disk, manifest):
                tracker.add(seg.length)
        tracker.finish()
        into = _local_target_volume(ctx, disk)
        out = Path(into) if into else staging / f"{disk}.converted.{d['targetFormat']}"
        with _space_errors(disk, out):
            _convert(ctx, Phase.CONVERTING, disk, local, d["transitFormat"], out, d["targetFormat"],
                     into_existing=into is not None)
        converted_sha = None
        if not into:
            os.chmod(out, 0o600)
            # Importing checks that it imports exactly this file, not one swapped in staging
            converted_sha = diskio.sha256_file(out)
    except BaseException:
        if out is not None and not into:
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
        raise
    finally:
        if fetched is not None:
            with contextlib.suppress(FileNotFoundError):
                fetched.unlink()
    # Written straight into the target volume when it is on this host: no second temporary copy.
    ctx.record(disk, convertedPath=None if into else str(out), convertedInto=into, convertedSha256=converted_sha)
    finish(ctx, Phase.CONVERTING, f"Disk {disk} verified and converted {d['transitFormat']} -> {d['targetFormat']}",
           disk=disk)
    return {"disk": disk, "converted": True}


def _fresh_target_volume(ctx: MigrationContext, disk: str) -> str | None:
    """Create the disk's target volume (anew on a retry, when the one there is ours); returns its file
    when it is on this host. A volume of that name that this migration did not create fails the run."""
    d = ctx.disk_plan(disk)
    pool, volume = d["targetStorage"], d["targetVolume"]
    _remove_own_volume(ctx, pool, volume, conflict_if_foreign=True)
    # an intent first: a retry after a crash between the create and the record below recognises the volume
    intent = ctx.ledger.record("volume", ctx.scope_target, state="creating", pool=pool, volume=volume)
    try:
        ctx.target.create_volume(pool, volume, d["targetFormat"], d["sizeBytes"])
    except TargetCreationError:
        ctx.ledger.forget(intent)
        if ctx.target.volume_key(pool, volume) is not None:  # created by someone else in between
            raise Conflict(f"volume {volume!r} appeared in {pool} while this migration was about to create it; it "
                           f"was not created by this migration and is left alone", field="spec.targetName") from None
        raise
    key = ctx.target.volume_key(pool, volume)
    owner = f"{ctx.namespace}/{ctx.name} {ctx.ledger.run()} {intent.at!r}"
    if ctx.target.mark_volume(pool, volume, owner):
        ctx.ledger.record("volume", ctx.scope_target, pool=pool, volume=volume, key=key, owner=owner)
    else:
        ctx.ledger.record("volume", ctx.scope_target, pool=pool, volume=volume, key=key)
    ctx.ledger.forget(intent)
    return ctx.target.local_volume_path(pool, volume)


def _remove_own_volume(ctx: MigrationContext, pool: str, volume: str, *, conflict_if_foreign: bool) -> bool:
    """Delete the volume when this migration created it (the ledger holds its identity)."""
    key = ctx.target.volume_key(pool, volume)
    if key is None:
        return False
    entry = _own_volume_entry(ctx, pool, volume, key)
    if entry is None:
        entry = _adoptable_intent(ctx, pool, volume)
    if entry is None:
        if conflict_if_foreign:
            raise Conflict(f"volume {volume!r} already exists in {pool} and was not created by this migration; it "
                           f"is never overwritten or deleted", field="spec.targetName")
        return False
    removed = ctx.target.delete_volume(pool, volume, key=key, owner=entry.ident.get("owner"))
    ctx.ledger.forget(entry)
    return removed


def _own_volume_entry(ctx: MigrationContext, pool: str, volume: str, key: str, scope: str | None = None
                      ) -> Entry | None:
    """The ledger entry of this volume, if the volume there now is the one it records (same key, and the
    same owner tag where one was written: a volume deleted and made again by someone else has none)."""
    scope = scope or ctx.scope_target
    for entry in ctx.ledger.entries("volume"):
        if entry.state == "creating" or not entry.matches("volume", scope, pool=pool, volume=volume, key=key):
            continue
        if entry.ident.get("owner") and ctx.target.volume_owner(pool, volume) != entry.ident["owner"]:
            continue
        return entry
    return None


def _adoptable_intent(ctx: MigrationContext, pool: str, volume: str, scope: str | None = None) -> Entry | None:
    """A "creating" entry of this volume that the volume does not predate: this migration died between
    creating the volume and recording it."""
    created = ctx.target.volume_created_at(pool, volume)
    if created is None:
        return None  # no time to compare with: never adopted
    for entry in ctx.ledger.entries("volume"):
        if entry.state == "creating" and entry.scope == (scope or ctx.scope_target) and "key" not in entry.ident \
                and entry.ident.get("pool") == pool and entry.ident.get("volume") == volume \
                and created >= entry.at - 1.0:
            ctx.logger.info("volume %s/%s was created by an earlier try of this migration that died before "
                            "recording it (intent at %.3f, changed at %.3f): it is ours", pool, volume, entry.at,
                            created)
            return entry
    return None


def _local_target_volume(ctx: MigrationContext, disk: str) -> str | None:
    """The target volume's file to convert into, when the target keeps it on this host (else None,
    and no volume yet: Importing creates it and streams the converted image into it)."""
    path = _fresh_target_volume(ctx, disk)
    if path is None:
        d = ctx.disk_plan(disk)
        _remove_own_volume(ctx, d["targetStorage"], d["targetVolume"], conflict_if_foreign=False)
    return path


def import_disk(ctx: MigrationContext, disk: str) -> dict[str, Any]:
    """Importing: write the disk into the target storage, verifying its sha256 on the way."""
    d = ctx.disk_plan(disk)
    rec = ctx.disk_record(disk)
    begin(ctx, Phase.IMPORTING, disk=disk, message=f"Importing disk {disk}")
    pool, volume = d["targetStorage"], d["targetVolume"]
    hasher = hashlib.sha256()
    if rec.get("convertedInto"):
        # Converting already wrote the volume in place from bytes verified against the manifest; reading
        # it back to hash it again would only repeat that work.
        path = Path(rec["convertedInto"])
        length = path.stat().st_size
        tracker = ctx.progress(Phase.IMPORTING, disk, length, "importing")
        tracker.add(length)
        expected = None
    else:
        if rec.get("convertedPath"):
            path = Path(rec["convertedPath"])
            if path.parent != ctx.staging:
                raise InvalidMigration(f"disk {disk}: the converted image {path} is not in this migration's staging "
                                       f"folder on this host; run Converting again")
            safefs.check_private_file(path)
            length = path.stat().st_size
            segments: Iterator[Segment] = diskio.file_segments(path)
            expected = None
        else:
            manifest = _stored_manifest(ctx, disk)
            length, expected = int(manifest["size"]), manifest["sha256"]
            segments = _verified_segments(ctx, disk, manifest)
        local_path = _fresh_target_volume(ctx, disk)
        tracker = ctx.progress(Phase.IMPORTING, disk, length, "importing")

        def counted() -> Iterator[Segment]:
            # reading and verifying run in the prefetch thread, writing to the target here; a stream
            # verified against its manifest is not hashed a second time
            stream = diskio.prefetched(segments)
            for seg in (stream if expected else hash_segments(stream, hasher)):
                tracker.add(seg.length)
                yield seg

        try:
            if local_path:  # the volume's file is on this host: write it directly, holes as holes
                with open(local_path, "r+b") as fh:
                    diskio.write_segments(counted(), fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                ctx.target.write_volume(pool, volume, counted(), length)
            if rec.get("convertedSha256") and hasher.hexdigest() != rec["convertedSha256"]:
                raise ChecksumError(f"disk {disk}: the converted image {rec['convertedPath']} has sha256 "
                                    f"{hasher.hexdigest()}, but Converting wrote {rec['convertedSha256']}: it "
                                    f"changed in staging; run the migration again")
        except ChecksumError:
            _remove_own_volume(ctx, pool, volume, conflict_if_foreign=False)
            raise
    tracker.finish()
    if d["targetCapacity"] > d["sizeBytes"]:
        ctx.target.resize_volume(pool, volume, d["targetCapacity"])
    target_sha = None if rec.get("convertedInto") else (expected or hasher.hexdigest())
    ctx.record(disk, imported=True, targetSha256=target_sha, targetBytes=length)
    if rec.get("convertedPath"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rec["convertedPath"])

    def mutate(s: dict[str, Any]) -> None:
        entry = st.disk_entry(s, disk)
        entry["targetVolume"] = f"{pool}/{volume}"
        if target_sha:
            entry["targetSha256"] = target_sha

    ctx.update_status(mutate)
    check = "sha256 verified" if expected else ("converted in place" if rec.get("convertedInto")
                                                else "converted image written")
    finish(ctx, Phase.IMPORTING, f"Disk {disk} imported into {pool}/{volume} ({check})", disk=disk)
    return {"disk": disk, "volume": f"{pool}/{volume}"}


def create_vm(ctx: MigrationContext) -> dict[str, Any]:
    begin(ctx, Phase.CREATING, message="Creating VM on target provider")
    tgt = ctx.plan["target"]
    from include.spec import NetworkHint

    disks = [TargetDisk(name=d["name"], pool=d["targetStorage"], volume=d["targetVolume"], format=d["targetFormat"],
                        capacity=d["targetCapacity"], bus=d.get("bus", "virtio")) for d in ctx.plan["disks"]]
    networks = [NetworkHint(**n) for n in tgt["networks"]]
    missing = [d.name for d in disks if not ctx.disk_record(d.name).get("imported")]
    if missing:
        raise InvalidMigration(f"disks {', '.join(missing)} were not imported in this run; refusing to create a VM "
                               f"without them")
    vm_id = ctx.target.vm_id(tgt["vm"])
    # our own half-made VM from a failed try of this run goes; anybody else's is a conflict
    if vm_id is not None and _remove_own_vm(ctx, vm_id) is None:
        raise Conflict(f"a VM named {tgt['vm']!r} already exists on the target and was not created by this "
                           f"migration", field="spec.targetName")
    try:
        ctx.target.define_vm(tgt["vm"], tgt["vcpus"], tgt["memoryMiB"], disks, networks, owner=_vm_owner_tag(ctx))
    except TargetCreationError:
        if ctx.target.vm_id(tgt["vm"]) is not None:
            raise Conflict(f"a VM named {tgt['vm']!r} appeared on the target while this migration was creating it",
                           field="spec.targetName") from None
        raise
    vm_id = ctx.target.vm_id(tgt["vm"])
    ctx.ledger.record("vm", ctx.scope_target, id=vm_id, name=tgt["vm"])
    ctx.update_status(lambda s: s.__setitem__("targetVM", tgt["vm"]))
    finish(ctx, Phase.CREATING, f"VM {tgt['vm']} defined on {tgt['provider']} with {tgt['vcpus']} vCPU, "
                                f"{tgt['memoryMiB']} MiB and {len(disks)} disks")
    return {"vm": tgt["vm"], "id": vm_id}


def _vm_owner_tag(ctx: MigrationContext) -> str:
    """What ``define_vm`` writes into the VM: this migration and this run (a later run never takes it)."""
    return f"{ctx.namespace}/{ctx.name} {ctx.ledger.run()}"


def _remove_own_vm(ctx: MigrationContext, vm_id: str) -> bool | None:
    """Delete the target VM with this id if this migration made it: recorded in the ledger, or tagged by a
    try of this run that died before recording it. None when it is not ours, else whether it was deleted."""
    entry = ctx.ledger.find("vm", ctx.scope_target, id=vm_id)
    if entry is None and ctx.target.vm_owner(vm_id) != _vm_owner_tag(ctx):
        return None
    deleted = ctx.target.delete_vm(vm_id)
    if entry is not None:
        ctx.ledger.forget(entry)
    return deleted


def validate_target(ctx: MigrationContext) -> dict[str, Any]:
    begin(ctx, Phase.VALIDATING_TARGET, message="Validating target VM")
    tgt = ctx.plan["target"]
    desc = ctx.target.describe_vm(tgt["vm"])
    problems = []
    if desc["vcpus"] != tgt["vcpus"]:
        problems.append(f"vcpus {desc['vcpus']} != {tgt['vcpus']}")
    if desc["memory_mib"] != tgt["memoryMiB"]:
        problems.append(f"memory {desc['memory_mib']} MiB != {tgt['memoryMiB']} MiB")
    by_name = {d["name"]: d for d in desc["disks"]}
    for d in ctx.plan["disks"]:
        got = by_name.get(d["name"])
        if got is None:
            problems.append(f"disk {d['name']} missing")
            continue
        if got["format"] != d["targetFormat"]:
            problems.append(f"disk {d['name']} format {got['format']} != {d['targetFormat']}")
        if got["capacity"] != d["targetCapacity"]:
            problems.append(f"disk {d['name']} size {got['capacity']} != {d['targetCapacity']}")
        info = DiskInfo(name=d["name"], format=got["format"], capacity=got["capacity"], allocation=0,
                        path=got["path"])
        if ctx.target.local_disk_path(info):
            try:
                diskio.check(got["path"], got["format"])
            except diskio.QemuImgError as err:
                problems.append(str(err))
    wanted = [(n.get("bridge"), n.get("network")) for n in tgt["networks"]]
    have = [(i.get("bridge"), i.get("network")) for i in desc["interfaces"]]
    if wanted != have:
        problems.append(f"interfaces {have} != {wanted}")
    if problems:
        raise TargetValidationError(f"target VM {tgt['vm']} does not match the plan: " + "; ".join(problems))
    ctx.store.update_run_record(ctx.namespace, ctx.name, targetValidated=ctx.ledger.run())
    finish(ctx, Phase.VALIDATING_TARGET, f"Target VM {tgt['vm']} matches the plan (cpu, memory, "
                                         f"{len(ctx.plan['disks'])} disks, networks)")
    return {"vm": tgt["vm"]}


def cleanup(ctx: MigrationContext, *, succeeded: bool, failure: str | None = None) -> dict[str, Any]:
    """After the run: follow cleanupPolicy on success; on failure remove what the run half-created.

    Every delete here acts on a ledger entry (what this migration recorded as created by itself), on
    the endpoints and storage the validated plan pinned; nothing is found by name or prefix.
    """
    done: list[str] = []
    kept: list[str] = []
    ctx.cleaning = True
    plan = ctx.store.load_plan(ctx.namespace, ctx.name)
    if plan is None:  # failed in Validating: nothing but the name claim was taken
        _release_claims(ctx, done)
        return {"removed": done}
    policy = plan["cleanup"]  # as validated at the start of the run, whatever the spec says now
    ctx.__dict__["plan"] = plan
    ledger = ctx.ledger
    here = host_scope()
    for entry in ledger.entries("dir"):
        if entry.scope == here and entry.ident.get("role") == "staging":
            path = Path(entry.ident["path"])
            with _logged(ctx, f"removing staging folder {path}"):
                if os.path.lexists(path) and safefs.is_private_dir(path):
                    shutil.rmtree(path)  # our own 0700 folder: nobody else could put anything in it
                    done.append(f"staging folder {path}")
                ledger.forget(entry)
    if succeeded:
        # what the target now holds is the migrated VM: never rolled back by a later run
        for entry in ledger.entries("vm") + ledger.entries("volume"):
            if entry.scope == ctx.scope_target:
                ledger.forget(entry)
    else:
        done += _rollback_target(ctx)
    if policy["deleteIntermediate"]:
        objects = [e for e in ledger.entries("object") if e.scope == ctx.scope_storage]
        with _logged(ctx, "deleting intermediate files"):
            for entry in objects:
                ctx.storage.delete(entry.ident["key"])
                ledger.forget(entry)
                done.append(f"intermediate object {ctx.storage.location(entry.ident['key'])}")
            # folders this migration made on the share, deepest first, only if they are empty now
            folders = [e for e in ledger.entries("dir") if e.scope == ctx.scope_storage]
            for entry in sorted(folders, key=lambda e: -e.ident["key"].count("/")):
                if ctx.storage.remove_empty_dir(entry.ident["key"]):
                    done.append(f"empty folder {ctx.storage.location(entry.ident['key'])}")
                else:
                    kept.append(f"folder {ctx.storage.location(entry.ident['key'])} (not empty)")
                ledger.forget(entry)
    snap = {"vm": plan["source"].get("vmId"), "name": plan["snapshot"]["name"]}
    ours = ledger.find("snapshot", ctx.scope_source, **snap)
    if succeeded and policy["deleteSnapshot"] and ours:
        with _logged(ctx, "deleting the snapshot"):
            _ensure_same_source(ctx)
            if ctx.source.delete_snapshot(plan["source"]["vm"], plan["snapshot"]["name"]):
                done.append(f"snapshot {plan['snapshot']['name']}")
            ledger.forget(ours)
    elif ours and not succeeded:
        ctx.logger.info("cleanup: snapshot %s kept after the failure, for rollback; the next successful run "
                        "deletes it", plan["snapshot"]["name"])
    if succeeded and policy["deleteSource"]:
        vm_id = plan["source"].get("vmId")
        if not vm_id:
            kept.append("the source VM (the plan has no id for it)")
        else:
            volumes = [(d["sourcePool"], d["sourceVolume"]) for d in plan["disks"]
                       if d.get("sourcePool") and d.get("sourceVolume")]
            removed = ctx.source.delete_source_vm(vm_id, volumes)
            done += [f"{item} (deleteSource)" for item in removed]
    _release_claims(ctx, done)
    for item in done:
        ctx.logger.info("cleanup: removed %s", item)
    for item in kept:
        ctx.logger.info("cleanup: kept %s", item)
    return {"removed": done, "kept": kept}


def _release_claims(ctx: MigrationContext, done: list[str]) -> None:
    claims = NameClaims.of(ctx.store)
    for entry in ctx.ledger.entries("claim"):
        with _logged(ctx, f"releasing the claim of {entry.ident['name']}"):
            if claims.release(entry.scope, entry.ident["name"], f"{ctx.namespace}/{ctx.name}"):
                done.append(f"claim of target name {entry.ident['name']}")
            ctx.ledger.forget(entry)


def _rollback_target(ctx: MigrationContext) -> list[str]:
    """Remove the VM and volumes this migration created on the target (ledger entries only)."""
    removed = []
    name = ctx.plan["target"]["vm"]
    with _logged(ctx, f"removing the half-created target VM {name}"):
        ids = {e.ident["id"] for e in ctx.ledger.entries("vm") if e.scope == ctx.scope_target}
        ids.add(ctx.target.vm_id(name))  # also one tagged by a try of this run that died before recording it
        for vm_id in sorted(i for i in ids if i):
            if _remove_own_vm(ctx, vm_id):
                removed.append(f"target VM {name} ({vm_id})")
    for entry in ctx.ledger.entries("volume"):
        if entry.scope != ctx.scope_target:
            continue
        pool, volume = entry.ident["pool"], entry.ident["volume"]
        with _logged(ctx, f"removing target volume {volume}"):
            if "key" not in entry.ident:  # an intent: the volume is ours only if it was created after it
                key = ctx.target.volume_key(pool, volume)
                if key is not None and _adoptable_intent(ctx, pool, volume) == entry \
                        and ctx.target.delete_volume(pool, volume, key=key):
                    removed.append(f"target volume {pool}/{volume}")
                ctx.ledger.forget(entry)
                continue
            if ctx.target.delete_volume(pool, volume, key=entry.ident["key"], owner=entry.ident.get("owner")):
                removed.append(f"target volume {pool}/{volume}")
            ctx.ledger.forget(entry)
    return removed


@contextlib.contextmanager
def _logged(ctx: MigrationContext, what: str) -> Iterator[None]:
    try:
        yield
    except Exception:  # noqa: BLE001 - cleanup goes on with the next item; the error is logged
        ctx.logger.warning("cleanup: %s failed", what, exc_info=True)


def finalize(ctx: MigrationContext, *, succeeded: bool, failure: str | None = None) -> dict[str, Any]:
    """Ready or Failed, with cleanup."""
    result = cleanup(ctx, succeeded=succeeded, failure=failure)
    if succeeded:
        tgt = ctx.plan["target"]
        ctx.update_status(lambda s: st.mark_ready(s, f"VM {tgt['vm']} is ready on {tgt['provider']}"))
    else:
        def mark(s: dict[str, Any]) -> None:
            if s.get("phase") != Phase.FAILED.value:
                phase = Phase(s["phase"]) if s.get("phase") in st.DONE_CONDITION else Phase.VALIDATING
                st.fail(s, phase, "MigrationFailed", failure or "a phase failed; see its task log")

        ctx.update_status(mark)
    return result


def record_failure(ctx: MigrationContext, phase: Phase, err: BaseException, *, final: bool,
                   attempt: int | None = None, max_attempts: int | None = None) -> None:
    """Write a failure into the status: Failed when final, a retry note on the phase's condition otherwise."""
    reason = getattr(err, "reason", None) or ("ValidationFailed" if isinstance(err, SpecValidationError)
                                              else "PhaseFailed")
    message = failure_message(err)
    if final:
        try:
            ctx.store.update_run_record(ctx.namespace, ctx.name, failure={"phase": phase.value, "reason": reason,
                                                                          "message": message})
        except (OSError, ValueError):
            ctx.logger.warning("could not record the failure of %s/%s", ctx.namespace, ctx.name, exc_info=True)
        ctx.update_status(lambda s: st.fail(s, phase, reason, message))
    else:
        note = f"attempt {attempt}/{max_attempts} failed, will retry: {message}" if attempt else message
        ctx.update_status(lambda s: st.set_condition(s, phase.value, "True", reason="Retrying", message=note))


def run_outcome(ctx: MigrationContext) -> tuple[bool, str | None]:
    """(whether this run's target validated with no failure since, the failure's message), from run state."""
    record = ctx.store.run_record(ctx.namespace, ctx.name)
    failure = record.get("failure") if isinstance(record.get("failure"), dict) else None
    validated = bool(record.get("targetValidated")) and record.get("targetValidated") == ctx.ledger.run()
    return validated and failure is None, (failure or {}).get("message")


def failure_message(err: BaseException) -> str:
    if isinstance(err, SpecValidationError):
        return "; ".join(str(e) for e in err.errors)
    if isinstance(err, MigrationFailure):
        return str(err)
    return f"{type(err).__name__}: {err}"


def is_permanent(err: BaseException) -> bool:
    return isinstance(err, SpecValidationError) or (isinstance(err, MigrationFailure) and err.permanent)
