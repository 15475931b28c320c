"""One VM of a migration wave: wait for its leases (per source provider, target provider and storage, see
``include.waves.Leases``), then run its VMMigration through its own DAG (``RunMigrationOperator``), and give the
leases up when that run has ended.

The wave's ``maxConcurrent`` is ``max_active_tis_per_dagrun`` of the mapped task; the other limits are leases,
because a task instance waits in one pool only. Past the window's end (``not_after``) no migration starts: the
task is skipped, naming the reason.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowSkipException

from operators.launch import RunMigrationOperator

if TYPE_CHECKING:
    from airflow.sdk import Context


class WaveMigrationOperator(RunMigrationOperator):
    """:class:`RunMigrationOperator` under a wave's leases and window.

    :param leases: ``{resource: limit}``, the slots to hold while the migration runs (templated)
    :param not_after: RFC 3339 time after which the migration must not start (the window's end) (templated)
    :param lease_ttl: seconds a lease lives without renewal (renewed every quarter of it)
    """

    template_fields: Sequence[str] = (*RunMigrationOperator.template_fields, "leases", "not_after")
    ui_color = "#e0e7ff"

    def __init__(self, *, leases: dict[str, int] | None = None, not_after: str | None = None,
                 lease_ttl: float = 300.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.leases = leases
        self.not_after = not_after
        self.lease_ttl = lease_ttl

    def execute(self, context: Context) -> dict[str, Any]:
        from include import waves
        from include.store import SpecStore

        deadline = None if self._started(context) else self._deadline()
        if deadline is not None and datetime.now(UTC).timestamp() >= deadline:
            raise AirflowSkipException(f"the window ended at {self.not_after}: {self.namespace}/"
                                       f"{self.migration_name} does not start")
        demands = dict(self.leases or {})
        if not demands:
            return super().execute(context)
        ti = context["ti"]
        holder = f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{getattr(ti, 'map_index', -1)}"
        leases = waves.Leases((SpecStore(self.store_path) if self.store_path else SpecStore()).state,
                              ttl=self.lease_ttl)
        self.log.info("waiting for leases: %s", waves.describe(demands))
        held = leases.acquire(holder, demands, what=f"{self.namespace}/{self.migration_name}", deadline=deadline,
                              poll=min(self.poke_interval, 2.0))
        if held is None:
            raise AirflowSkipException(f"the window ended at {self.not_after} before a lease of "
                                       f"{waves.describe(demands)} was free: {self.namespace}/{self.migration_name} "
                                       f"does not start")
        self.log.info("leases taken: %s", ", ".join(sorted(held.keys)))
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(leases, held, stop), daemon=True)
        renewer.start()
        try:
            return super().execute(context)
        finally:
            stop.set()
            renewer.join(timeout=10)
            leases.release(held)
            self.log.info("leases given up: %s", ", ".join(sorted(held.keys)))

    def _started(self, context: Context) -> bool:
        """Whether an earlier try of this task started the migration's run already (it is then waited on, whatever
        the window says: a moving migration is never abandoned)."""
        from include.store import dag_id_for
        from operators.launch import launched_run_id

        ti = context["ti"]
        if int(getattr(ti, "try_number", 1) or 1) <= 1:
            return False
        run_id = self.run_id or launched_run_id(ti.dag_id, ti.run_id, getattr(ti, "map_index", None))
        try:
            return ti.get_dr_count(dag_id=dag_id_for(self.namespace, self.migration_name), run_ids=[run_id]) > 0
        except Exception:  # noqa: BLE001 - the migration's DAG is not parsed: nothing was started
            return False

    def _deadline(self) -> float | None:
        if not self.not_after:
            return None
        from include.waves import parse_time

        return parse_time(self.not_after).timestamp()

    def _renew(self, leases: Any, held: Any, stop: threading.Event) -> None:
        while not stop.wait(max(leases.ttl / 4, 1.0)):
            try:
                lost = leases.renew(held)
            except Exception:  # noqa: BLE001 - a failed renewal is retried; the lease lives a ttl
                self.log.warning("could not renew the leases (retrying)", exc_info=True)
                continue
            if lost:
                self.log.warning("leases of %s were taken over after expiring: the limit may be exceeded",
                                 ", ".join(lost))
