"""The one list of hypervisor (provider) types and storage types the engine knows.

Everything that depends on a type reads it from here: the inventory (which Provider types are
supported), the driver and backend factories (command line and pipeline), the Airflow hooks, the
connection types, a hypervisor's native disk format, and the Airflow pools the DAG factory puts
each task in (``config/pools.json`` is checked against :func:`pools`). Adding a hypervisor is one
adapter package plus one :class:`ProviderType` line below; adding a storage backend, one
:class:`StorageType` line.

Entries name their code by dotted path and import it only when used, so reading the registry at
DAG-parse time costs nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from include.errors import InvalidMigration


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class ProviderType:
    """A hypervisor type (a Provider's ``spec.type``)."""

    name: str
    #: ``module:Class`` of the driver (an ``include.providers.base.HypervisorDriver``)
    driver: str
    #: ``module:Class`` of its Airflow hook (importable only where Airflow is)
    hook: str
    #: the Airflow connection type of that hook
    connection_type: str
    #: the disk format used when ``targetDiskFormat`` is not set
    native_format: str
    #: other ``spec.type`` values served by the same adapter
    aliases: tuple[str, ...] = ()
    #: the Airflow pool throttling work on hypervisors of this type (snapshots, exports, imports, VMs)
    pool_slots: int = 4
    #: ``module:function(endpoint, vm_name, vm_id) -> url`` of a VM on the hypervisor's web UI (None: it has none)
    vm_url: str | None = None

    @property
    def pool(self) -> str:
        return f"{self.name}_io"

    @property
    def pool_description(self) -> str:
        return f"{self.name.capitalize()} work at once: snapshots, disk export and import streams, VM creation"

    def driver_class(self) -> Any:
        return _load(self.driver)

    def hook_class(self) -> Any:
        return _load(self.hook)


@dataclass(frozen=True)
class StorageType:
    """An intermediate storage type (``spec.storage.type``)."""

    name: str
    #: ``module:function`` building the backend from a StorageSpec and its Secret (command line, tests)
    backend: str
    #: ``module:function`` building it through the Airflow hook (the pipeline)
    hook_backend: str
    title: str
    pool_slots: int = 4

    @property
    def pool(self) -> str:
        return f"{self.name}_transfer"

    def load_backend(self) -> Any:
        return _load(self.backend)

    def load_hook_backend(self) -> Any:
        return _load(self.hook_backend)

    @property
    def pool_description(self) -> str:
        return f"Disk uploads and downloads to and from {self.title} intermediate storage at once"


PROVIDERS: tuple[ProviderType, ...] = (
    ProviderType("libvirt", driver="include.providers.libvirt_driver:LibvirtDriver",
                 hook="hooks.libvirt_hook:LibvirtHook", connection_type="libvirt", native_format="qcow2",
                 aliases=("qemu",)),
    ProviderType("vsphere", driver="include.providers.vsphere_driver:VSphereDriver",
                 hook="hooks.vsphere_hook:VSphereHook", connection_type="vsphere", native_format="vmdk",
                 pool_slots=4, vm_url="include.links:vsphere_vm_url"),
    ProviderType("proxmox", driver="include.providers.proxmox_driver:ProxmoxDriver",
                 hook="hooks.proxmox_hook:ProxmoxHook", connection_type="proxmox", native_format="qcow2",
                 pool_slots=4, vm_url="include.links:proxmox_vm_url"),
)

STORAGES: tuple[StorageType, ...] = (
    StorageType("nfs", backend="include.storage.nfs:from_spec", hook_backend="hooks.factories:nfs_backend",
                title="NFS"),
    StorageType("s3", backend="include.storage.s3:from_spec", hook_backend="hooks.factories:s3_backend",
                title="S3"),
    StorageType("http", backend="include.storage.http:from_spec",
                hook_backend="hooks.factories:http_backend", title="HTTP"),
)

#: Provider types the guide and the VirtRigaud CRDs name; the ones without an entry above are refused
#: in Validating as "not supported yet".
KNOWN_PROVIDER_TYPES = ("libvirt", "vsphere", "proxmox", "qemu", "firecracker")


def supported_provider_types() -> tuple[str, ...]:
    return tuple(p.name for p in PROVIDERS)


def supported_storage_types() -> tuple[str, ...]:
    return tuple(s.name for s in STORAGES)


def _find_provider(type_name: str | None) -> ProviderType | None:
    return next((p for p in PROVIDERS if type_name == p.name or type_name in p.aliases), None)


def _find_storage(type_name: str | None) -> StorageType | None:
    return next((s for s in STORAGES if type_name == s.name), None)


def provider(type_name: str, *, field: str = "spec.targetProviderRef") -> ProviderType:
    entry = _find_provider(type_name)
    if entry is None:
        raise InvalidMigration(f"provider type {type_name!r} is not supported yet (supported: "
                               f"{', '.join(supported_provider_types())})", field=field)
    return entry


def storage(type_name: str) -> StorageType:
    entry = _find_storage(type_name)
    if entry is None:
        raise InvalidMigration(f"storage type {type_name!r} is not supported (supported: "
                               f"{', '.join(supported_storage_types())})", field="spec.storage.type")
    return entry


def has_web_ui(type_name: str | None) -> bool:
    entry = _find_provider(type_name)
    return bool(entry and entry.vm_url)


def vm_ui_url(type_name: str | None, endpoint: str, vm_name: str, vm_id: str | None = None) -> str | None:
    """The URL of a VM on its hypervisor's web UI, None for a type without one (libvirt)."""
    entry = _find_provider(type_name)
    return _load(entry.vm_url)(endpoint, vm_name, vm_id) if entry and entry.vm_url else None


def native_format(type_name: str) -> str:
    """The native disk format of a provider type (qcow2 for a type without an adapter yet)."""
    entry = _find_provider(type_name)
    return entry.native_format if entry else "qcow2"


def pools() -> dict[str, dict[str, Any]]:
    """Every Airflow pool the DAGs use, as ``airflow pools import`` reads it (``config/pools.json``)."""
    out: dict[str, dict[str, Any]] = {}
    for p in PROVIDERS:
        out[p.pool] = {"slots": p.pool_slots, "description": p.pool_description, "include_deferred": False}
    for s in STORAGES:
        out[s.pool] = {"slots": s.pool_slots, "description": s.pool_description, "include_deferred": False}
    return out


def provider_pool(type_name: str | None) -> str:
    """The pool of a provider type; Airflow's ``default_pool`` for an unknown one (it fails in Validating)."""
    entry = _find_provider(type_name)
    return entry.pool if entry else "default_pool"


def storage_pool(type_name: str | None) -> str:
    entry = _find_storage(type_name)
    return entry.pool if entry else "default_pool"
