"""Which hook serves a resolved Provider or a storage block: the pipeline's drivers come from here."""

from __future__ import annotations

from include.errors import InvalidMigration
from include.inventory import Credentials, ProviderInfo
from include.providers.base import HypervisorDriver
from include.spec import StorageSpec
from include.storage.base import StorageBackend


def driver_from_hook(provider: ProviderInfo) -> HypervisorDriver:
    """The hypervisor driver of ``provider``, built through its Airflow hook."""
    if provider.type in ("libvirt", "qemu"):
        from hooks.libvirt_hook import LibvirtHook

        return LibvirtHook(uri=provider.endpoint).get_conn()
    raise InvalidMigration(f"provider type {provider.type!r} is not supported yet", field="spec.targetProviderRef")


def storage_from_hook(storage: StorageSpec, credentials: Credentials | None) -> StorageBackend:
    """The intermediate storage of a spec's ``storage`` block, built through its Airflow hook."""
    if storage.type == "nfs":
        from hooks.nfs_hook import NfsStorageHook

        return NfsStorageHook(path=storage.path, endpoint=storage.endpoint).get_conn()
    raise InvalidMigration(f"storage type {storage.type!r} is not supported yet (supported: nfs)",
                           field="spec.storage.type")
