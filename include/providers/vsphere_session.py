"""The vSphere target as one run's session: each disk brought in (an NFC import into a carrier VM, or a datastore
upload), then the VM created on them (see :mod:`include.providers.vsphere_driver`).

What the run makes is recorded in the ledger before it is made, as an intent made good with the thing's key
once it exists: the VM's folder and a carrier's folder when this run creates them, each carrier VM and its
disk, each disk, and the VM. An intent carries the vCenter's own clock (``since``), so a file found after a
crash is taken as this run's only when vCenter made it after the intent, whatever the worker's clock says.
Rollback and a retry remove exactly those, each only while it is still the thing recorded: a VM is removed
with its disks detached first (they go by their own entries), a folder only when it is empty.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from include.diskio import Segment
from include.errors import Conflict, NotFound, TargetCreationError
from include.ledger import Entry
from include.providers.session import TargetSession, VMHandle, _logged
from include.providers.vsphere_driver import split_ds_path

if TYPE_CHECKING:
    from include.model import DiskPlan
    from include.providers.vsphere_driver import VSphereDriver

log = logging.getLogger(__name__)

class VSphereTargetSession(TargetSession):
    driver: VSphereDriver

    # -- Validating -------------------------------------------------------------------------------------
    def check_free(self, disks: Sequence[DiskPlan]) -> None:
        name = self.plan.vm
        vm_id = self.driver.vm_id(name)
        if vm_id is not None and not self._ours(vm_id):
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
                if carrier is not None and not self._ours(carrier):
                    raise Conflict(f"a VM named {self.carrier(d)!r} (the name this migration imports disk {d.name} "
                                   f"under) exists and was not created by this migration", field="spec.targetName")
            key = self.driver.volume_key(d.target_storage, d.target_volume)
            if key is not None and self._own(d.target_storage, d.target_volume, key) is None \
                    and self._adoptable(d.target_storage, d.target_volume) is None:
                raise Conflict(f"[{d.target_storage}] {d.target_volume} already exists and was not created by this "
                               f"migration", field="spec.targetName")

    def _ours(self, vm_id: str) -> bool:
        return self.owned.ledger.owns("vm", self.owned.scope, id=vm_id) or self.driver.vm_owner(vm_id) == self.owned.tag

    # -- disks ------------------------------------------------------------------------------------------
    @property
    def nfc(self) -> bool:
        """Disks come in through NFC imports (the plan's ``upload: nfc``), else by datastore upload."""
        return self.plan.options.get("upload", "datastore") == "nfc"

    def carrier(self, disk: DiskPlan) -> str:
        """The VM an NFC import of ``disk`` arrives in, before its disk is moved to the migrated VM."""
        return f"{self.plan.vm}-{disk.name}-import"

    def import_disk(self, disk: DiskPlan, segments: Iterator[Segment], length: int, *,
                    sha256: str | None = None) -> None:
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
        for entry in self._carriers(name):
            self._remove_carrier(entry)  # an earlier try's
        folder_there = self.driver.file_exists(ds, name)  # vCenter puts the carrier in [ds] <name>/
        since = self.driver.server_time()
        intent = ledger.record("vm", scope, state="creating", name=name, role="carrier", since=since,
                               nonce=uuid.uuid4().hex)
        pieces: list[Entry] = []

        def created(vm_id: str) -> None:
            ledger.record("vm", scope, id=vm_id, name=name, role="carrier")
            ledger.forget(intent)
            for path in self.driver.vm_disk_paths(vm_id):  # its disk, before anything is written into it
                src_ds, src = split_ds_path(path)
                pieces.append(ledger.record("volume", scope, state="creating", pool=src_ds, volume=src,
                                            native="true", since=since))
                if not folder_there and src.startswith(f"{name}/"):
                    ledger.record("dir", scope, pool=src_ds, path=name)  # the import made it

        try:
            vm_id = self.driver.import_carrier(name, ds, disk.size_bytes, segments, length, owner=self.owned.tag,
                                               created=created)
        except BaseException:
            self._quietly(lambda: [self._remove_carrier(e) for e in self._carriers(name)],
                          f"removing the import VM {name} after the failed import")
            raise
        keyed = []
        for piece in pieces:  # the bytes are in: the disk recorded by its key
            keyed.append(ledger.record("volume", scope, pool=piece.ident["pool"], volume=piece.ident["volume"],
                                       key=self.driver.volume_key(piece.ident["pool"], piece.ident["volume"]),
                                       native="true"))
            ledger.forget(piece)
        if len(keyed) != 1:
            raise TargetCreationError(f"the import of disk {disk.name} made {len(keyed)} disks, expected 1")
        self.driver.detach_disks(vm_id)
        self.driver.delete_vm(vm_id)  # the carrier's own files; its disk, detached, stays
        carrier_entry = ledger.find("vm", scope, id=vm_id, role="carrier")
        if carrier_entry is not None:
            ledger.forget(carrier_entry)
        src = keyed[0].ident["volume"]
        self._made(ds, volume, lambda: self.driver.move_disk(ds, src, volume), native=True)
        ledger.forget(keyed[0])
        self._remove_folder(keyed[0].ident["pool"], name)

    def _carriers(self, name: str) -> list[Entry]:
        return [e for e in self.owned.ledger.entries("vm") if e.scope == self.owned.scope
                and e.ident.get("role") == "carrier" and e.ident.get("name") == name]

    def _remove_carrier(self, entry: Entry) -> bool:
        """A carrier VM this run made (recorded, or an intent whose VM carries this run's tag), removed with its
        disks detached first. Its disks go by their own ledger entries; one the run had no time to record (a crash
        right after the import began) is recorded now as an intent of the carrier's time, so that it is removed
        only if vCenter made it after that time."""
        ledger, scope = self.owned.ledger, self.owned.scope
        vm_id = entry.ident.get("id") or self.driver.vm_id(entry.ident["name"])
        if vm_id is None or (entry.state == "creating" and self.driver.vm_owner(vm_id) != self.owned.tag):
            ledger.forget(entry)  # gone, or never made by this run
            return False
        recorded = {(e.ident.get("pool"), e.ident.get("volume")) for e in ledger.entries("volume")
                    if e.scope == scope}
        folder = f"{entry.ident['name']}/"
        for path in self.driver.vm_disk_paths(vm_id):
            ds, inside = split_ds_path(path)
            if (ds, inside) not in recorded and inside.startswith(folder) and entry.ident.get("since"):
                ledger.record("volume", scope, state="creating", pool=ds, volume=inside, native="true",
                              since=entry.ident["since"])
        self.driver.detach_disks(vm_id)
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
        kind = {"native": "true"} if entry.ident.get("native") == "true" else {}
        # its key (size and time) moves with it: an intent first, so a crash in between still finds it ours
        intent = self.owned.ledger.record("volume", self.owned.scope, state="creating", pool=ds, volume=volume,
                                          since=self.driver.server_time(), **kind)
        self.driver.resize_volume(ds, volume, disk.target_capacity)
        self.owned.ledger.record("volume", self.owned.scope, pool=ds, volume=volume,
                                 key=self.driver.volume_key(ds, volume), **kind)
        self.owned.ledger.forget(entry)
        self.owned.ledger.forget(intent)

    def _folder(self, ds: str, folder: str) -> None:
        """Create ``[ds] folder`` when it is not there, recorded as this run's (a folder that was there is not)."""
        ledger, scope = self.owned.ledger, self.owned.scope
        if not folder or any(e.state != "creating" for e in ledger.entries("dir")
                             if e.matches("dir", scope, pool=ds, path=folder)):
            return
        # a nonce: two disks' tasks making the same folder at once each have their own intent
        intent = ledger.record("dir", scope, state="creating", pool=ds, path=folder, nonce=uuid.uuid4().hex)
        if self.driver.make_folder(ds, folder):
            ledger.record("dir", scope, pool=ds, path=folder)
        ledger.forget(intent)

    def _remove_folder(self, ds: str, folder: str) -> bool:
        """Remove a folder this run made, when it is empty (checked right before the delete)."""
        ledger, scope = self.owned.ledger, self.owned.scope
        entries = [e for e in ledger.entries("dir") if e.matches("dir", scope, pool=ds, path=folder)]
        made = [e for e in entries if e.state != "creating"]
        removed = False
        if made:
            if self.driver.folder_empty(ds, folder):
                self.driver.delete_file(ds, folder)
                removed = True
            else:
                log.info("kept folder [%s] %s: it is not empty", ds, folder)
        for entry in entries:
            ledger.forget(entry)
        return removed

    def _made(self, ds: str, volume: str, make: Callable[[], Any], *, native: bool = False) -> None:
        """Make a file with an intent recorded first, then recorded by its key (``native``: a virtual disk of
        vSphere's own, several extents, deleted as a disk)."""
        ledger, scope = self.owned.ledger, self.owned.scope
        kind = {"native": "true"} if native else {}
        intent = ledger.record("volume", scope, state="creating", pool=ds, volume=volume,
                               since=self.driver.server_time(), **kind)
        try:
            make()
        except BaseException:
            self._quietly(lambda: self._remove_intent(intent), f"removing the half-made [{ds}] {volume}")
            raise
        ledger.record("volume", scope, pool=ds, volume=volume, key=self.driver.volume_key(ds, volume), **kind)
        ledger.forget(intent)

    def _quietly(self, fn: Callable[[], Any], what: str) -> None:
        """Clean up after a failure without hiding it: a cleanup that fails too is logged, and rollback (which
        works from the ledger) tries again."""
        try:
            fn()
        except Exception:  # noqa: BLE001 - the original error is what the phase reports
            self.owned.logger.warning("%s failed; rollback tries again", what, exc_info=True)

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
        """An intent for this file that the file does not predate, on vCenter's clock: a try that died before
        recording it."""
        created = self.driver.volume_created_at(ds, volume)
        if created is None:
            return None
        for entry in self.owned.ledger.entries("volume"):
            if entry.state == "creating" and entry.scope == self.owned.scope and "key" not in entry.ident \
                    and entry.ident.get("pool") == ds and entry.ident.get("volume") == volume \
                    and created >= float(entry.ident.get("since", entry.at)) - 1.0:
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
            other = self.driver.vm_id(name)
            if other is not None and self.driver.vm_owner(other) != self.owned.tag:
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
        deleted = self.driver.delete_vm(vm_id)  # its disks are detached first and stay
        if entry is not None:
            self.owned.ledger.forget(entry)
        return deleted

    def rollback(self) -> list[str]:
        removed: list[str] = []
        ledger, scope, name = self.owned.ledger, self.owned.scope, self.plan.vm
        for entry in [e for e in ledger.entries("vm") if e.scope == scope and e.ident.get("role") == "carrier"]:
            with _logged(self.owned.logger, f"removing the import VM {entry.ident['name']}"):
                if self._remove_carrier(entry):
                    removed.append(f"import VM {entry.ident['name']}")
        with _logged(self.owned.logger, f"removing the half-created target VM {name}"):
            ids = {e.ident["id"] for e in ledger.entries("vm") if e.scope == scope and e.ident.get("id")}
            ids.add(self.driver.vm_id(name))  # also one tagged by a try of this run that died before recording it
            for vm_id in sorted(i for i in ids if i):
                if self._remove_own_vm(vm_id):
                    removed.append(f"target VM {name} ({vm_id})")
        for entry in ledger.entries("volume"):
            if entry.scope != scope:
                continue
            ds, volume = entry.ident["pool"], entry.ident["volume"]
            with _logged(self.owned.logger, f"removing [{ds}] {volume}"):
                if entry.state == "creating":
                    key = self.driver.volume_key(ds, volume)
                    if key is not None and self._adoptable(ds, volume) == entry and self._delete(entry, key):
                        removed.append(f"target disk [{ds}] {volume}")
                    ledger.forget(entry)
                    continue
                if self._delete(entry, entry.ident["key"]):
                    removed.append(f"target disk [{ds}] {volume}")
                ledger.forget(entry)
        folders = {(e.ident["pool"], e.ident["path"]) for e in ledger.entries("dir") if e.scope == scope}
        for ds, folder in sorted(folders, key=lambda f: -f[1].count("/")):
            with _logged(self.owned.logger, f"removing folder [{ds}] {folder}"):
                if self._remove_folder(ds, folder):
                    removed.append(f"empty folder [{ds}] {folder}")
        return removed

    def keep(self) -> None:
        super().keep()
        for entry in self.owned.ledger.entries("dir"):
            if entry.scope == self.owned.scope:
                self.owned.ledger.forget(entry)
