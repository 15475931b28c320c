"""Intermediate storage backends, chosen by ``spec.storage.type`` through ``include.registry``."""

from __future__ import annotations

from include.inventory import Credentials
from include.spec import StorageSpec
from include.storage.base import ObjectWriter, StorageBackend

__all__ = ["ObjectWriter", "StorageBackend", "backend_for", "address_guard"]


def address_guard(policy=None):
    """A callable running ``fn`` under the storage address policy (re-checked on every connect)."""
    from include import netpolicy

    policy = policy or netpolicy.AddressPolicy.from_env()
    return lambda fn: netpolicy.wrap(policy, fn)()


def backend_for(storage: StorageSpec, credentials: Credentials | None = None) -> StorageBackend:
    """The backend for a spec's ``storage`` block; credentials come from its Secret, never the spec.

    This is the command line's path; the pipeline builds the same backends through its Airflow hooks
    (``hooks.factories.storage_from_hook``). Both find the type in ``include.registry``.
    """
    from include import registry

    return registry.storage(storage.type).load_backend()(storage, credentials)
