"""MigrationStatusNotifier: writes a phase's failure (or retry) into the migration's status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from airflow.sdk import BaseNotifier

if TYPE_CHECKING:
    from airflow.sdk import Context


class MigrationStatusNotifier(BaseNotifier):
    """Attached as on_failure_callback and on_retry_callback of every phase task.

    A final failure moves the status to Failed with a condition naming the phase and the error; a
    retry only notes the attempt on the phase's condition. Errors here are logged and swallowed: the
    finalize task writes Failed again, so this is never the only record of a failure.

    :param namespace: the VMMigration's namespace (templated)
    :param migration_name: the VMMigration's name (templated)
    :param phase: the phase the task runs (templated)
    :param final: True as an ``on_failure_callback``, False as an ``on_retry_callback`` (Airflow calls the
        one that applies, also for a task whose process was killed, where the callback runs elsewhere and
        the task instance's state may not say it yet); None: judge by the task instance's state
    """

    template_fields: Sequence[str] = ("namespace", "migration_name", "phase")

    def __init__(self, *, namespace: str, migration_name: str, phase: str, store_path: str | None = None,
                 final: bool | None = None) -> None:
        super().__init__()
        self.namespace = namespace
        self.migration_name = migration_name
        self.phase = phase
        self.store_path = store_path
        self.final = final

    def notify(self, context: Context) -> None:
        from airflow.sdk.exceptions import AirflowFailException

        from include.phases import record_failure
        from include.status import Phase
        from operators.base import pipeline_context

        try:
            ti = context["ti"]
            err = context.get("exception") or RuntimeError("task failed (no exception recorded)")
            # a permanent error reaches Airflow wrapped in AirflowFailException: the status names the cause
            cause = err.__cause__ if err.__cause__ is not None and isinstance(err, AirflowFailException) else err
            if self.final is not None:  # attached as on_failure_callback (final) or on_retry_callback
                retrying = not self.final
            else:
                # the state is a TaskInstanceState in the task runner: str() is "TaskInstanceState.UP_FOR_RETRY"
                state = getattr(ti, "state", None)
                retrying = str(getattr(state, "value", state) or "").lower().endswith("up_for_retry")
            ctx = pipeline_context(self.namespace, self.migration_name, store_path=self.store_path,
                                   logger=self.log, airflow_context=context)
            ctx.stop_when_deleted = False  # the failure is recorded (locally) even for a deleted VMMigration
            max_tries = getattr(ti, "max_tries", None)
            disk = getattr(getattr(ti, "task", None), "disk_name", None)
            record_failure(ctx, Phase(self.phase), cause, final=not retrying,
                           attempt=getattr(ti, "try_number", None), disk=disk,
                           max_attempts=(max_tries + 1) if isinstance(max_tries, int) else None)
        except Exception:  # noqa: BLE001 - a status write must never fail or hide the task's own error
            self.log.warning("could not record the failure of %s/%s in its status", self.namespace,
                             self.migration_name, exc_info=True)
