"""Airflow-side errors of the hooks. Domain errors live in ``include.errors``; these cover what only
an Airflow deployment can get wrong (connections and their settings)."""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException


class MigrationError(AirflowException):
    """Base of the hooks' own errors."""


class HypervisorApiError(MigrationError):
    """A hypervisor connection is missing or misconfigured."""


class StorageBackendError(MigrationError):
    """A storage connection is missing or misconfigured."""


class UnsupportedDiskFormat(MigrationError):
    """A disk format the engine cannot handle."""


class ResourceConflict(MigrationError):
    """Two settings contradict each other."""
