"""The work of each phase of a migration, free of Airflow.

Operators in ``plugins/operators`` are thin wrappers around these functions; the command line and the
tests can call them too. Every phase reads what it needs from the run-state store (the spec, the typed
plan Validating saved, the per-disk records earlier phases left), so any phase can be run on its own,
and writes its outcome back there and to the status sink.

    context      MigrationContext: spec, plan, run state, drivers and storage of one migration
    bookkeeping  entering and completing phases, failures, the run's outcome, the error policy
    validating   Validating (the plan)
    source       Snapshotting, Exporting
    transfer     Transferring (through ``include.bytepath``)
    target       Converting, Importing, Creating, ValidatingTarget
    cleanup      cleanup policy, rollback, Ready or Failed
"""

from include.phases.bookkeeping import begin, finish, is_permanent, record_failure, run_outcome
from include.phases.cleanup import cleanup, finalize
from include.phases.context import READ_CHUNK, MigrationContext, failure_message, host_scope
from include.phases.source import export_disk, snapshot
from include.phases.target import convert_disk, create_vm, import_disk, validate_target
from include.phases.transfer import transfer_disk
from include.phases.validating import validate

__all__ = [
    "READ_CHUNK", "MigrationContext", "begin", "cleanup", "convert_disk", "create_vm", "export_disk",
    "failure_message", "finalize", "finish", "host_scope", "import_disk", "is_permanent", "record_failure",
    "run_outcome", "snapshot", "transfer_disk", "validate", "validate_target",
]
