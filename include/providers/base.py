"""What every hypervisor driver offers the pipeline (libvirt now; vSphere and Proxmox VE next)."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from include.diskio import Segment
from include.spec import NetworkHint

if TYPE_CHECKING:
    from include.inventory import ProviderInfo
    from include.model import TargetPlan
    from include.providers.session import Ownership, TargetSession


@dataclass(frozen=True)
class DiskInfo:
    """One disk of a VM (CD-ROMs and other non-disk devices are never listed)."""

    name: str  # the guest-visible target ("vda"); the label of its map index
    format: str  # qcow2 | raw | vmdk
    capacity: int  # virtual size in bytes
    allocation: int  # bytes allocated on the host (what actually has to move)
    path: str  # where the provider keeps it
    pool: str | None = None
    volume: str | None = None
    bus: str = "virtio"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class NicInfo:
    """One network interface of a VM: what it is attached to and how it appears to the guest."""

    network: str | None = None  # a named network (libvirt network, vSphere port group, Proxmox bridge)
    bridge: str | None = None  # a host bridge, where the hypervisor attaches to one directly
    model: str | None = None  # the device model the guest sees (virtio, e1000, vmxnet3...)
    mac: str | None = None


@dataclass(frozen=True)
class VMInfo:
    name: str
    running: bool
    vcpus: int
    memory_mib: int
    disks: tuple[DiskInfo, ...]
    interfaces: tuple[NicInfo, ...] = field(default_factory=tuple)
    #: the hypervisor's unique id of the VM (libvirt: the domain UUID); names are not unique everywhere
    id: str | None = None
    #: devices of the VM that are not migrated, each with what it is and why (a CD-ROM, EFI vars...)
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class PointInTime:
    """A running VM's disks held at one instant while the VM keeps running and writing (libvirt: a
    pull-mode backup job; vSphere and Proxmox VE: a snapshot exported while the VM runs)."""

    #: what the driver needs to find it again in a later task (JSON; kept in the ownership ledger)
    handle: dict[str, Any]
    disks: tuple[str, ...]
    #: "crash-consistent", or "application-consistent" when the guest froze its filesystems around it
    consistency: str
    #: how it was taken and what the guest agent said
    detail: str
    taken_at: str


@dataclass(frozen=True)
class BootResult:
    """What booting a migrated VM once showed (``HypervisorDriver.boot_check``)."""

    passed: bool
    seen: str  # what was seen: the marker line, the agent's answer, or nothing
    seconds: float
    output: str = ""  # the last lines of the serial console


@dataclass(frozen=True)
class TargetDisk:
    name: str  # guest-visible target, kept from the source
    pool: str
    volume: str
    format: str
    capacity: int
    bus: str = "virtio"


class HypervisorDriver(abc.ABC):
    """A hypervisor as the pipeline needs it. Methods raise ``include.errors`` exceptions."""

    @classmethod
    def for_provider(cls, endpoint: str, credentials: Mapping[str, str] | None) -> HypervisorDriver:
        """A driver for a resolved Provider (the command line's path), connecting on first use."""
        raise NotImplementedError

    @classmethod
    def from_hook(cls, hook: Any) -> HypervisorDriver:
        """A driver on an Airflow hook's session (the pipeline's path): ``hook.get_conn()`` is the SDK's
        client or connection, and the hook is where secrets are read and masked."""
        raise NotImplementedError

    def configure(self, provider: ProviderInfo) -> None:  # noqa: B027 - optional
        """Take the Provider's other settings (``spec.insecureSkipVerify``, ``spec.defaults`` such as a default
        datastore, cluster or folder) before the first connection; the factories call it after building."""

    # -- what the planner asks of a hypervisor type (no connection needed) --------------------------
    #: the VMDK subformat qemu-img writes for this hypervisor when the target format is vmdk
    vmdk_subformat = "monolithicSparse"

    @classmethod
    def format_matches(cls, planned: str, found: str) -> bool:
        """Whether a migrated disk found in ``found`` format is what a plan for ``planned`` asked (a hypervisor
        whose block storages hold raw volumes only converts on import)."""
        return planned == found

    @classmethod
    def plan_options(cls, provider: ProviderInfo) -> dict[str, str]:
        """The target's choices for a run, read from its Provider at Validating and pinned in the plan
        (``TargetPlan.options``); raise InvalidMigration naming the field for a bad one."""
        return {}

    @classmethod
    def vmdk_subformat_for(cls, options: Mapping[str, str]) -> str:
        """The VMDK subformat a disk bound here is converted to, for a plan with these options."""
        return cls.vmdk_subformat

    @classmethod
    def target_volume_name(cls, vm: str, disk: str, fmt: str) -> str:
        """The name of the volume a migrated disk lands in (a hypervisor with its own naming overrides it)."""
        return f"{vm}-{disk}.{fmt}"

    @classmethod
    def snapshot_disks(cls, disks: Sequence[DiskInfo]) -> list[str]:
        """The disks a snapshot of a VM with these disks covers (none when this hypervisor cannot take one)."""
        return [d.name for d in disks]

    @classmethod
    def disk_bus(cls, source_bus: str) -> str:
        """The bus a disk that was on ``source_bus`` elsewhere gets here (vSphere has no virtio)."""
        return source_bus

    #: the NIC model a VM gets here when nothing says otherwise
    DEFAULT_NIC_MODEL = "virtio"

    @classmethod
    def nic_model(cls, source_model: str | None) -> str:
        """The device model a NIC that was ``source_model`` elsewhere gets here (vSphere's vmxnet3 is not
        QEMU's; a hypervisor maps what it has an equivalent for and falls back to its default)."""
        return source_model or cls.DEFAULT_NIC_MODEL

    # -- a running source: a point in time exported while the VM runs ------------------------------------
    #: whether a disk is read from the snapshot itself (vSphere's NFC export), not from the shut-off VM's volume
    #: (libvirt): then a snapshot an earlier run left is never reused, as it holds the disks as they were then
    exports_from_snapshot = False
    #: the disk formats this hypervisor takes as ``targetDiskFormat`` (None: every format the engine converts to)
    target_formats: tuple[str, ...] | None = None

    #: whether this hypervisor can hold a running VM's disks at one instant and export them while it runs
    live_export = False
    #: the format :meth:`read_point_in_time` yields: "raw" guest data with holes as holes (libvirt's NBD
    #: export), or the hypervisor's own export format (vSphere's NFC: a streamOptimized "vmdk")
    live_format = "raw"

    def live_export_refusal(self, vm: VMInfo | None = None) -> str | None:
        """Why a running VM (``vm``, as :meth:`get_vm` gave it) cannot be exported live through this connection
        (None: it can)."""
        return None if self.live_export else f"the {type(self).__name__} source cannot export a running VM"

    def point_in_time_handle(self, workdir: str) -> dict[str, Any]:
        """The handle :meth:`begin_point_in_time` will return for ``workdir``, known before it is taken (the
        ledger records it first, so that a task killed midway still has it ended)."""
        raise NotImplementedError

    def begin_point_in_time(self, vm: str, disks: Sequence[DiskInfo], workdir: str) -> PointInTime:
        """Hold every disk of the running ``vm`` at this instant (quiesced through the guest agent where it
        answers, thawed in every case); ``workdir`` is a fresh folder of this run for sockets and scratch."""
        raise NotImplementedError

    def point_in_time_active(self, vm: str, handle: Mapping[str, Any]) -> bool:
        """Whether the point in time ``handle`` names is still held (and still this run's)."""
        return False

    def read_point_in_time(self, handle: Mapping[str, Any], disk: DiskInfo) -> tuple[Iterator[Segment], int, int]:
        """(the disk as it was at the point in time, in :attr:`live_format`, its length, its data bytes); holes as
        holes. The stream opens nothing until its first segment is asked for."""
        raise NotImplementedError

    def end_point_in_time(self, vm: str, handle: Mapping[str, Any]) -> bool:
        """Release the point in time when it is still this run's; returns whether it ended one."""
        return False

    def recover_point_in_time(self, vm: str, handle: Mapping[str, Any]) -> str | None:
        """After a task died while taking the point in time (between quiescing the guest and resuming it):
        undo what it left on the VM, such as frozen filesystems; says what it did (None: nothing)."""
        return None

    # -- the boot check -----------------------------------------------------------------------------------
    def boot_check_refusal(self) -> str | None:
        """Why a migrated VM cannot be booted here (None: :meth:`boot_check` works)."""
        return f"a {type(self).__name__} target cannot be booted from here"

    def boot_check(self, vm_id: str, *, mode: str, marker: str, timeout: float) -> BootResult:
        """Start the VM once with its NICs' links down, wait for ``marker`` on the serial console
        (``mode`` "serial") or for the guest agent to answer ("guest-agent"), then power it off."""
        raise NotImplementedError

    # -- the target side as one run's session ---------------------------------------------------------
    def begin_target(self, plan: TargetPlan, owned: Ownership) -> TargetSession:
        """Open this run's session on the target (each task opens it again from the plan and the ledger).
        The default works on the volume calls below (disks made before the VM); a hypervisor whose disks
        and VM arrive together (an import lease) or belong to a VM id returns its own session."""
        from include.providers.session import VolumeTargetSession

        return VolumeTargetSession(self, plan, owned)

    def local_storage_path(self, storage: str) -> str | None:
        """The folder of a target storage when its volumes are files on this host, writable here."""
        return None

    def local_disk_path(self, disk: DiskInfo) -> str | None:
        """The disk's file when it is on this host and readable here (qemu-img reads it in place)."""
        return None

    def identity(self) -> str:
        """What names this hypervisor whatever endpoint reaches it (target name claims are taken on it)."""
        return type(self).__name__

    @abc.abstractmethod
    def check(self) -> str:
        """Connect and return a one-line description (version); raise if unreachable."""

    @abc.abstractmethod
    def get_vm(self, name: str) -> VMInfo: ...

    @abc.abstractmethod
    def storage_exists(self, hint: str) -> bool:
        """Whether the target storage named by targetStorageHint (a pool, datastore...) exists."""

    @abc.abstractmethod
    def default_storage(self) -> str: ...

    @abc.abstractmethod
    def create_snapshot(self, vm: str, snapshot: str, disks: Sequence[DiskInfo], *,
                        exists_ok: bool = False) -> list[str]:
        """Snapshot what can be snapshotted; returns the names of the disks it covers. Fails when a
        snapshot of that name exists, unless ``exists_ok`` (then it is used as it is)."""

    @abc.abstractmethod
    def delete_snapshot(self, vm: str, snapshot: str) -> bool: ...

    @abc.abstractmethod
    def has_snapshot(self, vm: str, snapshot: str) -> bool: ...

    @abc.abstractmethod
    def read_disk(self, disk: DiskInfo, *, vm: str | None = None, snapshot: str | None = None) -> Iterator[Segment]:
        """Stream a disk's bytes (in its own format), holes reported as holes; ``snapshot`` of ``vm`` names the
        run's snapshot where it covers the disk (vSphere exports a disk from its snapshot; libvirt reads the
        shut-off VM's volume)."""

    @abc.abstractmethod
    def create_volume(self, storage: str, volume: str, fmt: str, capacity: int) -> str: ...

    @abc.abstractmethod
    def write_volume(self, storage: str, volume: str, segments: Iterator[Segment], length: int) -> None: ...

    @abc.abstractmethod
    def resize_volume(self, storage: str, volume: str, capacity: int) -> None:
        """Grow a volume (targetResourceHints.disk); never shrink."""

    def local_volume_path(self, storage: str, volume: str) -> str | None:
        """The volume's file when it is on this host and writable here (written directly, not streamed)."""
        return None

    @abc.abstractmethod
    def volume_key(self, storage: str, volume: str) -> str | None:
        """The volume's unique key on the hypervisor (libvirt: its path), or None when it does not exist."""

    @abc.abstractmethod
    def delete_volume(self, storage: str, volume: str, *, key: str, owner: str | None = None) -> bool:
        """Delete the volume, only if it is still the one identified by ``key`` (as recorded in the
        ledger when it was created) and, when ``owner`` is given, still carries that owner tag; returns
        whether it was deleted."""

    def volume_created_at(self, storage: str, volume: str) -> float | None:
        """A time the volume's creation cannot be later than (None when unknown)."""
        return None

    def mark_volume(self, storage: str, volume: str, owner: str) -> bool:
        """Tag the volume with its owner where the hypervisor can keep one; returns whether it did."""
        return False

    def volume_owner(self, storage: str, volume: str) -> str | None:
        return None

    @abc.abstractmethod
    def define_vm(self, name: str, vcpus: int, memory_mib: int, disks: Sequence[TargetDisk],
                  networks: Sequence[NetworkHint], *, nic_models: Sequence[str] = (),
                  owner: str | None = None) -> str:
        """Define the VM and return its unique id; ``nic_models`` gives each of ``networks`` its device model
        (:meth:`nic_model` of the source's); ``owner`` (``<namespace>/<name> <run>``) is kept in the VM's
        metadata."""

    def vm_owner(self, vm_id: str) -> str | None:
        """The ``owner`` tag the VM was defined with, if the hypervisor keeps one."""
        return None

    @abc.abstractmethod
    def describe_vm(self, vm_id: str) -> VMInfo:
        """The VM with this unique id as it is now (what ValidatingTarget checks); NotFound when it is gone."""

    @abc.abstractmethod
    def vm_id(self, name: str) -> str | None:
        """The unique id of the VM named ``name``, or None when there is none."""

    @abc.abstractmethod
    def delete_vm(self, vm_id: str) -> bool:
        """Remove the VM with this unique id (its definition only, never its disks)."""

    @abc.abstractmethod
    def delete_source_vm(self, vm_id: str, volumes: Sequence[tuple[str, str]]) -> list[str]:
        """deleteSource: remove the VM with this id and those of ``volumes`` ((storage, volume) pairs
        from the validated plan) that no other VM uses; returns what was removed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection."""
