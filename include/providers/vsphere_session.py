"""The vSphere target as one run's session: disks uploaded to the datastore, then the VM created on them
(see :mod:`include.providers.vsphere_driver`).

What the run makes on the datastore is recorded in the ledger before it is made (an intent, made good
with the file's key once it exists): the VM's folder when this run created it, each disk
and the VM. Rollback and a retry remove exactly those, each only while it is still the file recorded.
A VM this run made is removed with its disks detached first, so that removing it never deletes a disk
the ledger does not name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from include.diskio import Segment
from include.errors import Conflict, NotFound, TargetCreationError
from include.ledger import Entry
from include.providers.session import TargetSession, VMHandle, _logged

if TYPE_CHECKING:
    from include.model import DiskPlan
    from include.providers.vsphere_driver import VSphereDriver


class VSphereTargetSession(TargetSession):
    driver: VSphereDriver

    # -- Validating -------------------------------------------------------------------------------------
    def check_free(self, disks: Sequence[DiskPlan]) -> None:
        name = self.plan.vm
        vm_id = self.driver.vm_id(name)
        if vm_id is not None and not self.owned.ledger.owns("vm", self.owned.scope, id=vm_id) \
                and self.driver.vm_owner(vm_id) != self.owned.tag:
            raise Conflict(f"a VM named {name!r} already exists on provider {self.plan.provider} and was not "
                           f"created by this migration", field="spec.targetName")
        self.driver.placement(self.plan.storage)  # the Provider's default pool, cluster or folder exists
        for index, hint in enumerate(self.plan.networks):
            net = hint.network or hint.bridge
            if net and not self.driver.network_exists(net):
                raise NotFound(f"port group {net!r} (network hint {hint.name}) does not exist on provider "
                               f"{self.plan.provider}", field=f"spec.targetNetworkHints[{index}].network")
        for d in disks:
            key = self.driver.volume_key(d.target_storage, d.target_volume)
            if key is not None and self._own(d.target_storage, d.target_volume, key) is None \
                    and self._adoptable(d.target_storage, d.target_volume) is None:
                raise Conflict(f"[{d.target_storage}] {d.target_volume} already exists and was not created by this "
                               f"migration", field="spec.targetName")

    # -- disks ------------------------------------------------------------------------------------------
    def import_disk(self, disk: DiskPlan, segments: Iterator[Segment], length: int) -> None:
        ds, volume = disk.target_storage, disk.target_volume
        self._folder(ds, volume.rpartition("/")[0])
        self._remove(ds, volume, conflict=True)
        self._made(ds, volume, lambda: self.driver.write_volume(ds, volume, segments, length))

    def discard_disk(self, disk: DiskPlan) -> bool:
        return self._remove(disk.target_storage, disk.target_volume, conflict=False)

    def finish_disk(self, disk: DiskPlan) -> None:
        if disk.target_capacity <= disk.size_bytes:
            return
        ds, volume = disk.target_storage, disk.target_volume
        entry = self._own(ds, volume, self.driver.volume_key(ds, volume) or "")
        if entry is None:
            raise TargetCreationError(f"[{ds}] {volume} is not the disk this migration imported; not grown")
        self.driver.resize_volume(ds, volume, disk.target_capacity)
        # its key (size and time, where the datastore gives no UUID) moved with it
        self.owned.ledger.record("volume", self.owned.scope, pool=ds, volume=volume,
                                 key=self.driver.volume_key(ds, volume))
        self.owned.ledger.forget(entry)

    def _folder(self, ds: str, folder: str) -> None:
        if not folder or self.owned.ledger.find("dir", self.owned.scope, pool=ds, path=folder):
            return
        intent = self.owned.ledger.record("dir", self.owned.scope, state="creating", pool=ds, path=folder)
        if self.driver.make_folder(ds, folder):
            self.owned.ledger.record("dir", self.owned.scope, pool=ds, path=folder)
        self.owned.ledger.forget(intent)

    def _made(self, ds: str, volume: str, make) -> None:
        """Make a file with an intent recorded first, then recorded by its key."""
        ledger, scope = self.owned.ledger, self.owned.scope
        intent = ledger.record("volume", scope, state="creating", pool=ds, volume=volume)
        try:
            make()
        except BaseException:
            self._remove_intent(intent)
            raise
        ledger.record("volume", scope, pool=ds, volume=volume, key=self.driver.volume_key(ds, volume))
        ledger.forget(intent)

    def _remove_intent(self, intent: Entry) -> None:
        ds, volume = intent.ident["pool"], intent.ident["volume"]
        key = self.driver.volume_key(ds, volume)
        if key is not None and self._adoptable(ds, volume) == intent:
            self.driver.delete_volume(ds, volume, key=key)
        self.owned.ledger.forget(intent)

    def _remove(self, ds: str, volume: str, *, conflict: bool) -> bool:
        key = self.driver.volume_key(ds, volume)
        if key is None:
            return False
        entry = self._own(ds, volume, key) or self._adoptable(ds, volume)
        if entry is None:
            if conflict:
                raise Conflict(f"[{ds}] {volume} already exists and was not created by this migration; it is never "
                               f"overwritten or deleted", field="spec.targetName")
            return False
        removed = self.driver.delete_volume(ds, volume, key=key)
        self.owned.ledger.forget(entry)
        return removed

    def _own(self, ds: str, volume: str, key: str) -> Entry | None:
        for entry in self.owned.ledger.entries("volume"):
            if entry.state != "creating" and entry.matches("volume", self.owned.scope, pool=ds, volume=volume,
                                                           key=key):
                return entry
        return None

    def _adoptable(self, ds: str, volume: str) -> Entry | None:
        """An intent for this file that the file does not predate: a try that died before recording it."""
        created = self.driver.volume_created_at(ds, volume)
        if created is None:
            return None
        for entry in self.owned.ledger.entries("volume"):
            if entry.state == "creating" and entry.scope == self.owned.scope and "key" not in entry.ident \
                    and entry.ident.get("pool") == ds and entry.ident.get("volume") == volume \
                    and created >= entry.at - 1.0:
                return entry
        return None

    # -- the VM -----------------------------------------------------------------------------------------
    def commit(self, disks: Sequence[DiskPlan]) -> VMHandle:
        name = self.plan.vm
        vm_id = self.driver.vm_id(name)
        if vm_id is not None and self._remove_own_vm(vm_id) is None:
            raise Conflict(f"a VM named {name!r} already exists on the target and was not created by this migration",
                           field="spec.targetName")
        try:
            vm_id = self.driver.define_vm(name, self.plan.vcpus, self.plan.memory_mib,
                                          [d.target_disk() for d in disks], list(self.plan.networks),
                                          nic_models=self.plan.nic_models, owner=self.owned.tag)
        except TargetCreationError:
            if self.driver.vm_id(name) is not None and self.driver.vm_owner(self.driver.vm_id(name) or "") \
                    != self.owned.tag:
                raise Conflict(f"a VM named {name!r} appeared on the target while this migration was creating it",
                               field="spec.targetName") from None
            raise
        self.owned.ledger.record("vm", self.owned.scope, id=vm_id, name=name)
        return VMHandle(id=vm_id, name=name)

    def _remove_own_vm(self, vm_id: str) -> bool | None:
        """Remove the VM if this run made it, its disks detached first (they stay, for the ledger to decide)."""
        entry = self.owned.ledger.find("vm", self.owned.scope, id=vm_id)
        if entry is None and self.driver.vm_owner(vm_id) != self.owned.tag:
            return None
        deleted = self.driver.delete_vm_keeping_disks(vm_id)
        if entry is not None:
            self.owned.ledger.forget(entry)
        return deleted

    def rollback(self) -> list[str]:
        removed: list[str] = []
        ledger, scope, name = self.owned.ledger, self.owned.scope, self.plan.vm
        with _logged(self.owned.logger, f"removing the half-created target VM {name}"):
            ids = {e.ident["id"] for e in ledger.entries("vm") if e.scope == scope}
            ids.add(self.driver.vm_id(name))
            for vm_id in sorted(i for i in ids if i):
                if self._remove_own_vm(vm_id):
                    removed.append(f"target VM {name} ({vm_id})")
        for entry in ledger.entries("volume"):
            if entry.scope != scope:
                continue
            ds, volume = entry.ident["pool"], entry.ident["volume"]
            with _logged(self.owned.logger, f"removing [{ds}] {volume}"):
                if entry.state == "creating":
                    self._remove_intent(entry)
                    continue
                if self.driver.delete_volume(ds, volume, key=entry.ident["key"]):
                    removed.append(f"target disk [{ds}] {volume}")
                ledger.forget(entry)
        for entry in ledger.entries("dir"):
            if entry.scope != scope or entry.state == "creating":
                if entry.scope == scope:
                    ledger.forget(entry)
                continue
            ds, folder = entry.ident["pool"], entry.ident["path"]
            with _logged(self.owned.logger, f"removing folder [{ds}] {folder}"):
                if self.driver.folder_empty(ds, folder):
                    self.driver.delete_file(ds, folder)
                    removed.append(f"empty folder [{ds}] {folder}")
                else:
                    self.owned.logger.info("cleanup: kept folder [%s] %s (not empty)", ds, folder)
                ledger.forget(entry)
        return removed

    def keep(self) -> None:
        super().keep()
        for entry in self.owned.ledger.entries("dir"):
            if entry.scope == self.owned.scope:
                self.owned.ledger.forget(entry)
