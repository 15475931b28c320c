"""The typed model of a run: the plan Validating writes once and every later phase reads back, and the
per-disk record of what the phases did to a disk.

The plan is stored as JSON in the run-state store under the camelCase keys of the guide's resources
(``sizeBytes``, ``memoryMiB``...); in Python it is only ever these frozen dataclasses. Which path a disk's
bytes take is the ``DiskRecord.export`` mode, one value, instead of flags read by several phases.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from include.bootcheck import BootCheckPlan
from include.errors import InvalidMigration
from include.providers.base import DiskInfo, TargetDisk
from include.spec import NetworkHint

T = TypeVar("T")

#: Python names whose stored key is not plain camelCase of the name
_KEYS = {"memory_mib": "memoryMiB"}


def _key(name: str) -> str:
    if name in _KEYS:
        return _KEYS[name]
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _dump(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {_key(f.name): _dump(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [_dump(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _dump(v) for k, v in obj.items()}
    return obj


def _load(cls: type[T], data: Mapping[str, Any], **nested: Any) -> T:
    """``cls`` from its stored form; ``nested`` converts the fields that are themselves typed."""
    if not isinstance(data, Mapping):
        raise InvalidMigration(f"the saved plan holds {type(data).__name__} where a {cls.__name__} belongs; "
                               f"run the Validating phase again")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = _key(f.name)
        if key not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InvalidMigration(f"the saved plan has no {key!r} in its {cls.__name__}; it was made by another "
                                       f"version or by hand: run the Validating phase again")
            continue
        value = data[key]
        values[f.name] = nested[f.name](value) if f.name in nested and value is not None else value
    return cls(**values)


# -- the plan ----------------------------------------------------------------------------------------------

class Conversion(enum.StrEnum):
    """Where a disk changes format: nowhere, before it leaves the source, or on arrival."""

    NONE = "none"
    SOURCE = "source"
    TARGET = "target"


@dataclass(frozen=True)
class DiskPlan:
    name: str
    size_bytes: int
    allocated_bytes: int
    source_format: str
    source_path: str
    source_pool: str | None
    source_volume: str | None
    bus: str
    transit_format: str
    conversion: Conversion
    target_format: str
    object_key: str
    target_storage: str
    target_volume: str
    target_capacity: int
    #: the bus on the target (the target hypervisor's mapping of the source's ``bus``)
    target_bus: str
    #: exported live: the VM runs, the disk is read as raw guest data from the run's point in time
    live: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiskPlan:
        # plans saved before the bus was mapped: the disk keeps its bus (what those runs created it with)
        if isinstance(data, Mapping) and "targetBus" not in data:
            data = {**data, "bus": data.get("bus", "virtio"), "targetBus": data.get("bus", "virtio")}
        return _load(cls, data, conversion=Conversion)

    def source_disk(self) -> DiskInfo:
        """The disk as the source hypervisor described it at Validating."""
        return DiskInfo(name=self.name, format=self.source_format, capacity=self.size_bytes,
                        allocation=self.allocated_bytes, path=self.source_path, pool=self.source_pool,
                        volume=self.source_volume, bus=self.bus)

    def target_disk(self) -> TargetDisk:
        return TargetDisk(name=self.name, pool=self.target_storage, volume=self.target_volume,
                          format=self.target_format, capacity=self.target_capacity, bus=self.target_bus)


@dataclass(frozen=True)
class SourcePlan:
    provider: str  # namespace/name of the Provider
    type: str
    endpoint: str
    vm: str  # the name the hypervisor knows the VM by
    vm_id: str | None  # its unique id, checked before every touch of the source
    running: bool
    vcpus: int
    memory_mib: int
    #: the VM's devices that are not migrated, with why (said in the plan and the Validating message)
    skipped: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SourcePlan:
        return _load(cls, data, skipped=tuple)

    @property
    def scope(self) -> str:
        """The ledger's scope for what a run creates on the source (a snapshot)."""
        return f"{self.type}:{self.endpoint}"


@dataclass(frozen=True)
class TargetPlan:
    provider: str
    type: str
    endpoint: str
    vm: str
    storage: str
    vcpus: int
    memory_mib: int
    networks: tuple[NetworkHint, ...] = ()
    #: the NIC model of each of ``networks``, mapped by the target's driver from the source NIC in the same
    #: place (empty in a plan made before the mapping: the driver's default)
    nic_models: tuple[str, ...] = ()
    #: the target adapter's choices for this run, made at Validating from its Provider (vSphere: how disks are
    #: uploaded); pinned with the plan, so a Provider edited mid-run does not change them
    options: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetPlan:
        return _load(cls, data, networks=lambda ns: tuple(NetworkHint(**n) for n in ns), nic_models=tuple,
                     options=dict)

    @property
    def scope(self) -> str:
        return f"{self.type}:{self.endpoint}"

    def networks_dict(self) -> list[dict[str, str]]:
        return [_network(n) for n in self.networks]


def _network(hint: NetworkHint) -> dict[str, str]:
    return {k: v for k, v in (("name", hint.name), ("network", hint.network), ("bridge", hint.bridge)) if v}


@dataclass(frozen=True)
class StoragePlan:
    type: str
    prefix: str
    compression: str | None
    #: the storage block as validated (no credentials: those stay in the Secret)
    spec: dict[str, Any]
    #: where the objects really go (a Secret may set the endpoint): the ledger's scope
    effective_endpoint: str | None = None

    @property
    def scope(self) -> str:
        """Where intermediate objects live, as the ledger names it: type plus bucket, endpoint or path."""
        endpoint = self.effective_endpoint or self.spec.get("endpoint")
        where = {"s3": lambda: f"{endpoint or 'aws'}/{self.spec.get('bucket')}",
                 "http": lambda: str(endpoint),
                 "nfs": lambda: str(self.spec.get("path"))}[self.spec["type"]]()
        return f"{self.spec['type']}:{where}"


@dataclass(frozen=True)
class SnapshotPlan:
    name: str
    disks: tuple[str, ...]  # the disks a snapshot covers (none when the hypervisor cannot take one)
    #: "snapshot" (the hypervisor's snapshot of a shut-off VM), or "point-in-time" (a running VM's disks
    #: held at one instant while it runs, every disk exported from it)
    mode: str = "snapshot"

    @property
    def live(self) -> bool:
        return self.mode == "point-in-time"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SnapshotPlan:
        return _load(cls, data, disks=tuple)


@dataclass(frozen=True)
class CleanupPlan:
    delete_intermediate: bool
    delete_snapshot: bool
    delete_source: bool
    #: the spec says explicitly that a source validated running may be deleted (an annotation)
    delete_running_source: bool = False


@dataclass(frozen=True)
class Plan:
    """What one run does, fixed by Validating: every later phase keeps to it, whatever the spec says now."""

    migration: str  # namespace/name
    dag_id: str
    source: SourcePlan
    target: TargetPlan
    storage: StoragePlan
    snapshot: SnapshotPlan
    disks: tuple[DiskPlan, ...]
    cleanup: CleanupPlan
    phases: tuple[str, ...] = ()
    #: digests of what the run was validated against (see ``include.plan.pin_of``); empty: never compared
    pin: dict[str, str] = field(default_factory=dict)
    #: the store files this migration's resolution reads: later phases read only these
    spec_files: tuple[str, ...] = ()
    #: the opt-in boot check of ValidatingTarget (None: not asked)
    boot_check: BootCheckPlan | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return _load(cls, data, source=SourcePlan.from_dict, target=TargetPlan.from_dict,
                     storage=lambda v: _load(StoragePlan, v), snapshot=SnapshotPlan.from_dict,
                     disks=lambda ds: tuple(DiskPlan.from_dict(d) for d in ds),
                     cleanup=lambda v: _load(CleanupPlan, v), phases=tuple, spec_files=tuple,
                     boot_check=lambda v: _load(BootCheckPlan, v))

    def to_dict(self) -> dict[str, Any]:
        data = _dump(self)
        data["target"]["networks"] = self.target.networks_dict()
        return data

    def disk(self, name: str) -> DiskPlan:
        for d in self.disks:
            if d.name == name:
                return d
        raise InvalidMigration(f"disk {name!r} is not in the plan of {self.migration} (planned: "
                               f"{', '.join(d.name for d in self.disks)}); the source VM changed since Validating: "
                               f"run the migration again")

    @property
    def disk_names(self) -> list[str]:
        return [d.name for d in self.disks]


# -- what the phases did to one disk -----------------------------------------------------------------------

class ExportMode(enum.StrEnum):
    """How Transferring reads a disk: the provider's stream of the disk in its own format, the guest data
    read in place through its map, or a converted image in the staging folder."""

    STREAM = "stream"
    MAP = "map"
    STAGED = "staged"
    #: the guest data as it was at the run's point in time, read from the running source (NBD)
    POINT_IN_TIME = "point-in-time"


@dataclass(frozen=True)
class DiskRecord:
    """The per-disk run state the phases leave for the next ones (stored beside the plan)."""

    export_mode: ExportMode | None = None
    export_path: str | None = None
    export_format: str | None = None
    export_bytes: int | None = None
    export_sha256: str | None = None
    object_key: str | None = None
    transit_sha256: str | None = None
    transit_bytes: int | None = None
    sent_bytes: int | None = None
    resumed_bytes: int | None = None
    converted_path: str | None = None  # a converted image in staging, for Importing to write
    converted_into: str | None = None  # the target volume Converting wrote in place
    converted_sha256: str | None = None
    imported: bool = False
    target_sha256: str | None = None
    target_bytes: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiskRecord:
        known = {_key(f.name) for f in dataclasses.fields(cls)}
        record = _load(cls, {k: v for k, v in data.items() if k in known}, export_mode=ExportMode)
        if record.export_mode is None and data.get("exportPath"):
            return dataclasses.replace(record, export_mode=ExportMode.STAGED)
        return record

    @staticmethod
    def keys(**values: Any) -> dict[str, Any]:
        """Python field names to the stored keys (for a partial update)."""
        names = {f.name for f in dataclasses.fields(DiskRecord)}
        unknown = set(values) - names
        if unknown:
            raise TypeError(f"not fields of a DiskRecord: {', '.join(sorted(unknown))}")
        return {_key(k): _dump(v) for k, v in values.items()}
