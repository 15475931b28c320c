"""The guide's Quick Start through a real Airflow (API server, scheduler, dag-processor, triggerer on loopback, as
``scripts/airflow_stack.py`` runs them) and the real kube-apiserver: ``kubectl apply`` of a VMMigration and what it
names, the watcher DAG ``vmmigration_kubernetes`` (its deferrable sensor in the triggerer) finds it and starts the
one run of its generation, and the VMMigration ends Ready in the cluster as ``kubectl get -w`` and ``kubectl
describe`` show it. Then the watcher is stopped in the middle of a round and started again: still exactly one run
per generation, started at once (not at the end of the next watch). And the trigger form (DAG vmmigration_request)
creates its VMMigration in the cluster, as its own identity of deploy/rbac/submitter.yaml, and runs it there.

The engine runs as its ServiceAccount of deploy/rbac/engine.yaml, through an Airflow kubernetes connection. One
Airflow serves the three tests (starting one costs 30-60 s)."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest
import yaml

from include.demo import create_source_vm, store_documents
from include.kube_sync import ClusterInventory, mirror_path, read_header, run_id_for, sync
from include.store import dag_id_for
from tests.e2e.helpers import assert_target_matches_source, form_conf, launched, task_log, wait_run

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean_cluster")]
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from airflow_stack import AirflowStack, free_port, stack_env  # noqa: E402
from demo_kubernetes import (  # noqa: E402
    WATCHER_DAG,
    apply_documents,
    connection_env,
    describe,
    events,
    follow,
    get_migration,
    table_row,
)

SENSOR = "wait_for_vmmigrations[-1]"
FORM = "vmmigration_request"
#: longer than any wait below: a run that starts only when a watch round times out fails the test
WATCH_SECONDS = 900


@pytest.fixture(scope="module")
def kube_stack(kube_api, engine, submitter, tmp_path_factory):
    """A standalone Airflow told of the session's API server (a kubernetes connection to the engine's
    ServiceAccount, ``VMMIGRATION_KUBERNETES_CONN_ID``, and one to the trigger form's,
    ``VMMIGRATION_KUBERNETES_SUBMIT_CONN_ID``), with a spec store of its own, the watcher DAG unpaused."""
    root = tmp_path_factory.mktemp("quickstart")
    store = root / "store"
    store.mkdir()
    home, port = root / "airflow", free_port()
    # the form's connection carries its kubeconfig inline, as the README's Helm advice has it (a Secret's value)
    form_conn = {"conn_type": "kubernetes",
                 "extra": {"kube_config": yaml.safe_load(kube_api.kubeconfig(submitter).read_text())}}
    env = {**os.environ, "VMMIGRATION_STORE": str(store), "VMMIGRATION_STAGING": str(root / "staging"),
           "VMMIGRATION_KUBERNETES_WATCH_SECONDS": str(WATCH_SECONDS), **connection_env(kube_api.kubeconfig(engine)),
           "AIRFLOW_CONN_VMMIGRATION_K8S_FORM": json.dumps(form_conn),
           "VMMIGRATION_KUBERNETES_SUBMIT_CONN_ID": "vmmigration_k8s_form"}
    stack = AirflowStack(home=home, port=port, env=stack_env(home, port, env))
    try:
        stack.start()
        stack.wait_for_dag(WATCHER_DAG)
        stack.unpause(WATCHER_DAG)
    except Exception as err:  # noqa: BLE001 - the fixture fails the test with the reason
        stack.stop()
        pytest.fail(f"standalone Airflow did not start: {err}")
    yield stack, store
    stack.stop()


def _deferred_watcher(stack: AirflowStack, timeout: float = 120) -> str:
    """The watcher's running round, once its sensor waits in the triggerer (deferred); its run id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in stack.runs(WATCHER_DAG, "running"):
            if stack.task_states(WATCHER_DAG, run["dag_run_id"]).get(SENSOR) == "deferred":
                return run["dag_run_id"]
        time.sleep(0.5)
    raise AssertionError(f"no round of {WATCHER_DAG} deferred in {timeout:.0f}s: {stack.runs(WATCHER_DAG)[-3:]}")


def _wakes(stack: AirflowStack, runs: list[dict]) -> list[dict]:
    """What woke each of these watcher rounds: its sensor's event (its XCom)."""
    woke = []
    for run in runs:
        quoted = urllib.parse.quote(run["dag_run_id"], safe="")
        woke.append(stack.get(f"/api/v2/dags/{WATCHER_DAG}/dagRuns/{quoted}/taskInstances/wait_for_vmmigrations/"
                              f"xcomEntries/return_value?deserialize=true")["value"])
    return woke


def _runs(stack: AirflowStack, dag_id: str) -> list[tuple[str, str]]:
    return [(r["dag_run_id"], r["state"]) for r in stack.runs(dag_id)]


def _until_ready(stack: AirflowStack, kube_api, name: str, run_id: str) -> tuple[dict, list[dict]]:
    """Follow the VMMigration (as ``kubectl get -w``) until Ready or Failed and its run has ended; the object and
    the rows ``kubectl get -w`` would have printed."""
    dag_id = dag_id_for("default", name)

    def run_ended(_obj: dict) -> bool:
        return any(r == run_id and s in ("success", "failed") for r, s in _runs(stack, dag_id))

    rows: list[dict] = []
    final = follow(kube_api, "default", name, timeout=300, interval=0.5, out=lambda _line: None, until=run_ended,
                   rows=rows)
    return final, rows


def test_the_quick_start_runs_through_the_watcher_dag_to_ready(kube_stack, kube_api, world):
    stack, _store = kube_stack
    name = f"quickstart-{uuid.uuid4().hex[:6]}"
    dag_id = dag_id_for("default", name)
    create_source_vm(world)
    docs = store_documents(world, name=name, target_format="raw")
    _deferred_watcher(stack)
    rounds_before = len(stack.runs(WATCHER_DAG))
    apply_documents(kube_api, docs[1:])  # kubectl apply -f migration.yaml: the inventory, then the VMMigration
    uid = apply_documents(kube_api, docs[:1])[0]["metadata"]["uid"]
    run_id = run_id_for(uid, 1)

    final, rows = _until_ready(stack, kube_api, name, run_id)
    status = final.get("status") or {}
    assert (status.get("phase"), status.get("progress")) == ("Ready", 100), (status, rows)
    assert _runs(stack, dag_id) == [(run_id, "success")], "exactly one run, the generation's"
    phases = [r["Phase"] for r in rows]
    assert phases[-1] == "Ready" and {"Validating", "Transferring"} <= set(phases), rows
    assert [r["Progress"] for r in rows if r["Progress"] is not None] == sorted(
        r["Progress"] for r in rows if r["Progress"] is not None), "progress only goes up"
    # the guide's conditions, each with its transition time
    conditions = {c["type"]: c for c in status["conditions"]}
    for ctype in ("Validated", "Snapshotted", "Exported", "Transferred", "Imported", "Ready"):
        assert conditions[ctype]["status"] == "True" and conditions[ctype]["lastTransitionTime"], conditions
    assert status["startTime"] and status["completionTime"]
    row = table_row(kube_api, "default", name)  # kubectl get's printer columns
    assert (row["Phase"], str(row["Progress"])) == ("Ready", "100"), row
    reasons = [e["reason"] for e in events(kube_api, "default", name)]
    assert reasons[0] == "PhaseValidating" and reasons.count("Ready") == 1, reasons
    described = "\n".join(describe(kube_api, "default", name))
    assert "TargetValidated" in described and "vmmigration-engine" in described, described
    assert_target_matches_source(world, "raw")

    # the VMMigration's arrival woke the watcher, and its run's end once more (a round that starts nothing); its
    # status's progress, messages and phases in between did not (each would have cost a round of tasks)
    now = _deferred_watcher(stack)
    assert _runs(stack, dag_id) == [(run_id, "success")]
    rounds = [r for r in stack.runs(WATCHER_DAG)[rounds_before - 1:] if r["dag_run_id"] != now]
    woke = [(w.get("type"), (w.get("watched") or [None] * 4)[3]) for w in _wakes(stack, rounds)]
    assert woke in ([("ADDED", "")], [("ADDED", ""), ("MODIFIED", "Ready")]), woke


def test_a_watcher_stopped_between_mirror_and_start_still_starts_exactly_one_run(kube_stack, kube_api, engine,
                                                                                   world):
    """The scheduler stops, the watcher's round is marked failed (its sensor's trigger ends) and the triggerer
    restarts; meanwhile a VMMigration is applied and mirrored (as far as that round got: its mirror task, not its
    start_runs). Once the scheduler is back, the new round starts the generation's run at once, and only that
    one, through every round after."""
    stack, store = kube_stack
    name = f"restart-{uuid.uuid4().hex[:6]}"
    dag_id = dag_id_for("default", name)
    create_source_vm(world)
    docs = store_documents(world, name=name, target_format="raw")
    apply_documents(kube_api, docs[1:])
    watching = _deferred_watcher(stack)

    stack.stop_component("scheduler")
    stack.set_run_state(WATCHER_DAG, watching, "failed")
    stack.stop_component("triggerer")
    uid = apply_documents(kube_api, docs[:1])[0]["metadata"]["uid"]
    with kube_api.client(engine) as api:
        sync(ClusterInventory(api), store)
    assert read_header(mirror_path(store, "default", name)).uid == uid
    stack.start_component("triggerer")
    stack.start_component("scheduler")
    began = time.monotonic()

    run_id = run_id_for(uid, 1)
    final, rows = _until_ready(stack, kube_api, name, run_id)
    assert (final.get("status") or {}).get("phase") == "Ready", rows
    assert time.monotonic() - began < WATCH_SECONDS / 3, "started by a new round at once, not a watch's timeout"
    assert _runs(stack, dag_id) == [(run_id, "success")]
    _deferred_watcher(stack)  # rounds after: the run exists, nothing more is started
    assert _runs(stack, dag_id) == [(run_id, "success")]


def test_the_trigger_form_creates_the_vmmigration_in_the_cluster_and_runs_its_generation(kube_stack, kube_api,
                                                                                          world):
    """The form in a cluster: its VMMigration is created there (not in the store), the watcher mirrors it like any
    applied with kubectl, and the form's launcher runs, or attaches to, the one run of its generation."""
    stack, store = kube_stack
    name = f"form-{uuid.uuid4().hex[:6]}"
    dag_id = dag_id_for("default", name)
    create_source_vm(world)
    apply_documents(kube_api, store_documents(world, name=name, target_format="raw")[1:])  # the inventory
    form_run = stack.trigger(FORM, form_conf(world, name, f"{world.vm_name}-migrated"))
    assert wait_run(stack, FORM, form_run, 300) == "success", stack.task_states(FORM, form_run)

    made = get_migration(kube_api, "default", name)
    uid, status = made["metadata"]["uid"], made.get("status") or {}
    assert made["metadata"]["annotations"]["vmmigration.virtrigaud.io/submitted-via"].startswith("the trigger form")
    assert (status.get("phase"), status.get("progress")) == ("Ready", 100), status
    assert launched(stack, FORM, form_run) == (dag_id, run_id_for(uid, 1))
    assert _runs(stack, dag_id) == [(run_id_for(uid, 1), "success")], "exactly one run, the generation's"
    assert not (store / f"submitted--default.{name}.yaml").exists(), "created in the cluster, not in the store"
    assert_target_matches_source(world, "raw")

    # the same name again with another target: refused naming the field; the VMMigration is left as it was
    again = stack.trigger(FORM, form_conf(world, name, "elsewhere"))
    assert wait_run(stack, FORM, again, 120) == "failed"
    assert stack.task_states(FORM, again) == {"submit_migration[-1]": "failed", "run_migration[-1]": "upstream_failed"}
    log = task_log(stack, FORM, again, "submit_migration")
    assert f"metadata.name (form field migration_name): VMMigration default/{name} exists in the cluster" in log, log
    assert get_migration(kube_api, "default", name)["spec"]["targetName"] == f"{world.vm_name}-migrated"
    assert _runs(stack, dag_id) == [(run_id_for(uid, 1), "success")]
