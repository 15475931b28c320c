"""The pipeline's drivers and storage backends, built through their Airflow hooks.

Which hook serves which type is read from ``include.registry``: a provider type names its hook class
(built with the resolved Provider's endpoint and Secret; its ``get_conn`` is the SDK's connection,
which the driver's ``from_hook`` works on), a storage type names one of the functions below.
"""

from __future__ import annotations

from include import registry
from include.inventory import Credentials, ProviderInfo
from include.providers.base import HypervisorDriver
from include.spec import StorageSpec
from include.storage import address_guard
from include.storage.base import StorageBackend


def driver_from_hook(provider: ProviderInfo) -> HypervisorDriver:
    """The hypervisor driver of ``provider``, built through its Airflow hook."""
    entry = registry.provider(provider.type)
    hook = entry.hook_class()(uri=provider.endpoint, credentials=provider.credentials)
    driver = entry.driver_class().from_hook(hook)
    driver.configure(provider)
    return driver


def storage_from_hook(storage: StorageSpec, credentials: Credentials | None) -> StorageBackend:
    """The intermediate storage of a spec's ``storage`` block, built through its Airflow hook."""
    return registry.storage(storage.type).load_hook_backend()(storage, credentials)


def nfs_backend(storage: StorageSpec, credentials: Credentials | None) -> StorageBackend:
    from hooks.nfs_hook import NfsStorageHook

    return NfsStorageHook(path=storage.path, endpoint=storage.endpoint).get_conn()


def s3_backend(storage: StorageSpec, credentials: Credentials | None) -> StorageBackend:
    from hooks.s3_storage_hook import MigrationS3Hook
    from include.storage.s3 import S3Storage, settings_from

    settings = settings_from(storage, credentials)
    return S3Storage(MigrationS3Hook(settings=settings).get_conn(), settings.bucket,
                     endpoint=settings.endpoint_url, guard=address_guard())


def http_backend(storage: StorageSpec, credentials: Credentials | None) -> StorageBackend:
    from hooks.masking import mask
    from include.storage.http import bearer_token, http_from

    mask(bearer_token(credentials))
    return http_from(storage, credentials, guard=address_guard())
