"""Start a VM migration from the Airflow UI: a trigger form (Params, include/request_form.py) that creates a
VMMigration and runs it through its own DAG, ``vmmigration__<namespace>__<name>``: the same pipeline as any other.

``submit_migration`` (include.request_form.submit) builds the VMMigration from the form, checks it as Validating
would against the store's inventory (every error named, nothing written; with a cluster, the spec's own rules, its
references being followed by Validating from the cluster), then writes it into the spec store
(``<store>/submitted--<ns>.<name>.yaml``) or, with ``$VMMIGRATION_KUBERNETES_CONN_ID``, creates it in the cluster
(as ``$VMMIGRATION_KUBERNETES_SUBMIT_CONN_ID``'s identity when set, deploy/rbac/submitter.yaml), where the watcher
DAG mirrors it like any VMMigration applied with kubectl.
``run_migration`` starts that migration's run and waits for it.

Parsing reads the store's local files for the form's proposals (no network). A worker running one of this DAG's
tasks does not read the store: the proposals do not change what the form accepts.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from airflow.sdk import DAG, get_parsing_context, task

from include import request_form
from operators.launch import RunMigrationOperator

log = logging.getLogger(__name__)
DAG_ID = "vmmigration_request"
CONN_ID = os.environ.get("VMMIGRATION_KUBERNETES_CONN_ID")
#: the form's own identity in the cluster (deploy/rbac/submitter.yaml: create on vmmigrations); default the engine's
SUBMIT_CONN_ID = os.environ.get("VMMIGRATION_KUBERNETES_SUBMIT_CONN_ID") or CONN_ID
#: submit writes the spec store the dag-processor reads: with $VMMIGRATION_STORE_QUEUE it runs beside it
STORE_QUEUE = os.environ.get("VMMIGRATION_STORE_QUEUE") or None
VIA = "the trigger form of vmmigration_request"


def _choices() -> request_form.Choices:
    if get_parsing_context().dag_id == DAG_ID:  # a worker about to run one of the tasks: no proposals needed
        return request_form.Choices()
    from include.store import SpecStore

    return request_form.choices(SpecStore().index())


with DAG(
    dag_id=DAG_ID,
    dag_display_name="Start a VM migration",
    description="Create a VMMigration from a form and run it through its own migration DAG",
    doc_md=__doc__,
    schedule=None,
    catchup=False,
    max_active_runs=8,
    params=request_form.params(_choices()),
    tags=["vmmigration", "form"],
    default_args={"retries": 0},
) as dag:

    @task(task_id="submit_migration", multiple_outputs=True, retries=2, retry_delay=timedelta(seconds=10),
          execution_timeout=timedelta(minutes=5), **({"queue": STORE_QUEUE} if STORE_QUEUE and not CONN_ID else {}))
    def submit_migration(params: dict | None = None, dag_run=None) -> dict:
        """The form as a VMMigration, checked, then written to the store (or created in the cluster)."""
        from airflow.sdk.exceptions import AirflowFailException

        from include.spec import SpecValidationError
        from include.store import SpecStore
        from include.submit import ClusterRefused

        values = params or {}
        # the submitter is this form run: only its own retry may replace the spec before the run starts (or, in a
        # cluster, take a VMMigration already there for its own)
        by = f"{DAG_ID}/{getattr(dag_run, 'run_id', '?')}"
        try:
            if CONN_ID:
                from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

                done = request_form.submit(values, SpecStore(), via=VIA, by=by,
                                           api_client=KubernetesHook(conn_id=SUBMIT_CONN_ID).get_conn())
            else:
                done = request_form.submit(values, SpecStore(), via=VIA, by=by)
        except SpecValidationError as err:  # FormError too
            raise AirflowFailException(request_form.refusal(values, err)) from None
        except ClusterRefused as err:  # no permission, no CRD: a retry would not mend it
            raise AirflowFailException(f"{err} (connection {SUBMIT_CONN_ID})") from None
        if not done.written and done.phase == "Ready":
            raise AirflowFailException(f"VMMigration {done.key} has moved its VM already (Ready): nothing to do; "
                                       f"choose another migration_name")
        log.info("VMMigration %s %s%s; its DAG is %s", done.key,
                 "written to the spec store" if done.where == "store" else "created in the cluster",
                 "" if done.written else " already (the same spec)", done.dag_id)
        return {"namespace": done.namespace, "name": done.name, "dag_id": done.dag_id, "where": done.where,
                "written": done.written, "run_id": done.run_id, "conf": done.conf}

    submitted = submit_migration()
    RunMigrationOperator(
        task_id="run_migration",
        namespace=submitted["namespace"],
        migration_name=submitted["name"],
        run_id=submitted["run_id"],
        conf=submitted["conf"],
        retries=1,
        retry_delay=timedelta(seconds=30),
        execution_timeout=timedelta(hours=72),
    )
