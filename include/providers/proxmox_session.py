"""The Proxmox VE target as one run's session: each disk uploaded as an ``import`` volume, then the VM created on
the VMID ``/cluster/nextid`` gives, its disks imported from those volumes (``import-from``), the import volumes
removed (see :mod:`include.providers.proxmox_driver`). On a node before PVE 8.4 (or without an ``import``
storage, or when the Provider says ``ssh``) each disk is instead copied over SFTP into a 0700 folder of the run's
under /var/tmp on the node, the VM created without disks, each file imported with ``qm importdisk`` and the new
volumes attached; the files and the folder are removed afterwards.

Ledger: each import volume (an intent first, then its volid, size and ctime), or each node folder and file (the
folder's intent before it is made, exclusively; each file's size and mtime), and the VMID (an intent recorded
before the create, so that a create a task died in is still found: a VM of that VMID carrying this run's owner
tag in its description). Rollback destroys that VMID (with its disks, which only it owns) and the import volumes
it recorded, each only while it is still the one recorded.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from include.diskio import Segment
from include.errors import Conflict, InvalidMigration, NotFound, TargetCreationError
from include.ledger import Entry
from include.providers.proxmox_driver import NODE_STAGE_ROOT, VmidTaken
from include.providers.session import TargetSession, VMHandle, _logged

if TYPE_CHECKING:
    from include.model import DiskPlan, TargetPlan
    from include.providers.proxmox_driver import ProxmoxDriver
    from include.providers.session import Ownership

#: how many VMIDs a create tries when other migrations take the free one first
VMID_TRIES = 5


class ProxmoxTargetSession(TargetSession):
    driver: ProxmoxDriver

    def __init__(self, driver: ProxmoxDriver, plan: TargetPlan, owned: Ownership) -> None:
        super().__init__(driver, plan, owned)
        # the node, the import storage and the way disks travel, as Validating chose them (resolved_options)
        driver.pinned_node = plan.options.get("node") or None

    def resolved_options(self) -> dict[str, str]:
        node = self.driver._node()  # noqa: SLF001 - the session is the driver's own
        method = self._method(node)
        return {"node": node, "diskImport": method,
                **({"importStorage": self.driver.import_storage(node)} if method == "upload" else {})}

    def _store(self, node: str) -> str:
        return self.plan.options.get("importStorage") or self.driver.import_storage(node)

    # -- Validating -------------------------------------------------------------------------------------
    def check_free(self, disks: Sequence[DiskPlan]) -> None:
        vm_id = self.driver.vm_id(self.plan.vm)
        if vm_id is not None and not self.owned.ledger.owns("vm", self.owned.scope, id=vm_id) \
                and self.driver.vm_owner(vm_id) != self.owned.tag:
            raise Conflict(f"a VM named {self.plan.vm!r} already exists on provider {self.plan.provider} and was "
                           f"not created by this migration", field="spec.targetName")
        node = self.driver._node()  # noqa: SLF001 - the session is the driver's own
        ssh = self._method(node) == "ssh"
        store = None if ssh else self._store(node)
        if ssh:  # the node is reached over SSH now: a missing key or an unknown host key fails here
            self.driver.node_file_key(node, NODE_STAGE_ROOT)
        for index, hint in enumerate(self.plan.networks):
            bridge = hint.bridge
            if not bridge:
                raise InvalidMigration(f"network hint {hint.name}: a Proxmox VE NIC is on a bridge; give "
                                       f"bridge: (for example vmbr0)", field=f"spec.targetNetworkHints[{index}].bridge")
            if not self.driver.bridge_exists(bridge):
                raise NotFound(f"bridge {bridge!r} (network hint {hint.name}) does not exist on node {node}",
                               field=f"spec.targetNetworkHints[{index}].bridge")
        for d in disks if store else ():
            key = self.driver.volume_key(store, d.target_volume)
            if key is not None and self._own(store, d.target_volume, key) is None:
                raise Conflict(f"the import volume {store}:import/{d.target_volume} already exists and was not "
                               f"uploaded by this migration", field="spec.targetName")

    def _method(self, node: str) -> str:
        """"upload" or "ssh" for this node and the plan's ``diskImport`` (the same answer in every task while the
        node's version and storages stay as they were)."""
        chosen = getattr(self, "_chosen", None)
        if chosen is None:
            chosen = self._chosen = self.driver.import_method(node, self.plan.options.get("diskImport", "auto"))
        return chosen

    # -- disks ------------------------------------------------------------------------------------------
    def import_disk(self, disk: DiskPlan, segments: Iterator[Segment], length: int, *,
                    sha256: str | None = None) -> None:
        node = self.driver._node()  # noqa: SLF001
        if self._method(node) == "ssh":
            self._stage_disk(node, disk, segments, length)
            return
        store = self._store(node)
        ledger, scope, volume = self.owned.ledger, self.owned.scope, disk.target_volume
        self._remove(store, volume, conflict=True)
        # an intent on the node's clock: a volume the upload's task still made after a failed wait, or after the
        # task here died, is this run's when the node made it after the intent
        intent = ledger.record("volume", scope, state="creating", pool=store, volume=volume,
                               since=self.driver.node_time(node))
        try:
            self.driver.upload_volume(store, volume, segments, length, sha256=sha256)
        except BaseException:
            try:
                self._remove_intent(intent)
            except Exception:  # noqa: BLE001 - the upload's error is what the phase reports; rollback retries
                self.owned.logger.warning("removing the half-made upload %s failed", volume, exc_info=True)
            raise
        ledger.record("volume", scope, pool=store, volume=volume, key=self.driver.volume_key(store, volume))
        ledger.forget(intent)

    def _remove_intent(self, intent: Entry) -> bool:
        """Delete the volume an intent names when the node made it after the intent; forget the intent."""
        store, volume = intent.ident["pool"], intent.ident["volume"]
        key = self.driver.volume_key(store, volume)
        removed = False
        if key is not None:
            ctime = self.driver.volume_ctime(key)
            if ctime is not None and ctime >= float(intent.ident.get("since", intent.at)) - 1.0:
                removed = self.driver.delete_volume(store, volume, key=key)
        self.owned.ledger.forget(intent)
        return removed

    def discard_disk(self, disk: DiskPlan) -> bool:
        node = self.driver._node()  # noqa: SLF001
        if self._method(node) == "ssh":
            return self._unstage(node, disk.target_volume)
        store = self._store(node)
        return self._remove(store, disk.target_volume, conflict=False)

    # -- the SSH path: files in a folder of the run's on the node ------------------------------------------
    def _stage_folder(self, node: str) -> str:
        """The run's 0700 folder on the node, made once (under the run's lock: parallel disks share it)."""
        ledger, scope = self.owned.ledger, self.owned.scope
        with ledger.state.lock(ledger.namespace, ledger.name, "node-stage"):
            for e in ledger.entries("dir"):
                if e.scope == scope and e.ident.get("role") == "node-stage" and e.ident.get("node") == node \
                        and e.state != "creating":
                    return str(e.ident["path"])
            for _ in range(3):
                path = f"{NODE_STAGE_ROOT}/vmmigration-{uuid.uuid4().hex[:16]}"
                # recorded first: a mkdir that happened but whose answer was lost is still found (and rmdir'd)
                intent = ledger.record("dir", scope, state="creating", role="node-stage", node=node, path=path)
                if self.driver.node_mkdir(node, path):
                    ledger.record("dir", scope, role="node-stage", node=node, path=path)  # the intent, made good
                    return path
                ledger.forget(intent)  # the name was taken already: somebody else's, never used
        raise TargetCreationError(f"could not make a folder of this run's under {NODE_STAGE_ROOT} on node {node}")

    def _staged(self, node: str, volume: str) -> list[Entry]:
        return [e for e in self.owned.ledger.entries("file") if e.scope == self.owned.scope
                and e.ident.get("node") == node and e.ident.get("path", "").endswith(f"/{volume}")]

    def _unstage(self, node: str, volume: str) -> bool:
        removed = False
        for entry in self._staged(node, volume):
            removed = self._remove_file(entry) or removed
        return removed

    def _remove_file(self, entry: Entry) -> bool:
        """Remove a file the ledger lists; its entry is forgotten only when it is gone."""
        # an intent's file is in the run's own 0700 folder, made by an exclusive create: ours whatever it holds
        key = None if entry.state == "creating" else entry.ident.get("key")
        outcome = self.driver.node_remove(str(entry.ident["node"]), entry.ident["path"], key=key)
        if outcome != "kept":
            self.owned.ledger.forget(entry)
        return outcome == "removed"

    def _stage_disk(self, node: str, disk: DiskPlan, segments: Iterator[Segment], length: int) -> None:
        folder = self._stage_folder(node)
        self._unstage(node, disk.target_volume)  # an earlier try's
        path = f"{folder}/{disk.target_volume}"
        ledger, scope = self.owned.ledger, self.owned.scope
        intent = ledger.record("file", scope, state="creating", node=node, path=path)
        try:
            key = self.driver.node_write(node, path, segments, length)
        except BaseException:
            try:
                self._unstage(node, disk.target_volume)
            except Exception:  # noqa: BLE001 - the write's error is what the phase reports; rollback retries
                self.owned.logger.warning("removing the half-written %s on node %s failed", path, node, exc_info=True)
            raise
        ledger.record("file", scope, node=node, path=path, key=key)
        ledger.forget(intent)

    def _clear_stage(self) -> list[str]:
        """Remove every file the run wrote on a node, then its folders (each only when empty; an intent's too,
        as its mkdir may have happened). What cannot be removed stays in the ledger, and is said."""
        removed, ledger, scope = [], self.owned.ledger, self.owned.scope
        for entry in [e for e in ledger.entries("file") if e.scope == scope]:
            if self._remove_file(entry):
                removed.append(f"{entry.ident['path']} on node {entry.ident['node']}")
        for entry in [e for e in ledger.entries("dir") if e.scope == scope and e.ident.get("role") == "node-stage"]:
            outcome = self.driver.node_remove(str(entry.ident["node"]), entry.ident["path"], folder=True)
            if outcome == "removed":
                removed.append(f"folder {entry.ident['path']} on node {entry.ident['node']}")
            if outcome != "kept":
                ledger.forget(entry)
            else:
                self.owned.logger.warning("kept the folder %s on node %s: not empty, or the node refused",
                                          entry.ident["path"], entry.ident["node"])
        return removed

    def _own(self, store: str, volume: str, key: str) -> Entry | None:
        for entry in self.owned.ledger.entries("volume"):
            if entry.state != "creating" and entry.matches("volume", self.owned.scope, pool=store, volume=volume,
                                                           key=key):
                return entry
        return None

    def _remove(self, store: str, volume: str, *, conflict: bool) -> bool:
        key = self.driver.volume_key(store, volume)
        if key is None:
            return False
        entry = self._own(store, volume, key)
        if entry is None:
            if conflict:
                raise Conflict(f"the import volume {store}:import/{volume} exists and was not uploaded by this "
                               f"migration; it is never overwritten or deleted", field="spec.targetName")
            return False
        removed = self.driver.delete_volume(store, volume, key=key)
        self.owned.ledger.forget(entry)
        return removed

    # -- the VM -----------------------------------------------------------------------------------------
    def commit(self, disks: Sequence[DiskPlan]) -> VMHandle:
        ledger, scope, name = self.owned.ledger, self.owned.scope, self.plan.vm
        vm_id = self.driver.vm_id(name)
        if vm_id is not None and self._remove_own_vm(vm_id) is None:
            raise Conflict(f"a VM named {name!r} already exists on the target and was not created by this migration",
                           field="spec.targetName")
        node = self.driver._node()  # noqa: SLF001
        ssh = self._method(node) == "ssh"
        store = None if ssh else self._store(node)
        imports = [(d.target_disk(), None if ssh else f"{store}:import/{d.target_volume}") for d in disks]
        last: Exception | None = None
        for _ in range(VMID_TRIES):
            vmid = self.driver.next_vmid()
            intent = ledger.record("vm", scope, state="creating", id=f"{node}/{vmid}", name=name)
            try:
                vm_id = self.driver.create_vm(node, vmid, name, self.plan.vcpus, self.plan.memory_mib, imports,
                                              list(self.plan.networks), self.plan.nic_models, self.owned.tag)
            except VmidTaken as err:  # the node refused the VMID before creating anything: the next one
                ledger.forget(intent)
                last = err
                continue
            except TargetCreationError:
                if self.driver.vm_owner(f"{node}/{vmid}") == self.owned.tag:
                    raise  # ours, half made: rollback removes it through the intent
                ledger.forget(intent)
                raise
            ledger.record("vm", scope, id=vm_id, name=name)  # the intent, made good (same identity)
            break
        else:
            raise TargetCreationError(f"no free VMID after {VMID_TRIES} tries: {last}")
        if ssh:  # each staged file imported into a volume of the VM (unused), then attached where planned
            _node, vmid = self.driver._split(vm_id)  # noqa: SLF001
            keys = self.driver.disk_keys([d.target_disk() for d in disks])
            attached = {}
            for d, key in zip(disks, keys, strict=True):
                staged = [e for e in self._staged(node, d.target_volume) if e.state != "creating"]
                if not staged:
                    raise TargetCreationError(f"disk {d.name} was not copied to node {node}: run Importing again")
                attached[key] = self.driver.qm_importdisk(node, vmid, staged[0].ident["path"], d.target_storage,
                                                          d.target_format)
            self.driver.attach_disks(node, vmid, attached, boot=keys[0] if keys else None)
        for d in disks:  # grown to the planned capacity (targetResourceHints.disk)
            if d.target_capacity > d.size_bytes:
                self.driver.grow_disk(vm_id, d.name, d.target_capacity)
        if ssh:  # the VM's own disks hold the data now: the staged files go
            self._clear_stage()
        else:
            for d in disks:  # the VM's own disks hold the data now: the import volumes go
                self._remove(store, d.target_volume, conflict=False)
        return VMHandle(id=vm_id, name=name)

    def _remove_own_vm(self, vm_id: str) -> bool | None:
        entry = self.owned.ledger.find("vm", self.owned.scope, id=vm_id)
        if (entry is None or entry.state == "creating") and self.driver.vm_owner(vm_id) != self.owned.tag:
            return None
        deleted = self.driver.delete_vm(vm_id)
        for e in self.owned.ledger.entries("vm"):
            if e.scope == self.owned.scope and e.ident.get("id") == vm_id:
                self.owned.ledger.forget(e)
        return deleted

    def rollback(self) -> list[str]:
        removed: list[str] = []
        ledger, scope, name = self.owned.ledger, self.owned.scope, self.plan.vm
        with _logged(self.owned.logger, f"removing the half-created target VM {name}"):
            ids = {e.ident["id"] for e in ledger.entries("vm") if e.scope == scope}
            try:
                ids.add(self.driver.vm_id(name))
            except InvalidMigration:  # two VMs of that name: only the ledger's ids are acted on
                pass
            for vm_id in sorted(i for i in ids if i):
                if self._remove_own_vm(vm_id):
                    removed.append(f"target VM {name} ({vm_id}) with its disks")
                else:
                    for e in ledger.entries("vm"):
                        if e.scope == scope and e.ident.get("id") == vm_id and e.state == "creating":
                            ledger.forget(e)  # never made, or not ours
        for entry in ledger.entries("volume"):
            if entry.scope != scope:
                continue
            store, volume = entry.ident["pool"], entry.ident["volume"]
            with _logged(self.owned.logger, f"removing the import volume {store}:import/{volume}"):
                if entry.state == "creating":
                    if self._remove_intent(entry):
                        removed.append(f"import volume {store}:import/{volume}")
                    continue
                if self.driver.delete_volume(store, volume, key=entry.ident["key"]):
                    removed.append(f"import volume {store}:import/{volume}")
                    ledger.forget(entry)
                elif self.driver.volume_key(store, volume) is None:
                    ledger.forget(entry)  # gone already
                else:  # there, but not the one recorded: left alone, and the entry kept to say so
                    self.owned.logger.warning("cleanup: kept %s:import/%s: not the upload this run made", store,
                                              volume)
        with _logged(self.owned.logger, "removing the disks copied to the node"):
            removed += self._clear_stage()
        return removed
