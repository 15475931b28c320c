"""The same migration through a real Airflow (API server, scheduler, dag-processor, triggerer on
loopback), triggered through its REST API, its status polled until Ready."""

from __future__ import annotations

import time

import pytest

from include.demo import create_source_vm, store_documents, write_store
from include.store import FileStatusSink, SpecStore
from tests.e2e.helpers import assert_target_matches_source, running_airflow

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(tmp_path, store):
    with running_airflow(tmp_path / "airflow") as stack:
        yield stack


def test_rest_triggered_migration_reaches_ready(stack, store, world):
    create_source_vm(world)
    write_store(store, "rest.yaml", store_documents(world, name="rest", target_format="raw"))
    dag_id = "vmmigration__default__rest"
    stack.wait_for_dag(dag_id)
    run_id = stack.trigger(dag_id)
    sink = FileStatusSink(SpecStore(store))
    seen = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = sink.get("default", "rest") or {}
        if status.get("phase") and (not seen or seen[-1] != status["phase"]):
            seen.append(status["phase"])
        if status.get("phase") in ("Ready", "Failed"):
            break
        time.sleep(0.5)
    states = stack.task_states(dag_id, run_id)
    assert status.get("phase") == "Ready", (status.get("message"), states)
    assert status["progress"] == 100
    for _ in range(60):
        if stack.run_state(dag_id, run_id) == "success":
            break
        time.sleep(1)
    assert stack.run_state(dag_id, run_id) == "success", states
    assert seen[-1] == "Ready" and len(seen) >= 2
    # one mapped instance per disk, labelled with the disk name by the UI
    assert {k for k in states if k.startswith("disk.import_disk")} == {"disk.import_disk[0]", "disk.import_disk[1]"}
    assert_target_matches_source(world, "raw")
