"""The target side of a hypervisor as one run sees it: a session.

``driver.begin_target(plan, owned)`` opens it; per disk ``import_disk`` (or ``prepare_disk`` for a
volume written in place on this host); ``commit`` brings the VM up from those disks and returns its
handle (an id, never a name); ``rollback`` removes what the run created; ``keep`` hands it over as the
migrated VM. Each Airflow task opens the session again from the validated plan and the run's ledger,
so a session holds no state of its own that a later task would need: what it creates is recorded in
the ledger (``Ownership``) before it is created, which is what makes rollback safe from any task, after
a crash, and on a retry.

``VolumeTargetSession`` is the session of a hypervisor whose disks are volumes made before the VM
(libvirt); vSphere's is ``include.providers.vsphere_session``. How Proxmox VE (volumes
owned by a VMID taken in ``begin``) map onto the same calls is in docs/architecture.md.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from include import diskio
from include.diskio import Segment
from include.errors import Conflict, TargetCreationError
from include.ledger import Entry, Ledger

if TYPE_CHECKING:
    from include.model import DiskPlan, TargetPlan
    from include.providers.base import HypervisorDriver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VMHandle:
    """The VM a session committed: the hypervisor's unique id, and the name it was given."""

    id: str
    name: str


@dataclass(frozen=True)
class Ownership:
    """What one run records as created by itself, on one scope (a hypervisor endpoint) of its ledger."""

    ledger: Ledger
    scope: str
    #: ``<namespace>/<name>``: the migration, written into what the hypervisor can tag
    migration: str
    logger: logging.Logger = log

    @property
    def tag(self) -> str:
        """The owner tag of this run (a later run of the same migration never takes over its VM)."""
        return f"{self.migration} {self.ledger.run()}"


class TargetSession(abc.ABC):
    """One run's work on the target hypervisor."""

    def __init__(self, driver: HypervisorDriver, plan: TargetPlan, owned: Ownership) -> None:
        self.driver = driver
        self.plan = plan
        self.owned = owned

    @abc.abstractmethod
    def check_free(self, disks: Sequence[DiskPlan]) -> None:
        """Validating: Conflict when the VM or a disk the plan would create exists and is not this run's."""

    def resolved_options(self) -> dict[str, str]:
        """Validating, after :meth:`check_free`: choices this session made with the target at hand (a node, how
        disks travel), pinned into the plan's ``target.options`` so that every later task makes the same."""
        return {}

    def writes_in_place(self, disk: DiskPlan) -> bool:
        """Whether the disk's target is a file on this host that qemu-img can convert into."""
        return False

    def prepare_disk(self, disk: DiskPlan) -> str | None:
        """Create the disk's target anew and return its local file (only when ``writes_in_place``); None,
        with nothing left made, when the created target turns out not writable here after all."""
        return None

    @abc.abstractmethod
    def import_disk(self, disk: DiskPlan, segments: Iterator[Segment], length: int, *,
                    sha256: str | None = None) -> None:
        """Write the disk (``length`` bytes in its target format, holes as holes) into a fresh target; ``sha256``
        is what the stream's bytes hash to (the phase checks it too), for a target that can verify on its side."""

    @abc.abstractmethod
    def discard_disk(self, disk: DiskPlan) -> bool:
        """Remove the disk's target if this run made it (a failed import); returns whether it did."""

    def finish_disk(self, disk: DiskPlan) -> None:  # noqa: B027 - optional
        """After the bytes are in: grow the disk to its planned capacity."""

    @abc.abstractmethod
    def commit(self, disks: Sequence[DiskPlan]) -> VMHandle:
        """Create the VM from the imported disks; returns its handle."""

    @abc.abstractmethod
    def rollback(self) -> list[str]:
        """Remove what this run created on the target (VM and disks); returns what was removed."""

    def keep(self) -> None:
        """The run succeeded: what it created is the migrated VM, never rolled back by a later run."""
        for kind in ("vm", "volume"):
            for entry in self.owned.ledger.entries(kind):
                if entry.scope == self.owned.scope:
                    self.owned.ledger.forget(entry)


class VolumeTargetSession(TargetSession):
    """Disks as volumes made before the VM, each created with an intent recorded first, tagged with its
    owner where the hypervisor keeps one, recognised on a retry, removed only when the ledger records it."""

    # -- Validating ---------------------------------------------------------------------------------
    def check_free(self, disks: Sequence[DiskPlan]) -> None:
        vm_id = self.driver.vm_id(self.plan.vm)
        if vm_id is not None and not self.owned.ledger.owns("vm", self.owned.scope, id=vm_id):
            raise Conflict(f"a VM named {self.plan.vm!r} already exists on provider {self.plan.provider} and was "
                           f"not created by this migration", field="spec.targetName")
        for d in disks:
            key = self.driver.volume_key(d.target_storage, d.target_volume)
            if key is not None and self._own_entry(d.target_storage, d.target_volume, key) is None \
                    and self._adoptable_intent(d.target_storage, d.target_volume) is None:
                raise Conflict(f"volume {d.target_volume!r} already exists in {d.target_storage} and was not "
                               f"created by this migration", field="spec.targetName")

    # -- disks --------------------------------------------------------------------------------------
    def writes_in_place(self, disk: DiskPlan) -> bool:
        return self.driver.local_storage_path(disk.target_storage) is not None

    def prepare_disk(self, disk: DiskPlan) -> str | None:
        path = self._fresh_volume(disk)
        if path is None:  # the pool is here, the volume's file is not writable by us: Importing streams it
            self.discard_disk(disk)
        return path

    def import_disk(self, disk: DiskPlan, segments: Iterator[Segment], length: int, *,
                    sha256: str | None = None) -> None:
        local = self._fresh_volume(disk)
        if local:  # the volume's file is on this host: write it directly, holes as holes
            with open(local, "r+b") as fh:
                diskio.write_segments(segments, fh)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            self.driver.write_volume(disk.target_storage, disk.target_volume, segments, length)

    def discard_disk(self, disk: DiskPlan) -> bool:
        return self._remove_own_volume(disk.target_storage, disk.target_volume, conflict_if_foreign=False)

    def finish_disk(self, disk: DiskPlan) -> None:
        if disk.target_capacity > disk.size_bytes:
            self.driver.resize_volume(disk.target_storage, disk.target_volume, disk.target_capacity)

    def _fresh_volume(self, disk: DiskPlan) -> str | None:
        """Create the disk's volume (anew on a retry, when the one there is ours); its file when it is on
        this host. A volume of that name that this migration did not create fails the run."""
        pool, volume, ledger, scope = disk.target_storage, disk.target_volume, self.owned.ledger, self.owned.scope
        self._remove_own_volume(pool, volume, conflict_if_foreign=True)
        # an intent first: a retry after a crash between the create and the record below recognises the volume
        intent = ledger.record("volume", scope, state="creating", pool=pool, volume=volume)
        try:
            self.driver.create_volume(pool, volume, disk.target_format, disk.size_bytes)
        except TargetCreationError:
            ledger.forget(intent)
            if self.driver.volume_key(pool, volume) is not None:  # created by someone else in between
                raise Conflict(f"volume {volume!r} appeared in {pool} while this migration was about to create it; "
                               f"it was not created by this migration and is left alone",
                               field="spec.targetName") from None
            raise
        key = self.driver.volume_key(pool, volume)
        owner = f"{self.owned.tag} {intent.at!r}"
        if self.driver.mark_volume(pool, volume, owner):
            ledger.record("volume", scope, pool=pool, volume=volume, key=key, owner=owner)
        else:
            ledger.record("volume", scope, pool=pool, volume=volume, key=key)
        ledger.forget(intent)
        return self.driver.local_volume_path(pool, volume)

    def _remove_own_volume(self, pool: str, volume: str, *, conflict_if_foreign: bool) -> bool:
        key = self.driver.volume_key(pool, volume)
        if key is None:
            return False
        entry = self._own_entry(pool, volume, key) or self._adoptable_intent(pool, volume)
        if entry is None:
            if conflict_if_foreign:
                raise Conflict(f"volume {volume!r} already exists in {pool} and was not created by this migration; "
                               f"it is never overwritten or deleted", field="spec.targetName")
            return False
        removed = self.driver.delete_volume(pool, volume, key=key, owner=entry.ident.get("owner"))
        self.owned.ledger.forget(entry)
        return removed

    def _own_entry(self, pool: str, volume: str, key: str) -> Entry | None:
        """The ledger entry of this volume, if the volume there now is the one it records (same key, and the
        same owner tag where one was written: a volume deleted and made again by someone else has none)."""
        for entry in self.owned.ledger.entries("volume"):
            if entry.state == "creating" or not entry.matches("volume", self.owned.scope, pool=pool, volume=volume,
                                                              key=key):
                continue
            if entry.ident.get("owner") and self.driver.volume_owner(pool, volume) != entry.ident["owner"]:
                continue
            return entry
        return None

    def _adoptable_intent(self, pool: str, volume: str) -> Entry | None:
        """A "creating" entry of this volume that the volume does not predate: this migration died between
        creating the volume and recording it."""
        created = self.driver.volume_created_at(pool, volume)
        if created is None:
            return None  # no time to compare with: never adopted
        for entry in self.owned.ledger.entries("volume"):
            if entry.state == "creating" and entry.scope == self.owned.scope and "key" not in entry.ident \
                    and entry.ident.get("pool") == pool and entry.ident.get("volume") == volume \
                    and created >= entry.at - 1.0:
                self.owned.logger.info("volume %s/%s was created by an earlier try of this migration that died "
                                       "before recording it (intent at %.3f, changed at %.3f): it is ours", pool,
                                       volume, entry.at, created)
                return entry
        return None

    # -- the VM -------------------------------------------------------------------------------------
    def commit(self, disks: Sequence[DiskPlan]) -> VMHandle:
        name = self.plan.vm
        vm_id = self.driver.vm_id(name)
        # our own half-made VM from a failed try of this run goes; anybody else's is a conflict
        if vm_id is not None and self._remove_own_vm(vm_id) is None:
            raise Conflict(f"a VM named {name!r} already exists on the target and was not created by this "
                           f"migration", field="spec.targetName")
        try:
            vm_id = self.driver.define_vm(name, self.plan.vcpus, self.plan.memory_mib,
                                          [d.target_disk() for d in disks], list(self.plan.networks),
                                          nic_models=self.plan.nic_models, owner=self.owned.tag)
        except TargetCreationError:
            if self.driver.vm_id(name) is not None:
                raise Conflict(f"a VM named {name!r} appeared on the target while this migration was creating it",
                               field="spec.targetName") from None
            raise
        self.owned.ledger.record("vm", self.owned.scope, id=vm_id, name=name)
        return VMHandle(id=vm_id, name=name)

    def _remove_own_vm(self, vm_id: str) -> bool | None:
        """Delete the VM with this id if this run made it: recorded in the ledger, or tagged by a try of this
        run that died before recording it. None when it is not ours, else whether it was deleted."""
        entry = self.owned.ledger.find("vm", self.owned.scope, id=vm_id)
        if entry is None and self.driver.vm_owner(vm_id) != self.owned.tag:
            return None
        deleted = self.driver.delete_vm(vm_id)
        if entry is not None:
            self.owned.ledger.forget(entry)
        return deleted

    def rollback(self) -> list[str]:
        removed: list[str] = []
        ledger, scope, name = self.owned.ledger, self.owned.scope, self.plan.vm
        with _logged(self.owned.logger, f"removing the half-created target VM {name}"):
            ids = {e.ident["id"] for e in ledger.entries("vm") if e.scope == scope}
            ids.add(self.driver.vm_id(name))  # also one tagged by a try of this run that died before recording it
            for vm_id in sorted(i for i in ids if i):
                if self._remove_own_vm(vm_id):
                    removed.append(f"target VM {name} ({vm_id})")
        for entry in ledger.entries("volume"):
            if entry.scope != scope:
                continue
            pool, volume = entry.ident["pool"], entry.ident["volume"]
            with _logged(self.owned.logger, f"removing target volume {volume}"):
                if "key" not in entry.ident:  # an intent: the volume is ours only if it was created after it
                    key = self.driver.volume_key(pool, volume)
                    if key is not None and self._adoptable_intent(pool, volume) == entry \
                            and self.driver.delete_volume(pool, volume, key=key):
                        removed.append(f"target volume {pool}/{volume}")
                    ledger.forget(entry)
                    continue
                if self.driver.delete_volume(pool, volume, key=entry.ident["key"], owner=entry.ident.get("owner")):
                    removed.append(f"target volume {pool}/{volume}")
                ledger.forget(entry)
        return removed


class _logged:
    """Rollback goes on with the next item when one fails; the error is logged."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger, self.what = logger, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and issubclass(exc_type, Exception):
            self.logger.warning("cleanup: %s failed", self.what, exc_info=(exc_type, exc, tb))
            return True
        return False
