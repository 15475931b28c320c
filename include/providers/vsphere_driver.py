"""VMware vSphere (vCenter or ESXi) through pyvmomi.

Source: the VM by name (or instance UUID); its disks on every controller type, NICs, CPUs and memory (not
its firmware or guest OS id); a snapshot; every disk read as it is at that snapshot through an NFC
``ExportSnapshot`` lease (a streamOptimized VMDK stream), kept alive while it streams and completed or
aborted. A running VM is exported the same way from a snapshot taken while it runs (without its memory;
quiesced by VMware Tools where they run in the guest): the point-in-time port of :class:`HypervisorDriver`.

Target (:mod:`include.providers.vsphere_session`): each disk comes in through an NFC ``ImportVApp`` lease of a
one-disk carrier VM (streamOptimized, the default) and is moved into the VM's folder, or, with the Provider's
``datastore`` upload, is PUT into that folder through ``/folder`` as a monolithicSparse VMDK; the VM is then
created on those disks with ``CreateVM_Task``. It carries its owner tag in ``extraConfig`` (how a retry
recognises a VM its own try created but died before recording), and so do the disk names (``sda``,
``vda``...), so that a disk is recognised by name after the migration whatever controller it landed on.

Disk identity on a datastore is its UUID (``QueryVirtualDiskUuid``) where the datastore gives one, with its
size and modification time (the simulator derives the UUID from the path): a delete acts only on the file the
ledger recorded. What the tests could and could not verify against govmomi's simulator is in the README.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from include.diskio import Segment
from include.errors import (
    Conflict,
    HypervisorAuthError,
    HypervisorError,
    InvalidMigration,
    NotFound,
    PlanChanged,
    TargetCreationError,
    UnsupportedDiskFormat,
)
from include.providers.base import DiskInfo, HypervisorDriver, NicInfo, PointInTime, TargetDisk, VMInfo
from include.providers.vsphere_api import Lease, TaskFault, VSphere, fault_message, redact_urls
from include.spec import NetworkHint

if TYPE_CHECKING:
    from include.inventory import ProviderInfo
    from include.model import TargetPlan
    from include.providers.session import Ownership, TargetSession

log = logging.getLogger(__name__)
T = TypeVar("T")

#: extraConfig key of the owner tag (``<namespace>/<name> <run>``) on the VMs the engine creates
OWNER_KEY = "vmmigration.owner"
#: extraConfig key prefix of a disk's name (``vmmigration.disk.<controller bus>-<unit>`` = ``vda``)
DISK_NAME_KEY = "vmmigration.disk."
#: the Provider annotation choosing how disks are uploaded to vSphere (see VSphereDriver.plan_options)
UPLOAD_ANNOTATION = "vmmigration.virtrigaud.io/vsphere-disk-upload"
UPLOAD_METHODS = ("nfc", "datastore")
#: what a streamOptimized disk is sent as to an NFC import lease
STREAM_VMDK = "application/x-vnd.vmware-streamVmdk"
#: the guest OS id given to a migrated VM when nothing better is known
DEFAULT_GUEST_ID = "otherGuest64"

_CONTROLLER_BUS = (  # (vim class name, bus name), most specific first
    ("ParaVirtualSCSIController", "pvscsi"),
    ("VirtualLsiLogicSASController", "lsilogicsas"),
    ("VirtualLsiLogicController", "lsilogic"),
    ("VirtualBusLogicController", "buslogic"),
    ("VirtualAHCIController", "sata"),
    ("VirtualIDEController", "ide"),
    ("VirtualNVMEController", "nvme"),
)
_SCSI = ("pvscsi", "lsilogic", "lsilogicsas", "buslogic")
_BUSES = (*_SCSI, "sata", "ide", "nvme")
_NIC_MODELS = {"VirtualVmxnet3": "vmxnet3", "VirtualE1000e": "e1000e", "VirtualE1000": "e1000",
               "VirtualVmxnet2": "vmxnet2", "VirtualPCNet32": "pcnet32", "VirtualSriovEthernetCard": "sriov"}


def _vim() -> Any:
    from pyVmomi import vim

    return vim


#: faults a retry cannot cure: the account lacks a privilege, or the request itself is wrong
_PERMANENT_FAULTS = ("NoPermission", "InvalidLogin", "InvalidArgument", "InvalidName", "NotSupported",
                     "InvalidDatastorePath", "InvalidDatastore", "NotFound")


def _vsphere_faults(fn: Callable[..., T]) -> Callable[..., T]:
    """A public driver call: a vSphere fault becomes an engine error with the fault's message (no traceback of
    SOAP internals): permanent for a missing privilege or a refused request, transient otherwise. An expired
    session (``NotAuthenticated``) logs in again; the call is run once more only when it changes nothing
    (:data:`_IDEMPOTENT`), else it fails transient and Airflow's retry runs the whole phase again."""

    @functools.wraps(fn)
    def wrapper(self: VSphereDriver, *args: Any, **kwargs: Any) -> T:
        from http.client import HTTPException

        from pyVmomi import vmodl

        vim = _vim()
        for attempt in (1, 2):
            try:
                return fn(self, *args, **kwargs)
            except vim.fault.NotAuthenticated:
                self.api.reset()
                if attempt == 2 or fn.__name__ not in _IDEMPOTENT:
                    raise HypervisorError(f"vSphere {self.endpoint}: {fn.__name__}: the session expired midway; "
                                          f"logged in again for the retry") from None
                log.info("vSphere session at %s is no longer authenticated: logging in again", self.endpoint)
            except vmodl.MethodFault as err:
                kind = type(err).__name__.rsplit(".", 1)[-1]
                message = f"vSphere {self.endpoint}: {fn.__name__}: {fault_message(err)}"
                if kind == "NoPermission":
                    raise HypervisorAuthError(f"{message} (the Provider's account lacks this privilege)") from None
                if kind in _PERMANENT_FAULTS:
                    raise InvalidMigration(message) from None
                raise HypervisorError(message) from None
            except (OSError, HTTPException) as err:
                raise HypervisorError(f"vSphere {self.endpoint}: {fn.__name__}: {type(err).__name__}: "
                                      f"{redact_urls(str(err))}") from None
        raise AssertionError("unreachable")

    return wrapper


def _bus_of(controller: Any) -> str:
    names = {type(controller).__name__.rsplit(".", 1)[-1]}
    names.update(c.__name__.rsplit(".", 1)[-1] for c in type(controller).__mro__)
    for cls_name, bus in _CONTROLLER_BUS:
        if cls_name in names:
            return bus
    return "scsi"


def _letters(n: int) -> str:
    out = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(ord("a") + r) + out
    return out


def split_ds_path(path: str) -> tuple[str, str]:
    """``[datastore1] vm/disk.vmdk`` -> (``datastore1``, ``vm/disk.vmdk``)."""
    m = re.match(r"^\[([^\]]+)\]\s*(.*)$", path or "")
    if not m:
        raise HypervisorError(f"{path!r} is not a datastore path ([datastore] folder/file)")
    return m.group(1), m.group(2)


class VSphereDriver(HypervisorDriver):
    #: a disk written for vSphere in staging: monolithicSparse, one file holes left out (streamOptimized is
    #: for an NFC import)
    vmdk_subformat = "monolithicSparse"
    DEFAULT_NIC_MODEL = "vmxnet3"
    exports_from_snapshot = True
    target_formats = ("vmdk",)

    def __init__(self, endpoint: str, credentials: Mapping[str, str] | None = None, *,
                 api: VSphere | None = None) -> None:
        self.endpoint = endpoint
        self.api = api or VSphere(endpoint, credentials)

    #: the Provider's ``spec.defaults`` (datastore, cluster, resourcePool, folder)
    defaults: Mapping[str, Any] = {}

    def configure(self, provider: ProviderInfo) -> None:
        if provider.insecure_skip_verify:
            self.api.insecure()
        self.defaults = dict(provider.defaults or {})

    @classmethod
    def for_provider(cls, endpoint: str, credentials: Mapping[str, str] | None) -> VSphereDriver:
        return cls(endpoint, credentials)

    @classmethod
    def from_hook(cls, hook: Any) -> VSphereDriver:
        """A driver on a ``VSphereHook``'s session (``hook.api``)."""
        return cls(hook.endpoint, api=hook.api)

    # -- planning (no connection) --------------------------------------------------------------------------
    @classmethod
    def plan_options(cls, provider: ProviderInfo) -> dict[str, str]:
        """How disks are uploaded, from the Provider's annotation :data:`UPLOAD_ANNOTATION`: ``nfc`` (the
        default: an NFC import of a streamOptimized disk, which a real ESXi runs from) or ``datastore`` (an
        HTTP PUT of a monolithicSparse file into the datastore, attached as it is)."""
        from include.errors import InvalidMigration

        value = (provider.annotations.get(UPLOAD_ANNOTATION) or "nfc").strip().lower()
        if value not in UPLOAD_METHODS:
            raise InvalidMigration(f"Provider {provider.ref} annotation {UPLOAD_ANNOTATION}={value!r}: use one of "
                                   f"{', '.join(UPLOAD_METHODS)}", field="spec.targetProviderRef")
        return {"upload": value}

    @classmethod
    def vmdk_subformat_for(cls, options: Mapping[str, str]) -> str:
        return "streamOptimized" if options.get("upload", "datastore") == "nfc" else "monolithicSparse"

    @classmethod
    def target_volume_name(cls, vm: str, disk: str, fmt: str) -> str:
        """A disk lands in the VM's own folder on the datastore, as vSphere keeps it."""
        return f"{vm}/{vm}-{disk}.vmdk"

    @classmethod
    def disk_bus(cls, source_bus: str) -> str:
        """vSphere's own controllers stay; virtio and QEMU's SCSI become paravirtual SCSI; sata, ide, nvme stay."""
        if source_bus in ("pvscsi", "lsilogic", "lsilogicsas", "buslogic", "sata", "ide", "nvme"):
            return source_bus
        return "pvscsi"

    @classmethod
    def nic_model(cls, source_model: str | None) -> str:
        """E1000 and E1000e stay (their guest drivers still bind); virtio and anything else become vmxnet3."""
        model = (source_model or "").lower()
        return model if model in ("vmxnet3", "e1000", "e1000e") else cls.DEFAULT_NIC_MODEL

    # -- the session --------------------------------------------------------------------------------------
    def close(self) -> None:
        self.api.logout()

    def check(self) -> str:
        about = self.api.content.about
        return f"{about.fullName} at {self.endpoint}"

    def identity(self) -> str:
        """The vCenter's instance UUID: the same inventory whatever address reaches it."""
        uuid = getattr(self.api.content.about, "instanceUuid", None)
        return f"vcenter:{uuid}" if uuid else self.endpoint

    # -- inventory ----------------------------------------------------------------------------------------
    def _vm(self, name: str) -> Any:
        vim = _vim()
        found = self.api.find_named(vim.VirtualMachine, name)
        if not found:
            # a VirtualMachine object may name the VM by its instance UUID
            by_id = self.api.vm_by_uuid(name) if re.fullmatch(r"[0-9a-fA-F-]{36}", name) else None
            if by_id is not None:
                return by_id
            raise NotFound(f"VM {name!r} not found on vSphere {self.endpoint}")
        if len(found) > 1:
            raise InvalidMigration(f"{len(found)} VMs are named {name!r} on vSphere {self.endpoint}; name it by its "
                                   f"instance UUID", field="spec.sourceName")
        return found[0]

    def _vm_by_id(self, vm_id: str) -> Any | None:
        return self.api.vm_by_uuid(vm_id)

    def get_vm(self, name: str) -> VMInfo:
        return self._vm_info(self._vm(name))

    def _vm_info(self, vm: Any) -> VMInfo:
        vim = _vim()
        config = self.api.call(lambda: vm.config)
        if config is None:
            raise HypervisorError(f"VM {vm.name} has no configuration (it is being created or is inaccessible)")
        devices = config.hardware.device
        by_key = {d.key: d for d in devices}
        extra = {o.key: o.value for o in (config.extraConfig or [])}
        sizes = self._base_sizes(vm)
        disks, counters = [], {"sd": 0, "hd": 0, "nvme": 0}
        for dev in devices:
            if not isinstance(dev, vim.vm.device.VirtualDisk):
                continue
            controller = by_key.get(dev.controllerKey)
            bus = _bus_of(controller) if controller is not None else "scsi"
            backing = dev.backing
            path = getattr(backing, "fileName", None)
            if not path:
                raise UnsupportedDiskFormat(f"disk {dev.deviceInfo.label if dev.deviceInfo else dev.key} of VM "
                                            f"{vm.name} has no file backing (an RDM or a vVol?)")
            slot = f"{getattr(controller, 'busNumber', 0)}-{dev.unitNumber}"
            prefix = "hd" if bus == "ide" else ("nvme" if bus == "nvme" else "sd")
            auto = (f"nvme0n{counters['nvme'] + 1}" if prefix == "nvme" else prefix + _letters(counters[prefix]))
            counters[prefix] += 1
            name = extra.get(f"{DISK_NAME_KEY}{bus}{slot}") or auto
            base = path
            parent = getattr(backing, "parent", None)
            while parent is not None and getattr(parent, "fileName", None):  # a snapshot's delta: its base
                base, parent = parent.fileName, getattr(parent, "parent", None)
            datastore, inside = split_ds_path(base)
            capacity = int(dev.capacityInBytes or dev.capacityInKB * 1024)
            disks.append(DiskInfo(name=name, format="vmdk", capacity=capacity,
                                  allocation=int(sizes.get(dev.key) or capacity), path=base, pool=datastore,
                                  volume=inside, bus=bus))
        nics = []
        for dev in devices:
            if not isinstance(dev, vim.vm.device.VirtualEthernetCard):
                continue
            kind = type(dev).__name__.rsplit(".", 1)[-1]
            model = next((m for k, m in _NIC_MODELS.items() if kind == k), kind)
            nics.append(NicInfo(network=self._nic_network(dev), model=model, mac=dev.macAddress))
        running = self.api.call(lambda: vm.runtime.powerState) != vim.VirtualMachinePowerState.poweredOff
        return VMInfo(name=vm.name, running=running, vcpus=int(config.hardware.numCPU),
                      memory_mib=int(config.hardware.memoryMB), disks=tuple(disks), interfaces=tuple(nics),
                      id=config.instanceUuid)

    def _nic_network(self, dev: Any) -> str | None:
        vim = _vim()
        backing = dev.backing
        if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
            key = backing.port.portgroupKey
            for pg in self.api.objects(vim.dvs.DistributedVirtualPortgroup):
                if pg.key == key:
                    return pg.name
            return key
        return getattr(backing, "deviceName", None)

    def _base_sizes(self, vm: Any) -> dict[int, int]:
        """Per disk (device key), the bytes of its base disk on the datastore: the descriptor and its extents
        (``-flat``, ``-sesparse``...), the first link of the disk's chain in the VM's file layout."""
        layout = getattr(vm, "layoutEx", None)
        files = {f.key: int(f.size or 0) for f in (getattr(layout, "file", None) or [])}
        out: dict[int, int] = {}
        for disk in getattr(layout, "disk", None) or []:
            chain = list(getattr(disk, "chain", None) or [])
            if chain:
                out[disk.key] = sum(files.get(k, 0) for k in (chain[0].fileKey or []))
        return out

    def vm_id(self, name: str) -> str | None:
        """The instance UUID of the VM named ``name`` (or whose instance UUID ``name`` is), None if none is."""
        vim = _vim()
        found = self.api.find_named(vim.VirtualMachine, name)
        if not found and re.fullmatch(r"[0-9a-fA-F-]{36}", name):
            found = [vm for vm in [self.api.vm_by_uuid(name)] if vm is not None]
        if not found:
            return None
        if len(found) > 1:
            raise Conflict(f"{len(found)} VMs are named {name!r} on vSphere {self.endpoint}")
        config = getattr(found[0], "config", None)
        if config is None:
            raise HypervisorError(f"VM {name} has no configuration (it is being created or is inaccessible)")
        return config.instanceUuid

    def describe_vm(self, vm_id: str) -> VMInfo:
        vm = self._vm_by_id(vm_id)
        if vm is None:
            raise NotFound(f"VM {vm_id} not found on vSphere {self.endpoint}")
        return self._vm_info(vm)

    def vm_owner(self, vm_id: str) -> str | None:
        vm = self._vm_by_id(vm_id)
        if vm is None or getattr(vm, "config", None) is None:
            return None
        return next((o.value for o in (vm.config.extraConfig or []) if o.key == OWNER_KEY), None)

    # -- storage --------------------------------------------------------------------------------------------
    def _datastore(self, name: str) -> Any:
        return self.api.named(_vim().Datastore, name, "datastore")

    def storage_exists(self, hint: str) -> bool:
        return bool(self.api.find_named(_vim().Datastore, hint))

    def default_storage(self) -> str:
        """The Provider's ``spec.defaults.datastore``, else the datastore with the most free space."""
        if self.defaults.get("datastore"):
            return str(self.defaults["datastore"])
        stores = sorted(self.api.objects(_vim().Datastore), key=lambda d: -int(d.summary.freeSpace or 0))
        if not stores:
            raise NotFound(f"vSphere {self.endpoint} has no datastore")
        return stores[0].name

    def network_exists(self, name: str) -> bool:
        return bool(self.api.find_named(_vim().Network, name))

    # -- snapshots ------------------------------------------------------------------------------------------
    @staticmethod
    def _snapshots(vm: Any) -> list[Any]:
        out: list[Any] = []
        try:
            info = vm.snapshot
        except AttributeError:  # unset: no snapshot (the simulator leaves the property out)
            info = None
        todo = list(getattr(info, "rootSnapshotList", None) or [])
        while todo:
            node = todo.pop()
            out.append(node)
            todo.extend(node.childSnapshotList or [])
        return out

    def _snapshot(self, vm: Any, name: str) -> Any | None:
        found = [s for s in self._snapshots(vm) if s.name == name]
        if len(found) > 1:
            raise Conflict(f"VM {vm.name} has {len(found)} snapshots named {name!r}")
        return found[0].snapshot if found else None

    def create_snapshot(self, vm: str, snapshot: str, disks: Sequence[DiskInfo], *,
                        exists_ok: bool = False) -> list[str]:
        obj = self._vm(vm)
        if self._snapshot(obj, snapshot) is not None:
            if exists_ok:
                return [d.name for d in disks]
            raise Conflict(f"VM {vm} already has a snapshot named {snapshot!r}", field="spec.sourceName")
        task = obj.CreateSnapshot_Task(name=snapshot, description="taken by the VM migration engine before export",
                                       memory=False, quiesce=False)
        self.api.wait(task, f"snapshot {snapshot} of VM {vm}")
        return [d.name for d in disks]

    def delete_snapshot(self, vm: str, snapshot: str) -> bool:
        try:
            snap = self._snapshot(self._vm(vm), snapshot)
        except NotFound:
            return False
        if snap is None:
            return False
        self.api.wait(snap.RemoveSnapshot_Task(removeChildren=False), f"removing snapshot {snapshot} of VM {vm}")
        return True

    def has_snapshot(self, vm: str, snapshot: str) -> bool:
        try:
            return self._snapshot(self._vm(vm), snapshot) is not None
        except NotFound:
            return False

    # -- reading a disk: NFC export of the snapshot -----------------------------------------------------------
    def read_disk(self, disk: DiskInfo, *, vm: str | None = None, snapshot: str | None = None) -> Iterator[Segment]:
        """The disk as it is at ``snapshot`` of ``vm``: a streamOptimized VMDK from an NFC export lease."""
        if not vm or not snapshot:
            raise HypervisorError(f"disk {disk.name}: vSphere disks are read from a snapshot's NFC export; none "
                                  f"was named (the plan has no snapshot of this disk)")
        obj = self._vm(vm)
        snap = self._snapshot(obj, snapshot)
        if snap is None:
            raise NotFound(f"snapshot {snapshot!r} of VM {vm} is gone; run the migration again")
        return self._export(obj, snap, disk)

    def _export(self, vm: Any, snap: Any, disk: DiskInfo) -> Iterator[Segment]:
        """The lease is opened when the first segment is asked for, and ended when the stream ends or is closed."""
        from pyVmomi import vmodl

        what = f"exporting disk {disk.name} of VM {vm.name}"
        try:
            lease = Lease(self.api, snap.ExportSnapshot(), what)
        except vmodl.MethodFault as err:
            raise HypervisorError(f"{what}: ExportSnapshot: {fault_message(err)}") from None
        try:
            info = lease.ready()
            url = self._device_url(vm, info, disk)
            total = max(disk.allocation, 1)
            yield from self.api.get_stream(url, what, tick=lambda done: lease.progress(100.0 * done / total))
            lease.complete()
        except vmodl.MethodFault as err:
            raise HypervisorError(f"{what}: {fault_message(err)}") from None
        finally:
            lease.abort()  # a no-op after complete

    def _device_url(self, vm: Any, info: Any, disk: DiskInfo) -> str:
        """The lease's URL of ``disk``: matched by its device (controller and unit), else by its place."""
        vim = _vim()
        devices = vm.config.hardware.device
        by_key = {d.key: d for d in devices}
        ours = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
        urls = [u for u in info.deviceUrl if getattr(u, "disk", True)]
        index = None
        for i, dev in enumerate(ours):
            path = getattr(dev.backing, "fileName", "")
            base, parent = path, getattr(dev.backing, "parent", None)
            while parent is not None and getattr(parent, "fileName", None):
                base, parent = parent.fileName, getattr(parent, "parent", None)
            if base == disk.path:
                index = i
                dev_key = dev
                break
        if index is None:
            raise PlanChanged(f"disk {disk.name} ({disk.path}) is no longer a disk of VM {vm.name}",
                              field="spec.sourceName")
        controller = by_key.get(dev_key.controllerKey)
        if controller is not None:
            suffix = f"{getattr(controller, 'busNumber', 0)}:{dev_key.unitNumber}"
            cls_names = {c.__name__.rsplit(".", 1)[-1] for c in type(controller).__mro__}
            for u in urls:
                m = re.search(r"/([A-Za-z]+?)(\d+:\d+)$", u.key or "")
                if m and m.group(2) == suffix and m.group(1) in cls_names:
                    return self.api.nfc_url(u.url)
        if len(urls) == len(ours):
            return self.api.nfc_url(urls[index].url)
        raise HypervisorError(f"the NFC lease of VM {vm.name} has no URL for disk {disk.name} "
                              f"({[u.key for u in urls]})")

    # -- a running source: a snapshot of the running VM, exported while it runs ------------------------------
    live_export = True
    live_format = "vmdk"

    def point_in_time_handle(self, workdir: str) -> dict[str, Any]:
        """The snapshot's name, from the run's fresh folder (known before it is taken, unique per run)."""
        return {"snapshot": f"vmmigration-live-{os.path.basename(os.path.normpath(workdir))}"}

    def begin_point_in_time(self, vm: str, disks: Sequence[DiskInfo], workdir: str) -> PointInTime:
        """A snapshot of the running VM without its memory; quiesced by VMware Tools when they run in the guest
        (application-consistent), crash-consistent otherwise."""
        from pyVmomi import vmodl

        handle = self.point_in_time_handle(workdir)
        obj = self._vm(vm)
        tools = getattr(getattr(obj, "guest", None), "toolsRunningStatus", None) == "guestToolsRunning"
        taken = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        detail = "VMware Tools quiesced the guest's filesystems"
        try:
            self.api.wait(obj.CreateSnapshot_Task(name=handle["snapshot"], description="point in time of the VM "
                                                  "migration engine", memory=False, quiesce=tools),
                          f"snapshot {handle['snapshot']} of the running VM {vm}")
        except (TaskFault, vmodl.MethodFault) as err:
            if not tools:
                raise
            detail = f"quiescing failed ({fault_message(err)}); taken without it"
            tools = False
            self.api.wait(obj.CreateSnapshot_Task(name=handle["snapshot"], description="point in time of the VM "
                                                  "migration engine", memory=False, quiesce=False),
                          f"snapshot {handle['snapshot']} of the running VM {vm}")
        if not tools and detail.startswith("VMware"):
            detail = "VMware Tools do not run in the guest: nothing was quiesced"
        return PointInTime(handle={**handle, "vm": obj.config.instanceUuid}, disks=tuple(d.name for d in disks),
                           consistency="application-consistent" if tools else "crash-consistent",
                           detail=detail, taken_at=taken)

    def _held(self, handle: Mapping[str, Any], vm_name: str | None = None) -> tuple[Any, Any] | None:
        """(VM, snapshot) of a point in time; a handle recorded before the snapshot was taken has no VM id yet,
        and then the VM is the one named (which the caller checked is still the VM validated)."""
        try:
            vm = self._vm_by_id(str(handle["vm"])) if handle.get("vm") else (self._vm(vm_name) if vm_name else None)
        except NotFound:
            return None
        if vm is None:
            return None
        snap = self._snapshot(vm, str(handle.get("snapshot")))
        return (vm, snap) if snap is not None else None

    def point_in_time_active(self, vm: str, handle: Mapping[str, Any]) -> bool:
        return self._held(handle, vm) is not None

    def read_point_in_time(self, handle: Mapping[str, Any], disk: DiskInfo) -> tuple[Iterator[Segment], int, int]:
        held = self._held(handle)
        if held is None:
            raise NotFound(f"the point in time {handle.get('snapshot')} is gone; run the migration again",
                           field="spec.sourceName")
        # the export's length is known only at its end; the base disk's size on the datastore is the hint
        size = max(disk.allocation, 1)
        return self._export(held[0], held[1], disk), size, disk.allocation

    def end_point_in_time(self, vm: str, handle: Mapping[str, Any]) -> bool:
        held = self._held(handle, vm)
        if held is None:
            return False
        self.api.wait(held[1].RemoveSnapshot_Task(removeChildren=False),
                      f"removing the point-in-time snapshot {handle.get('snapshot')} of VM {vm}")
        return True

    # -- datastore files ------------------------------------------------------------------------------------
    def _dc_name(self, datastore: str) -> tuple[Any, Any]:
        ds = self._datastore(datastore)
        return self.api.datacenter_of(ds), ds

    def _file_info(self, datastore: str, path: str) -> Any | None:
        """The datastore browser's entry of a file (size, modification), None when it is not there."""
        vim = _vim()
        _dc, ds = self._dc_name(datastore)
        folder, _, name = path.rpartition("/")
        spec = vim.host.DatastoreBrowser.SearchSpec(
            matchPattern=[name], details=vim.host.DatastoreBrowser.FileInfo.Details(
                fileSize=True, modification=True, fileType=True))
        try:
            result = self.api.wait(ds.browser.SearchDatastore_Task(f"[{datastore}] {folder}", spec),
                                   f"looking up [{datastore}] {path}")
        except TaskFault as err:
            if isinstance(err.fault, (_vim().fault.FileNotFound,)) or "not found" in str(err).lower():
                return None
            raise
        for f in (getattr(result, "file", None) or []):
            if f.path == name:
                return f
        return None

    def file_exists(self, datastore: str, path: str) -> bool:
        """Whether ``[datastore] path`` (a file or a folder) is there."""
        return self._file_info(datastore, path) is not None

    def server_time(self) -> float:
        """vCenter's clock (what the datastore's modification times are on), as a POSIX time."""
        return self.api.si.CurrentTime().timestamp()

    def volume_key(self, storage: str, volume: str) -> str | None:
        """The disk's UUID where the datastore gives one, its size and its modification time; None when the
        file is absent."""
        info = self._file_info(storage, volume)
        if info is None:
            return None
        dc, _ds = self._dc_name(storage)
        try:
            uuid = self.api.content.virtualDiskManager.QueryVirtualDiskUuid(f"[{storage}] {volume}", dc)
        except Exception:  # noqa: BLE001 - not a disk the manager can read (an upload in hosted format)
            uuid = None
        stamp = info.modification.isoformat() if getattr(info, "modification", None) else ""
        # the UUID alone is not enough: a datastore may derive it from the path (the simulator does)
        known = uuid and uuid.replace("0", "").replace("-", "").replace(" ", "")
        return f"{'uuid:' + uuid + ';' if known else ''}size:{int(info.fileSize or 0)};mtime:{stamp}"

    def volume_created_at(self, storage: str, volume: str) -> float | None:
        info = self._file_info(storage, volume)
        mod = getattr(info, "modification", None) if info is not None else None
        return mod.timestamp() if mod is not None else None

    def make_folder(self, datastore: str, folder: str) -> bool:
        """Create ``[datastore] folder``; False when it existed already."""
        vim = _vim()
        dc, _ds = self._dc_name(datastore)
        try:
            self.api.content.fileManager.MakeDirectory(name=f"[{datastore}] {folder}", datacenter=dc,
                                                       createParentDirectories=True)
            return True
        except vim.fault.FileAlreadyExists:
            return False

    def folder_empty(self, datastore: str, folder: str) -> bool:
        vim = _vim()
        _dc, ds = self._dc_name(datastore)
        spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*"])
        try:
            result = self.api.wait(ds.browser.SearchDatastore_Task(f"[{datastore}] {folder}", spec),
                                   f"listing [{datastore}] {folder}")
        except TaskFault:
            return False
        return not (getattr(result, "file", None) or [])

    def delete_file(self, datastore: str, path: str) -> None:
        dc, _ds = self._dc_name(datastore)
        self.api.wait(self.api.content.fileManager.DeleteDatastoreFile_Task(name=f"[{datastore}] {path}",
                                                                            datacenter=dc),
                      f"deleting [{datastore}] {path}")

    def create_volume(self, storage: str, volume: str, fmt: str, capacity: int) -> str:
        """An empty thin disk (used when a disk is made before its bytes arrive)."""
        vim = _vim()
        if fmt != "vmdk":
            raise UnsupportedDiskFormat(f"vSphere keeps disks as vmdk, not {fmt}", field="spec.targetDiskFormat")
        dc, _ds = self._dc_name(storage)
        spec = vim.VirtualDiskManager.FileBackedVirtualDiskSpec(diskType="thin", adapterType="lsiLogic",
                                                               capacityKb=max(1, (capacity + 1023) // 1024))
        try:
            self.api.wait(self.api.content.virtualDiskManager.CreateVirtualDisk_Task(
                name=f"[{storage}] {volume}", datacenter=dc, spec=spec), f"creating disk [{storage}] {volume}")
        except TaskFault as err:
            raise TargetCreationError(str(err)) from None
        return f"[{storage}] {volume}"

    def write_volume(self, storage: str, volume: str, segments: Iterator[Segment], length: int) -> None:
        """PUT the file's bytes to ``[storage] volume`` through the datastore's HTTP access."""
        dc, _ds = self._dc_name(storage)
        self.api.put_stream(self.api.datastore_url(dc.name, storage, volume), segments, length,
                            f"uploading [{storage}] {volume}")

    def resize_volume(self, storage: str, volume: str, capacity: int) -> None:
        dc, _ds = self._dc_name(storage)
        self.api.wait(self.api.content.virtualDiskManager.ExtendVirtualDisk_Task(
            name=f"[{storage}] {volume}", datacenter=dc, newCapacityKb=capacity // 1024, eagerZero=False),
            f"growing [{storage}] {volume}")

    def delete_volume(self, storage: str, volume: str, *, key: str, owner: str | None = None) -> bool:
        """Delete the file only if it is still the one recorded (same key)."""
        if self.volume_key(storage, volume) != key:
            return False
        self.delete_file(storage, volume)
        return True

    # -- NFC import: a one-disk carrier VM made by ImportVApp, its disk then moved where it belongs ----------
    def import_carrier(self, name: str, datastore: str, capacity: int, segments: Iterator[Segment], length: int,
                       *, owner: str, created: Callable[[str], None]) -> str:
        """Import a streamOptimized disk through an NFC lease as the only disk of a new VM ``name`` (tagged with
        ``owner``); ``created(vm id)`` is called as soon as that VM exists. Returns the VM's id."""
        from pyVmomi import vmodl

        vim = _vim()
        _dc, folder, pool, host = self.placement(datastore)
        ds = self._datastore(datastore)
        cisp = vim.OvfManager.CreateImportSpecParams(entityName=name, diskProvisioning="thin")
        result = self.api.content.ovfManager.CreateImportSpec(ovfDescriptor=carrier_ovf(name, capacity, length),
                                                              resourcePool=pool, datastore=ds, cisp=cisp)
        if getattr(result, "error", None):
            raise TargetCreationError(f"importing a disk as {name}: vCenter refused the import: "
                                      f"{'; '.join(fault_message(e) for e in result.error)}")
        spec = result.importSpec
        config = getattr(spec, "configSpec", None)
        if config is not None:
            config.extraConfig = [*(config.extraConfig or []), vim.option.OptionValue(key=OWNER_KEY, value=owner)]
        what = f"importing a disk as {name}"
        try:
            lease = Lease(self.api, pool.ImportVApp(spec=spec, folder=folder, host=host), what)
        except vmodl.MethodFault as err:
            raise TargetCreationError(f"{what}: {fault_message(err)}") from None
        try:
            info = lease.ready()
            vm_id = info.entity.config.instanceUuid
            created(vm_id)
            urls = [u for u in info.deviceUrl if getattr(u, "disk", True)]
            if len(urls) != 1:
                raise TargetCreationError(f"{what}: the lease has {len(urls)} disk URLs, expected 1")
            self.api.put_stream(self.api.nfc_url(urls[0].url), segments, length, what, method="POST",
                                content_type=STREAM_VMDK, tick=lambda done: lease.progress(100.0 * done / length))
            lease.complete()
            log.info("%s: %d bytes streamed into the NFC lease, lease completed", what, length)
            return vm_id
        except BaseException:
            log.warning("%s: the NFC lease is aborted", what)
            raise
        finally:
            lease.abort()  # a no-op after complete

    def detach_disks(self, vm_id: str) -> list[str]:
        """Take every disk off the VM, files kept; returns their datastore paths."""
        vim = _vim()
        vm = self._vm_by_id(vm_id)
        if vm is None:
            return []
        disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
        if disks:
            spec = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="remove", device=d)
                                                   for d in disks])
            self.api.wait(vm.ReconfigVM_Task(spec=spec), f"detaching the disks of VM {vm.name}")
        return [d.backing.fileName for d in disks]

    def move_disk(self, datastore: str, source: str, dest: str) -> None:
        """Move a native virtual disk (every extent) within the datastore."""
        dc, _ds = self._dc_name(datastore)
        try:
            self.api.wait(self.api.content.virtualDiskManager.MoveVirtualDisk_Task(
                sourceName=f"[{datastore}] {source}", sourceDatacenter=dc, destName=f"[{datastore}] {dest}",
                destDatacenter=dc, force=False), f"moving disk [{datastore}] {source} to {dest}")
        except TaskFault as err:
            raise TargetCreationError(str(err)) from None

    def delete_disk(self, datastore: str, volume: str, *, key: str) -> bool:
        """Delete a native virtual disk (every extent), only if it is still the one recorded."""
        if self.volume_key(datastore, volume) != key:
            return False
        dc, _ds = self._dc_name(datastore)
        self.api.wait(self.api.content.virtualDiskManager.DeleteVirtualDisk_Task(
            name=f"[{datastore}] {volume}", datacenter=dc), f"deleting disk [{datastore}] {volume}")
        return True

    # -- the VM ----------------------------------------------------------------------------------------------
    def begin_target(self, plan: TargetPlan, owned: Ownership) -> TargetSession:
        from include.providers.vsphere_session import VSphereTargetSession

        return VSphereTargetSession(self, plan, owned)

    def placement(self, datastore: str) -> tuple[Any, Any, Any, Any]:
        """(datacenter, VM folder, resource pool, host) for a VM on ``datastore``: the Provider's ``spec.defaults``
        (``resourcePool``, or ``cluster``; ``folder``) where set, else the root pool of the first usable host's
        compute resource and the datacenter's VM folder. The host is one that mounts the datastore, is connected
        and not in maintenance mode (given to CreateVM and ImportVApp: a cluster without DRS needs one)."""
        vim = _vim()
        dc, ds = self._dc_name(datastore)
        usable = []
        for mount in ds.host or []:
            host = mount.key
            runtime = getattr(host, "runtime", None)
            if getattr(runtime, "connectionState", "connected") == "connected" and \
                    not getattr(runtime, "inMaintenanceMode", False) and \
                    getattr(getattr(mount, "mountInfo", None), "accessible", True) is not False:
                usable.append(host)
        if self.defaults.get("resourcePool"):
            pool = self.api.named(vim.ResourcePool, str(self.defaults["resourcePool"]), "resource pool",
                                  field="spec.defaults.resourcePool")
        elif self.defaults.get("cluster"):
            pool = self.api.named(vim.ClusterComputeResource, str(self.defaults["cluster"]), "cluster",
                                  field="spec.defaults.cluster").resourcePool
        else:
            if not usable:
                raise NotFound(f"datastore {datastore} is not mounted on any connected host",
                               field="spec.targetStorageHint")
            pool = getattr(usable[0].parent, "resourcePool", None)
            if pool is None:
                raise HypervisorError(f"no resource pool for hosts of datastore {datastore}")
        owner = getattr(pool, "owner", None)
        hosts = [h for h in usable if owner is None or h.parent == owner]
        if not hosts:
            raise NotFound(f"no connected host of {getattr(owner, 'name', 'the resource pool')} mounts datastore "
                           f"{datastore}", field="spec.targetStorageHint")
        folder = (self.api.named(vim.Folder, str(self.defaults["folder"]), "VM folder", field="spec.defaults.folder")
                  if self.defaults.get("folder") else dc.vmFolder)
        return dc, folder, pool, hosts[0]

    def define_vm(self, name: str, vcpus: int, memory_mib: int, disks: Sequence[TargetDisk],
                  networks: Sequence[NetworkHint], *, nic_models: Sequence[str] = (),
                  owner: str | None = None) -> str:
        vim = _vim()
        if not disks:
            raise TargetCreationError("a VM needs at least one disk")
        datastore = disks[0].pool
        dc, folder, pool, host = self.placement(datastore)
        changes: list[Any] = []
        extra = [vim.option.OptionValue(key=OWNER_KEY, value=owner)] if owner else []
        controllers: dict[str, tuple[int, int, int]] = {}  # bus -> (device key, bus number, next unit)
        families: dict[str, int] = {}  # controllers made per family (SCSI kinds share bus numbers 0-3)
        next_key = -100
        for d in disks:
            bus = d.bus if d.bus in _BUSES else "pvscsi"
            if bus not in controllers:
                if bus == "ide":
                    controllers[bus] = (200, 0, 0)  # every VM has IDE controllers 200 and 201
                else:
                    family = "scsi" if bus in _SCSI else bus
                    number = families.get(family, 0)
                    families[family] = number + 1
                    changes.append(vim.vm.device.VirtualDeviceSpec(
                        operation="add", device=self._controller(bus, next_key, number)))
                    controllers[bus] = (next_key, number, 0)
                    next_key -= 1
            ckey, number, unit = controllers[bus]
            if bus in _SCSI and unit == 7:
                unit += 1  # the SCSI controller's own unit
            limit = {"ide": 2, "sata": 30, "nvme": 15}.get(bus, 16)
            if unit >= limit:
                raise TargetCreationError(f"more disks than a {bus} controller takes ({limit})")
            disk = vim.vm.device.VirtualDisk(
                key=next_key, controllerKey=ckey, unitNumber=unit, capacityInKB=d.capacity // 1024,
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName=f"[{d.pool}] {d.volume}", diskMode="persistent", thinProvisioned=True))
            next_key -= 1
            controllers[bus] = (ckey, number, unit + 1)
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=disk))
            extra.append(vim.option.OptionValue(key=f"{DISK_NAME_KEY}{bus}{number}-{unit}", value=d.name))
        for index, hint in enumerate(networks):
            net_name = hint.network or hint.bridge
            if not net_name:
                continue
            model = self.nic_model(nic_models[index] if index < len(nic_models) else None)
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add",
                                                           device=self._nic(model, net_name, next_key)))
            next_key -= 1
        config = vim.vm.ConfigSpec(
            name=name, numCPUs=int(vcpus), memoryMB=int(memory_mib), guestId=DEFAULT_GUEST_ID,
            files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"), deviceChange=changes, extraConfig=extra,
            annotation="Migrated by the VM migration engine" + (f" ({owner})" if owner else ""))
        try:
            ref = self.api.wait(folder.CreateVM_Task(config=config, pool=pool, host=host), f"creating VM {name}")
        except TaskFault as err:
            raise TargetCreationError(str(err)) from None
        return ref.config.instanceUuid

    def _controller(self, bus: str, key: int, bus_number: int) -> Any:
        vim = _vim()
        cls = {"pvscsi": vim.vm.device.ParaVirtualSCSIController, "lsilogic": vim.vm.device.VirtualLsiLogicController,
               "lsilogicsas": vim.vm.device.VirtualLsiLogicSASController,
               "buslogic": vim.vm.device.VirtualBusLogicController, "sata": vim.vm.device.VirtualAHCIController,
               "nvme": vim.vm.device.VirtualNVMEController}[bus]
        ctrl = cls(key=key, busNumber=bus_number)
        if hasattr(ctrl, "sharedBus"):
            ctrl.sharedBus = vim.vm.device.VirtualSCSIController.Sharing.noSharing
        return ctrl

    def _nic(self, model: str, network: str, key: int) -> Any:
        vim = _vim()
        cls = {"vmxnet3": vim.vm.device.VirtualVmxnet3, "e1000": vim.vm.device.VirtualE1000,
               "e1000e": vim.vm.device.VirtualE1000e}.get(model, vim.vm.device.VirtualVmxnet3)
        net = self.api.named(vim.Network, network, "port group")
        if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
            backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                port=vim.dvs.PortConnection(portgroupKey=net.key,
                                            switchUuid=net.config.distributedVirtualSwitch.uuid))
        else:
            backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=network, network=net)
        return cls(key=key, backing=backing, addressType="generated",
                   connectable=vim.vm.device.VirtualDevice.ConnectInfo(startConnected=True, allowGuestControl=True,
                                                                      connected=False))

    def delete_vm(self, vm_id: str) -> bool:
        """Remove the VM: unregistered, then its own files (configuration, NVRAM, logs: what vCenter lists in
        its file layout, other than disks) deleted one by one. Its disks stay on the datastore for the ledger to
        decide about, and nothing else in its folder is touched (``Destroy_Task`` would remove disks, and a
        simulator removes the whole folder)."""
        vm = self._vm_by_id(vm_id)
        if vm is None:
            return False
        self._power_off(vm)
        layout = getattr(vm, "layoutEx", None)
        own = [f.name for f in (getattr(layout, "file", None) or [])
               if f.type not in ("diskDescriptor", "diskExtent", "digestDescriptor", "digestExtent")]
        name = vm.name
        vm.UnregisterVM()
        for path in own:
            datastore, inside = split_ds_path(path)
            if self._file_info(datastore, inside) is not None:
                self.delete_file(datastore, inside)
        log.info("VM %s (%s) removed: unregistered, its files %s deleted", name, vm_id, ", ".join(own) or "(none)")
        return True

    def _power_off(self, vm: Any) -> None:
        vim = _vim()
        if vm.runtime.powerState != vim.VirtualMachinePowerState.poweredOff:
            self.api.wait(vm.PowerOffVM_Task(), f"powering off VM {vm.name}")

    def vm_disk_paths(self, vm_id: str) -> list[str]:
        """The base disk (the first of its chain, under any snapshot's delta) of every disk of the VM."""
        vm = self._vm_by_id(vm_id)
        if vm is None or getattr(vm, "config", None) is None:
            return []
        vim = _vim()
        out = []
        for dev in vm.config.hardware.device:
            if isinstance(dev, vim.vm.device.VirtualDisk):
                base, parent = dev.backing.fileName, getattr(dev.backing, "parent", None)
                while parent is not None and getattr(parent, "fileName", None):
                    base, parent = parent.fileName, getattr(parent, "parent", None)
                out.append(base)
        return out

    def delete_source_vm(self, vm_id: str, volumes: Sequence[tuple[str, str]]) -> list[str]:
        """Destroy removes a VM with its disks: only when every disk it has now is one of the plan's."""
        vm = self._vm_by_id(vm_id)
        if vm is None:
            return []
        planned = {f"[{pool}] {volume}" for pool, volume in volumes}
        extra = [p for p in self.vm_disk_paths(vm_id) if p not in planned]
        if extra:
            raise PlanChanged(f"deleteSource: VM {vm.name} now has disks the validated plan does not name "
                              f"({', '.join(extra)}); it is kept", field="spec.cleanupPolicy.deleteSource")
        name = vm.name
        self._power_off(vm)
        self.api.wait(vm.Destroy_Task(), f"deleting source VM {name}")  # with its disks: the plan's, checked above
        return [f"VM {name} ({vm_id}) with its disks {', '.join(sorted(planned))}"]

    def boot_check_refusal(self) -> str | None:
        return ("a vSphere target is not booted from here: the VM would start on an ESXi host this worker "
                "cannot watch the console of")


_IDEMPOTENT = frozenset({"check", "identity", "get_vm", "vm_id", "describe_vm", "vm_owner", "storage_exists",
                         "default_storage", "network_exists", "has_snapshot", "volume_key", "volume_created_at",
                         "folder_empty", "vm_disk_paths", "placement", "point_in_time_active", "file_exists",
                         "server_time"})
for _name in ("check", "identity", "get_vm", "vm_id", "describe_vm", "vm_owner", "storage_exists", "default_storage",
              "network_exists", "create_snapshot", "delete_snapshot", "has_snapshot", "read_disk", "volume_key",
              "volume_created_at", "make_folder", "folder_empty", "delete_file", "create_volume", "write_volume",
              "resize_volume", "delete_volume", "define_vm", "delete_vm", "delete_source_vm", "vm_disk_paths",
              "placement", "import_carrier", "detach_disks", "move_disk", "delete_disk", "begin_point_in_time",
              "file_exists", "server_time",
              "point_in_time_active", "read_point_in_time", "end_point_in_time"):
    setattr(VSphereDriver, _name, _vsphere_faults(getattr(VSphereDriver, _name)))


def carrier_ovf(name: str, capacity: int, size: int) -> str:
    """An OVF 1.0 descriptor of a VM with one streamOptimized disk of ``capacity`` bytes (``size`` bytes to
    upload) on an LSI Logic controller, and no NIC: what ImportVApp needs to bring one disk in."""
    from xml.sax.saxutils import quoteattr

    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
 xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
 xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References><File ovf:href="disk.vmdk" ovf:id="file1" ovf:size="{int(size)}"/></References>
  <DiskSection><Info>Virtual disks</Info><Disk ovf:capacity="{int(capacity)}" ovf:capacityAllocationUnits="byte"
   ovf:diskId="vmdisk1" ovf:fileRef="file1"
   ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/></DiskSection>
  <VirtualSystem ovf:id={quoteattr(name)}>
    <Info>A disk being imported by the VM migration engine</Info>
    <OperatingSystemSection ovf:id="102" vmw:osType="{DEFAULT_GUEST_ID}"><Info>os</Info></OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>hardware</Info>
      <System><vssd:ElementName>Virtual Hardware Family</vssd:ElementName><vssd:InstanceID>0</vssd:InstanceID>
       <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType></System>
      <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:ElementName>1 CPU</rasd:ElementName>
       <rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
       <rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ElementName>32 MB</rasd:ElementName>
       <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
       <rasd:VirtualQuantity>32</rasd:VirtualQuantity></Item>
      <Item><rasd:ElementName>SCSI</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID>
       <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:ElementName>disk0</rasd:ElementName>
       <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID>
       <rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""
