"""Intermediate storage backends, chosen by ``spec.storage.type``."""

from __future__ import annotations

from include.errors import InvalidMigration
from include.inventory import Credentials
from include.spec import StorageSpec
from include.storage.base import ObjectWriter, StorageBackend

__all__ = ["ObjectWriter", "StorageBackend", "backend_for", "address_guard"]


def address_guard(policy=None):
    """A callable running ``fn`` under the storage address policy (re-checked on every connect)."""
    from include import netpolicy

    policy = policy or netpolicy.AddressPolicy.from_env()
    return lambda fn: netpolicy.wrap(policy, fn)()

SUPPORTED = ("nfs", "s3", "http")


def backend_for(storage: StorageSpec, credentials: Credentials | None = None) -> StorageBackend:
    """The backend for a spec's ``storage`` block; credentials come from its Secret, never the spec.

    This is the command line's path; the pipeline builds the same backends through its Airflow hooks
    (``hooks.factories.storage_from_hook``).
    """
    if storage.type == "nfs":
        from include.storage.nfs import NfsStorage

        return NfsStorage(storage.path or "", storage.endpoint)
    if storage.type == "s3":
        from include.storage.s3 import S3Storage, boto3_client, settings_from

        settings = settings_from(storage, credentials)
        return S3Storage(boto3_client(settings), settings.bucket, endpoint=settings.endpoint_url,
                         guard=address_guard())
    if storage.type == "http":
        from include.storage.http import http_from

        return http_from(storage, credentials, guard=address_guard())
    raise InvalidMigration(f"storage type {storage.type!r} is not supported (supported: {', '.join(SUPPORTED)})",
                           field="spec.storage.type")
