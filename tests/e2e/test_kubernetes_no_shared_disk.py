"""A run the Kubernetes watcher started, on a worker that shares no disk with the dag-processor: the DAG is
made from the mirror in the dag-processor's store folder, and its tasks run against another, empty store folder
with the run state (plan, ledger, status, the run's spec) in SQL. Validating reads the VMMigration and its
inventory from the cluster (the real kube-apiserver, as the engine's ServiceAccount) by the uid and generation
the run's conf names, every later task from the run state; the migration ends Ready in the cluster with the data
moved. A worker asked for the DAG of a migration its own store does not hold still builds the pipeline's
shape from the DAG id."""

from __future__ import annotations

import uuid

import pytest

from include.demo import create_source_vm, store_documents
from include.kube_sync import ClusterInventory, sync
from include.runstate import RUN_STATE_ENV
from include.store import STORE_ENV, FileStatusSink, SpecStore
from tests.e2e.helpers import assert_target_matches_source, load_dag, task_states
from tests.e2e.kube_world import GROUP, VERSION, _connect, _get, apply_all

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean_cluster")]




def test_a_watcher_run_needs_no_disk_shared_with_the_dag_processor(airflow_db, store, world, kube_api, engine,
                                                                    monkeypatch, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    name = f"nsd-{uuid.uuid4().hex[:6]}"
    create_source_vm(world)
    apply_all(kube_api, store_documents(world, name=name))
    with kube_api.client(engine) as api:
        mine = next(m for m in sync(ClusterInventory(api), store).changed if m.name == name)
    dag_id = f"vmmigration__default__{name}"
    dag = load_dag(dag_id)  # the dag-processor's view: from the mirror in its store
    before = sorted(p.name for p in store.iterdir())

    worker_store = tmp_path / "worker-store"
    worker_store.mkdir()
    monkeypatch.setenv(RUN_STATE_ENV, f"sqlite:///{tmp_path / 'runstate.db'}")
    _connect(monkeypatch, kube_api, engine)
    # dag.test() parses the DAG folder again to serialize it (the dag-processor's part, against its store);
    # once that is done, the tasks run as a worker with a store folder of its own: an empty one
    import airflow.dag_processing.dagbag as dagbag_module

    serialize = dagbag_module.sync_bag_to_db

    def then_be_a_worker(*args, **kwargs):
        result = serialize(*args, **kwargs)
        monkeypatch.setenv(STORE_ENV, str(worker_store))
        return result

    monkeypatch.setattr(dagbag_module, "sync_bag_to_db", then_be_a_worker)
    dagrun = dag.test(run_conf={"uid": mine.uid, "generation": mine.generation})
    assert str(dagrun.state) == "success", task_states(dagrun)
    status = _get(kube_api, "default", name)["status"]
    assert (status["phase"], status["progress"]) == ("Ready", 100), status
    assert status == {k: v for k, v in FileStatusSink(SpecStore(worker_store)).get("default", name).items()
                      if k in status}, "one status, kept in the SQL run state"
    assert_target_matches_source(world)
    assert not [p for p in worker_store.rglob("*") if p.is_file() and not p.name.endswith(".cluster")
                and ".lock" not in p.name], "the worker's folder holds no spec and no run state"
    assert sorted(p.name for p in store.iterdir()) == before, "the dag-processor's store was not written"
    assert (worker_store / "status" / "default" / name / "status.json.cluster").exists(), \
        "the tasks ran against the worker's own folder (where only the status writer's throttle note is)"
    spec = SpecStore(worker_store).state.read("default", name, "spec")
    assert spec["uid"] == mine.uid and spec["generation"] == 1
    assert [d["kind"] for d in spec["documents"]].count("Secret") == 0, "Secrets are read as needed, never kept"
    monkeypatch.setenv(STORE_ENV, str(worker_store))
    # the worker's parse: its store does not hold the migration, the DAG id names it
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", dag_id)
    shaped = DagBag(dag_folder=str(dag.fileloc)).dags[dag_id]
    assert sorted(shaped.task_ids) == sorted(dag.task_ids)
    policy = shaped.default_args["retry_policy"]
    assert policy._delays() == (5.0, 10.0), "its retry delays are the run's spec's (retryPolicy 5s/10s)"
    monkeypatch.delenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID")


def test_a_run_of_a_generation_the_cluster_has_left_does_not_start(airflow_db, store, world, kube_api, engine,
                                                                   monkeypatch, tmp_path):
    """A run queued for generation 1 that starts after an edit made generation 2 fails at Validating
    (PlanChanged, naming metadata.generation) before touching anything: generation 2 has its own run."""
    name = f"old-{uuid.uuid4().hex[:6]}"
    create_source_vm(world)
    apply_all(kube_api, store_documents(world, name=name))
    with kube_api.client(engine) as api:
        mine = next(m for m in sync(ClusterInventory(api), store).changed if m.name == name)
    kube_api.request("PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}",
                     body={"spec": {"targetResourceHints": {"cpu": 1, "memory": 256}}},
                     headers={"Content-Type": "application/merge-patch+json"})
    _connect(monkeypatch, kube_api, engine)
    dagrun = load_dag(f"vmmigration__default__{name}").test(run_conf={"uid": mine.uid, "generation": 1})
    states = task_states(dagrun)
    assert str(dagrun.state) == "failed" and states["validate_migration[-1]"] == "failed", states
    status = FileStatusSink(SpecStore(store)).get("default", name)
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert validated["reason"] == "PlanChanged" and "metadata.generation" in validated["message"], validated
