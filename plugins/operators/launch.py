"""Run a submitted VMMigration through its own DAG (``vmmigration__<namespace>__<name>``) and wait for it: the
trigger form and the wave plans start migrations only through this, so every migration runs the one pipeline.

The migration's DAG appears once the dag-processor has parsed the file ``include.submit`` wrote: the trigger is
retried until then (``parse_timeout``). The run id is derived from the launching task instance, so a retry of
this task waits on the run it started instead of starting a second one. The wait holds this task's slot for the
whole migration (it polls; it does not defer), so a limit on how many of these run at once
(``max_active_tis_per_dagrun``) is a limit on how many migrations move at once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk import Context

_RUN_ID_MAX = 250


def launched_run_id(parent_dag_id: str, parent_run_id: str, map_index: int | None) -> str:
    """``launched__<parent dag>__<12 hex of the parent run and map index>``: stable for a task instance, unique
    across them, within Airflow's 250 characters."""
    digest = hashlib.sha256(f"{parent_dag_id}\0{parent_run_id}\0{map_index}".encode()).hexdigest()[:12]
    return f"launched__{parent_dag_id[:_RUN_ID_MAX - 24]}__{digest}"


class RunMigrationOperator(BaseOperator):
    """Trigger the run of VMMigration ``namespace``/``migration_name`` and wait until it ends.

    :param namespace: the VMMigration's namespace (templated)
    :param migration_name: its name (templated)
    :param run_id: the run to start (a cluster VMMigration's generation run id); default: derived from this
        task instance (templated)
    :param conf: the run's conf (a cluster run's ``{uid, generation}``) (templated)
    :param parse_timeout: how long to wait for the migration's DAG to appear, in seconds
    :param poke_interval: seconds between two looks at the run
    :return: the migration's run summary (``status.summary``, written by finalize), its phase and run
    """

    template_fields: Sequence[str] = ("namespace", "migration_name", "run_id", "conf")
    ui_color = "#dbeafe"

    def __init__(self, *, namespace: str, migration_name: str, run_id: str | None = None,
                 conf: dict[str, Any] | None = None, parse_timeout: float = 600.0, poke_interval: float = 5.0,
                 store_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.namespace = namespace
        self.migration_name = migration_name
        self.run_id = run_id
        self.conf = conf
        self.parse_timeout = parse_timeout
        self.poke_interval = poke_interval
        self.store_path = store_path

    def execute(self, context: Context) -> dict[str, Any]:
        from include.store import dag_id_for

        ti = context["ti"]
        dag_id = dag_id_for(self.namespace, self.migration_name)
        run_id = self.run_id or launched_run_id(ti.dag_id, ti.run_id, getattr(ti, "map_index", None))
        self._trigger(ti, dag_id, run_id)
        ti.xcom_push(key="trigger_run_id", value=run_id)
        state = self._wait(ti, dag_id, run_id)
        status = self._status() or {}
        result = {"namespace": self.namespace, "name": self.migration_name, "dag_id": dag_id, "run_id": run_id,
                  "state": state, "phase": status.get("phase"), "message": status.get("message"),
                  "summary": status.get("summary")}
        if state != "success":
            ended = status.get("phase") or state
            raise AirflowFailException(f"migration {self.namespace}/{self.migration_name} ended {ended} (run {run_id}):"
                                       f" {status.get('message') or 'see its DAG run'}")
        return result

    def _trigger(self, ti: Any, dag_id: str, run_id: str) -> None:
        from airflow.sdk.exceptions import ErrorType
        from airflow.sdk.execution_time.comms import ErrorResponse, TriggerDagRun
        from airflow.sdk.execution_time.task_runner import SUPERVISOR_COMMS

        if ti.get_dr_count(dag_id=dag_id, run_ids=[run_id]):
            self.log.info("run %s of %s exists already (an earlier try of this task): waiting for it", run_id, dag_id)
            return
        # one run of a migration at a time, and a migration moves its VM once: never queue a second run behind a
        # run under way (started by another form or wave), nor start one after Ready (narrow race: two launchers
        # looking at once both see none; the migration's max_active_runs=1 then queues the second, which
        # Validating refuses if the first ended Ready)
        if ti.get_dr_count(dag_id=dag_id, states=["queued", "running"]):
            if ti.get_dr_count(dag_id=dag_id, run_ids=[run_id]):  # ours, started meanwhile (the cluster's watcher)
                self.log.info("run %s of %s was started meanwhile: waiting for it", run_id, dag_id)
                return
            raise AirflowFailException(f"migration {self.namespace}/{self.migration_name} has a run under way already "
                                       f"(see the DAG {dag_id}); not starting another")
        if (self._status() or {}).get("phase") == "Ready":
            raise AirflowFailException(f"migration {self.namespace}/{self.migration_name} has moved its VM already "
                                       f"(Ready); not starting it again")
        deadline = time.monotonic() + self.parse_timeout
        said = False
        while True:
            try:
                reply = SUPERVISOR_COMMS.send(TriggerDagRun(dag_id=dag_id, run_id=run_id, conf=self.conf or {}))
                error = reply if isinstance(reply, ErrorResponse) else None
            except Exception as err:  # noqa: BLE001 - the API server's refusal arrives as an error; classified below
                error = getattr(err, "error", None) or err
            if error is None:
                self.log.info("started run %s of %s", run_id, dag_id)
                return
            if getattr(error, "error", None) == ErrorType.DAGRUN_ALREADY_EXISTS:
                self.log.info("run %s of %s exists already: waiting for it", run_id, dag_id)
                return
            code = _status_code(error)
            if code is not None and code != 404:  # refused for good (import errors, run type, conf): say it now
                raise AirflowFailException(f"the DAG {dag_id} refused the run (HTTP {code}): {_detail(error)}")
            if time.monotonic() > deadline:
                raise AirflowFailException(f"the DAG {dag_id} did not appear within {self.parse_timeout:.0f} s: see "
                                           f"the import errors of dags/vmmigration_store_check.py ({_detail(error)})")
            if not said:
                self.log.info("waiting for the dag-processor to parse %s (%s)", dag_id, _detail(error))
                said = True
            time.sleep(self.poke_interval)

    def _wait(self, ti: Any, dag_id: str, run_id: str) -> str:
        last, since, queued_said = None, time.monotonic(), 0.0
        while True:
            state = ti.get_dagrun_state(dag_id=dag_id, run_id=run_id)
            status = self._status() or {}
            seen = (status.get("phase"), status.get("progress"), status.get("message"))
            if seen != last:
                self.log.info("%s/%s: %s %s%% %s", self.namespace, self.migration_name, seen[0] or "Pending",
                              seen[1] or 0, seen[2] or "")
                last = seen
            if state in ("success", "failed"):
                return state
            waited = time.monotonic() - since
            if state == "queued" and waited - queued_said >= 300:  # say why nothing moves (a paused DAG, no slot)
                self.log.warning("run %s of %s is still queued after %.0f min: is the DAG paused, or the scheduler "
                                 "out of slots?", run_id, dag_id, waited / 60)
                queued_said = waited
            time.sleep(self.poke_interval)

    def _status(self) -> dict[str, Any] | None:
        from include.store import FileStatusSink, SpecStore

        try:
            return FileStatusSink(SpecStore(self.store_path) if self.store_path else SpecStore()).get(
                self.namespace, self.migration_name)
        except Exception:  # noqa: BLE001 - no status to show yet is not a failure of the wait
            return None


def _status_code(error: Any) -> int | None:
    """The HTTP status of an Execution API refusal, None when there is none (a connection error)."""
    detail = getattr(error, "detail", None)
    code = detail.get("status_code") if isinstance(detail, dict) else None
    return int(code) if isinstance(code, int) else None


def _detail(error: Any) -> str:
    detail = getattr(error, "detail", None)
    if isinstance(detail, dict):
        inner = detail.get("detail")
        if isinstance(inner, dict) and isinstance(inner.get("detail"), dict):
            inner = inner["detail"]
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
        return str(detail.get("message") or detail)[:300]
    return str(error)[:300]
