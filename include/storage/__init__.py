"""Intermediate storage backends, chosen by ``spec.storage.type``."""

from __future__ import annotations

from include.errors import InvalidMigration
from include.inventory import Credentials
from include.spec import StorageSpec
from include.storage.base import ObjectWriter, StorageBackend

__all__ = ["ObjectWriter", "StorageBackend", "backend_for"]

SUPPORTED = ("nfs",)


def backend_for(storage: StorageSpec, credentials: Credentials | None = None) -> StorageBackend:
    """The backend for a spec's ``storage`` block; credentials come from its Secret, never the spec."""
    if storage.type == "nfs":
        from include.storage.nfs import NfsStorage

        return NfsStorage(storage.path or "", storage.endpoint)
    raise InvalidMigration(f"storage type {storage.type!r} is not supported yet (supported: "
                           f"{', '.join(SUPPORTED)})", field="spec.storage.type")
