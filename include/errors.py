"""Domain errors of the migration engine (no Airflow imports).

This is the engine's one error hierarchy (the Airflow hooks raise these too). Each error says whether
retrying can help (``permanent``) and which condition reason the status records (the guide's
troubleshooting section names them). Operators turn permanent errors into ``AirflowFailException``
so that Airflow does not retry them.
"""

from __future__ import annotations


class MigrationFailure(Exception):
    """Base of every error the engine raises on purpose."""

    permanent = False
    reason = "MigrationFailed"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field

    def __reduce__(self):
        return (_rebuild, (self.__class__, str(self), self.field))


def _rebuild(cls: type[MigrationFailure], text: str, field: str | None = None) -> MigrationFailure:
    err = cls.__new__(cls)
    Exception.__init__(err, text)
    err.field = field
    return err


class InvalidMigration(MigrationFailure):
    """The spec or what it points at is unusable as given."""

    permanent = True
    reason = "ValidationFailed"


class NotFound(InvalidMigration):
    """A VM, pool, provider or object that must exist does not."""

    reason = "NotFound"


class Conflict(InvalidMigration):
    """Something the migration would create already exists and was not created by it, or another
    migration has claimed the same target name."""

    reason = "Conflict"


class ConfigurationError(InvalidMigration):
    """An Airflow connection or setting the engine reads is missing or contradicts itself (permanent: a
    retry would only read the same settings again)."""

    reason = "ConfigurationError"


class UnsupportedDiskFormat(InvalidMigration):
    """A disk format the engine cannot read or write."""

    reason = "UnsupportedDiskFormat"


class HypervisorError(MigrationFailure):
    """A hypervisor API call failed (transient unless said otherwise)."""

    reason = "HypervisorError"


class HypervisorAuthError(HypervisorError):
    """The hypervisor refused the Provider's credentials (permanent: a retry is refused the same way)."""

    permanent = True
    reason = "HypervisorAuthenticationFailed"


class StorageError(MigrationFailure):
    """Intermediate storage failed (transient)."""

    reason = "StorageError"


class StorageAuthError(StorageError):
    """The storage backend refused the credentials."""

    permanent = True
    reason = "StorageAuthenticationFailed"


class ChecksumError(MigrationFailure):
    """Bytes read back do not match the sha256 recorded when they were written."""

    reason = "ChecksumMismatch"


class ConversionError(MigrationFailure):
    """qemu-img could not convert a disk (the guide: "Failed to convert disk format")."""

    reason = "ConversionFailed"


class TargetCreationError(MigrationFailure):
    """The target VM could not be created (the guide: "Failed to create VM")."""

    reason = "CreateFailed"


class TargetValidationError(MigrationFailure):
    """The target VM does not match what was asked."""

    permanent = True
    reason = "TargetValidationFailed"


class MigrationDeleted(InvalidMigration):
    """The VMMigration was deleted from the cluster while its run was under way: the run stops and rolls back."""

    reason = "Deleted"


class PlanChanged(InvalidMigration):
    """The spec, a Provider or the storage was edited after Validating: the run does not follow it."""

    reason = "PlanChanged"


class AlreadyMigrated(InvalidMigration):
    """The migration ended Ready: a new run of it is refused, and leaves its status, run state and VMs as they
    are (a migration moves its VM once)."""

    reason = "AlreadyReady"
