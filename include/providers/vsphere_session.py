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
from include.providers.vsphere_driver import split_ds_path

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
            if self.nfc:
                carrier = self.driver.vm_id(self.carrier(d))
                if carrier is not None and not self.owned.ledger.owns("vm", self.owned.scope, id=carrier) \
                        and self.driver.vm_owner(carrier) != self.owned.tag:
                    raise Conflict(f"a VM named {self.carrier(d)!r} (the name this migration imports disk {d.name} "
                                   f"under) exists and was not created by this migration", field="spec.targetName")
            key = self.driver.volume_key(d.target_storage, d.target_volume)
            if key is not None and self._own(d.target_storage, d.target_volume, key) is None \
                    and self._adoptable(d.target_storage, d.target_volume) is None:
                raise Conflict(f"[{d.target_storage}] {d.target_volume} already exists and was not created by this "
                               f"migration", field="spec.targetName")

    # -- disks ------------------------------------------------------------------------------------------
    @property
    def nfc(self) -> bool:
        """Disks come in through NFC imports (the plan's ``upload: nfc``), else by datastore upload."""
        return self.plan.options.get("upload", "datastore") == "nfc"

    def carrier(self, disk: DiskPlan) -> str:
        """The VM an NFC import of ``disk`` arrives in, before its disk is moved to the migrated VM."""
        return f"{self.plan.vm}-{disk.name}-import"

    def import_disk(self, disk: DiskPlan, segments: Iterator[Segment], length: int) -> None:
        ds, volume = disk.target_storage, disk.target_volume
        self._folder(ds, volume.rpartition("/")[0])
        self._remove(ds, volume, conflict=True)
        if self.nfc:
            self._import_nfc(disk, segments, length)
        else:
            self._made(ds, volume, lambda: self.driver.write_volume(ds, volume, segments, length))

    def _import_nfc(self, disk: DiskPlan, segments: Iterator[Segment], length: int) -> None:
        """ImportVApp of a one-disk carrier VM (the disk streamed into its lease), the disk detached and moved
        into the migrated VM's folder, the carrier removed: each step in the ledger before it is taken."""
        ledger, scope, ds, volume = self.owned.ledger, self.owned.scope, disk.target_storage, disk.target_volume
        name = self.carrier(disk)
        for entry in [e for e in ledger.entries("vm") if e.scope == scope and e.ident.get("name") == name]:
            self._remove_carrier(entry)  # an earlier try's
        intent = ledger.record("vm", scope, state="creating", name=name, role="carrier")
        made: list[str] = []

        def created(vm_id: str) -> None:
            made.append(vm_id)
            ledger.record("vm", scope, id=vm_id, name=name, role="carrier")
            ledger.forget(intent)

        try:
            vm_id = self.driver.import_carrier(name, ds, disk.size_bytes, segments, length, owner=self.owned.tag,
                                               created=created)
        except BaseException:
            for entry in [e for e in ledger.entries("vm") if e.scope == scope and e.ident.get("name") == name]:
                self._remove_carrier(entry)
            raise
        paths = self.driver.detach_disks(vm_id)
        if len(paths) != 1:
            raise TargetCreationError(f"the import of disk {disk.name} made {len(paths)} disks, expected 1")
        src_ds, src = split_ds_path(paths[0])
        piece = ledger.record("volume", scope, pool=src_ds, volume=src, key=self.driver.volume_key(src_ds, src),
                              native="true")
        self.driver.delete_vm(vm_id)  # the carrier's own files; its disk, detached, stays
        ledger.forget(ledger.find("vm", scope, id=vm_id) or intent)
        self._made(ds, volume, lambda: self.driver.move_disk(ds, src, volume), native=True)
        ledger.forget(piece)
        folder = src.rpartition("/")[0]
        if folder and folder != volume.rpartition("/")[0] and self.driver.folder_empty(src_ds, folder):
            self.driver.delete_file(src_ds, folder)  # made by the import

    def _remove_carrier(self, entry: Entry) -> bool:
        """A carrier VM this run made (recorded, or an intent whose VM carries this run's tag): removed with its
        disk, which its import made."""
        ledger = self.owned.ledger
        vm_id = entry.ident.get("id") or self.driver.vm_id(entry.ident["name"])
        removed = False
        if vm_id and (entry.state != "creating" or self.driver.vm_owner(vm_id) == self.owned.tag):
            for path in self.driver.detach_disks(vm_id):
                ds, inside = split_ds_path(path)
                key = self.driver.volume_key(ds, inside)
                if key is not None:
                    self.driver.delete_disk(ds, inside, key=key)
            removed = self.driver.delete_vm(vm_id)
        ledger.forget(entry)
        return removed

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
        kind = {"native": "true"} if entry.ident.get("native") == "true" else {}
        self.owned.ledger.record("volume", self.owned.scope, pool=ds, volume=volume,
                                 key=self.driver.volume_key(ds, volume), **kind)
        self.owned.ledger.forget(entry)

    def _folder(self, ds: str, folder: str) -> None:
        if not folder or self.owned.ledger.find("dir", self.owned.scope, pool=ds, path=folder):
            return
        intent = self.owned.ledger.record("dir", self.owned.scope, state="creating", pool=ds, path=folder)
        if self.driver.make_folder(ds, folder):
            self.owned.ledger.record("dir", self.owned.scope, pool=ds, path=folder)  # the intent, now made
        else:
            self.owned.ledger.forget(intent)  # it was there already: not ours

    def _made(self, ds: str, volume: str, make, *, native: bool = False) -> None:
        """Make a file with an intent recorded first, then recorded by its key (``native``: a virtual disk of
        vSphere's own, several extents, deleted as a disk)."""
        ledger, scope = self.owned.ledger, self.owned.scope
        kind = {"native": "true"} if native else {}
        intent = ledger.record("volume", scope, state="creating", pool=ds, volume=volume, **kind)
        try:
            make()
        except BaseException:
            self._remove_intent(intent)
            raise
        ledger.record("volume", scope, pool=ds, volume=volume, key=self.driver.volume_key(ds, volume), **kind)
        ledger.forget(intent)

    def _delete(self, entry: Entry, key: str) -> bool:
        ds, volume = entry.ident["pool"], entry.ident["volume"]
        if entry.ident.get("native") == "true":
            return self.driver.delete_disk(ds, volume, key=key)
        return self.driver.delete_volume(ds, volume, key=key)

    def _remove_intent(self, intent: Entry) -> None:
        ds, volume = intent.ident["pool"], intent.ident["volume"]
        key = self.driver.volume_key(ds, volume)
        if key is not None and self._adoptable(ds, volume) == intent:
            self._delete(intent, key)
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
        removed = self._delete(entry, key)
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
        for entry in [e for e in ledger.entries("vm") if e.scope == scope and e.ident.get("role") == "carrier"]:
            with _logged(self.owned.logger, f"removing the import VM {entry.ident['name']}"):
                if self._remove_carrier(entry):
                    removed.append(f"import VM {entry.ident['name']} with its disk")
        with _logged(self.owned.logger, f"removing the half-created target VM {name}"):
            ids = {e.ident["id"] for e in ledger.entries("vm") if e.scope == scope and e.ident.get("id")}
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
                if self._delete(entry, entry.ident["key"]):
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
