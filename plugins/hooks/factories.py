"""Which hook serves a resolved Provider or a storage block: the pipeline's drivers come from here."""

from __future__ import annotations

from include.errors import InvalidMigration
from include.inventory import Credentials, ProviderInfo
from include.providers.base import HypervisorDriver
from include.spec import StorageSpec
from include.storage import address_guard
from include.storage.base import StorageBackend


def driver_from_hook(provider: ProviderInfo) -> HypervisorDriver:
    """The hypervisor driver of ``provider``, built through its Airflow hook."""
    if provider.type in ("libvirt", "qemu"):
        from hooks.libvirt_hook import LibvirtHook

        return LibvirtHook(uri=provider.endpoint, credentials=provider.credentials).get_conn()
    raise InvalidMigration(f"provider type {provider.type!r} is not supported yet", field="spec.targetProviderRef")


def storage_from_hook(storage: StorageSpec, credentials: Credentials | None) -> StorageBackend:
    """The intermediate storage of a spec's ``storage`` block, built through its Airflow hook."""
    if storage.type == "nfs":
        from hooks.nfs_hook import NfsStorageHook

        return NfsStorageHook(path=storage.path, endpoint=storage.endpoint).get_conn()
    if storage.type == "s3":
        from hooks.s3_storage_hook import MigrationS3Hook
        from include.storage.s3 import S3Storage, settings_from

        settings = settings_from(storage, credentials)
        return S3Storage(MigrationS3Hook(settings=settings).get_conn(), settings.bucket,
                         endpoint=settings.endpoint_url, guard=address_guard())
    if storage.type == "http":
        from airflow.sdk.log import mask_secret

        from include.storage.http import bearer_token, http_from

        token = bearer_token(credentials)
        if token:
            mask_secret(token)
        return http_from(storage, credentials, guard=address_guard())
    raise InvalidMigration(f"storage type {storage.type!r} is not supported", field="spec.storage.type")
