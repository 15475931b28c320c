"""retryPolicy as Airflow decisions, and the failure notifier writing the status."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from include.errors import ChecksumError, NotFound, StorageAuthError
from include.spec import FieldError, SpecValidationError
from include.store import FileStatusSink, SpecStore


def test_transient_errors_wait_exactly_the_backoff_and_permanent_ones_fail():
    from operators.retry import MigrationRetryPolicy

    policy = MigrationRetryPolicy(300, 1800)
    delays = [policy.evaluate(ChecksumError("disk vda"), n, 5).retry_delay.total_seconds() for n in range(1, 6)]
    assert delays == [300, 600, 1200, 1800, 1800]  # the guide: 5m, 10m, 20m, capped at 30m
    for err in (StorageAuthError("Storage authentication failed"), NotFound("VM x not found"),
                SpecValidationError([FieldError("spec.x", "required")])):
        assert policy.evaluate(err, 1, 5).action.value == "fail"
    wrapped = AirflowFailException("permanent")
    wrapped.__cause__ = NotFound("gone")
    assert policy.evaluate(wrapped, 1, 5).action.value == "fail"
    assert MigrationRetryPolicy.deserialize(policy.serialize()).serialize() == policy.serialize()


def _notify(tmp_path, state: str, err: BaseException) -> dict:
    from notifiers.migration_status import MigrationStatusNotifier

    notifier = MigrationStatusNotifier(namespace="default", migration_name="n", phase="Converting",
                                       store_path=str(tmp_path))
    # the context an Airflow failure/retry callback receives (only the keys the notifier reads)
    notifier.notify({"ti": SimpleNamespace(state=state, try_number=1, max_tries=2), "exception": err})
    return FileStatusSink(SpecStore(tmp_path)).get("default", "n")


@pytest.mark.parametrize("state", ["up_for_retry", "TaskInstanceState.UP_FOR_RETRY"])
def test_a_retry_notes_the_attempt_without_failing_the_migration(tmp_path, state):
    from airflow.utils.state import TaskInstanceState

    # in the task runner the state is the enum itself, whose str() is "TaskInstanceState.UP_FOR_RETRY"
    value = TaskInstanceState.UP_FOR_RETRY if state.startswith("TaskInstanceState") else state
    status = _notify(tmp_path, value, ChecksumError("disk vda: sha256 mismatch"))
    assert status["phase"] != "Failed"
    cond = next(c for c in status["conditions"] if c["type"] == "Converting")
    assert cond["reason"] == "Retrying" and "attempt 1/3" in cond["message"]


def test_the_callback_it_is_attached_as_decides_over_the_state(tmp_path):
    """A killed task's callback runs outside the task, where the state may still read "running"."""
    from notifiers.migration_status import MigrationStatusNotifier

    common = {"namespace": "default", "migration_name": "k", "phase": "Transferring", "store_path": str(tmp_path)}
    ctx = {"ti": SimpleNamespace(state="running", try_number=1, max_tries=2), "exception": None}
    MigrationStatusNotifier(**common, final=False).notify(ctx)
    assert FileStatusSink(SpecStore(tmp_path)).get("default", "k")["phase"] != "Failed"
    MigrationStatusNotifier(**common, final=True).notify(ctx)
    assert FileStatusSink(SpecStore(tmp_path)).get("default", "k")["phase"] == "Failed"


def test_a_final_failure_marks_failed_with_the_cause(tmp_path):
    wrapped = AirflowFailException("wrapper")
    wrapped.__cause__ = StorageAuthError("Storage authentication failed: head bucket: 403")
    status = _notify(tmp_path, "failed", wrapped)
    assert status["phase"] == "Failed" and status["failedPhase"] == "Converting"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "StorageAuthenticationFailed"
