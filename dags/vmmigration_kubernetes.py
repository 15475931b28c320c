"""The Kubernetes watcher (only when ``$VMMIGRATION_KUBERNETES_CONN_ID`` names a kubernetes connection): a
continuous DAG that waits for the cluster's VMMigrations to change (a deferrable sensor), mirrors them into the
spec store (include.kube_sync: the DAG factory then makes their DAGs, parsing stays local), and starts each new
VMMigration generation's one run, its run id derived from uid and generation (a second trigger of it is skipped).

Parsing reads two environment variables: no network.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, task

from include.store import dag_id_for
from sensors.vmmigration_sensor import VMMigrationSensor

CONN_ID = os.environ.get("VMMIGRATION_KUBERNETES_CONN_ID")
#: how long one watch waits for a change before its round ends (the next round watches again)
WATCH_SECONDS = int(os.environ.get("VMMIGRATION_KUBERNETES_WATCH_SECONDS") or 300)
#: the Celery queue of the watcher's tasks: a worker beside the dag-processor, whose store folder the mirror writes
QUEUE = os.environ.get("VMMIGRATION_KUBERNETES_WATCHER_QUEUE") or None
#: a fixed start_date in the past: without one, Airflow 3.3's @continuous timetable gives the first run an empty
#: data interval (start = end = now) and every next run the logical date of that first one, which the scheduler
#: refuses as a duplicate ("run already exists; skipping dagrun creation"), so the watcher ran only once
START_DATE = datetime(2026, 1, 1, tzinfo=UTC)

if CONN_ID:
    with DAG(dag_id="vmmigration_kubernetes", schedule="@continuous", start_date=START_DATE, max_active_runs=1,
             catchup=False, tags=["vmmigration", "kubernetes"], default_args={"queue": QUEUE} if QUEUE else {},
             doc_md="Mirrors the cluster's VMMigrations into the spec store and starts one run per generation.") \
            as dag:
        wait = VMMigrationSensor(task_id="wait_for_vmmigrations", kubernetes_conn_id=CONN_ID,
                                 watch_timeout=WATCH_SECONDS)

        @task(task_id="mirror_vmmigrations", retries=3, retry_delay=timedelta(seconds=10))
        def mirror() -> list[dict]:
            """Mirror the cluster into the store; the runs to start (each generation's, by its run id)."""
            from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

            from include.kube_sync import ClusterInventory, sync
            from include.store import SpecStore

            result = sync(ClusterInventory(KubernetesHook(conn_id=CONN_ID).get_conn()), SpecStore().root)
            return [{"trigger_dag_id": dag_id_for(m.namespace, m.name), "trigger_run_id": m.run_id,
                     "conf": {"uid": m.uid, "generation": m.generation}} for m in result.wanted]

        # the DAG of a new mirror appears once the dag-processor has parsed it: retried until then; a run that
        # exists already (an earlier round, another watcher) is skipped
        runs = mirror()
        wait >> runs
        TriggerDagRunOperator.partial(task_id="start_runs", skip_when_already_exists=True, retries=30,
                                      retry_delay=timedelta(seconds=5)).expand_kwargs(runs)
