"""Each phase runs on its own with ``airflow tasks test``, taking its inputs from the earlier phases
through the spec store (plan and per-disk records), as a user testing one step locally would.

``airflow tasks test`` exits 0 even when the task fails (../shared/ENVIRONMENT.md), so every call
is judged by the task state it logs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from include.demo import create_source_vm, store_documents, write_store
from include.store import FileStatusSink, SpecStore
from tests.e2e.helpers import assert_target_matches_source

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "vmmigration__default__steps"


def tasks_test(task_id: str, map_index: int | None = None, *, dag_id: str = DAG_ID) -> str:
    cmd = [str(Path(sys.executable).parent / "airflow"), "tasks", "test", dag_id, task_id]
    if map_index is not None:
        cmd += ["--map-index", str(map_index)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    states = re.findall(r"new_state=(\w+)", out)
    assert states and states[-1] == "success", f"{task_id}[{map_index}] ended {states[-1:]}:\n{out[-4000:]}"
    return out


def test_every_phase_with_airflow_tasks_test(airflow_db, store, world):
    create_source_vm(world)
    write_store(store, "steps.yaml", store_documents(world, name="steps", target_format="raw"))
    sink = FileStatusSink(SpecStore(store))

    out = tasks_test("validate_migration")
    assert "plan:" in out and "vda" in out
    assert sink.get("default", "steps")["phase"] == "Validating"
    tasks_test("snapshot_vm")
    for index, disk in enumerate(("vda", "vdb")):
        for task_id in ("disk.export_disk", "disk.transfer_disk", "disk.convert_disk", "disk.import_disk"):
            tasks_test(task_id, index)
        entry = next(d for d in sink.get("default", "steps")["disks"] if d["name"] == disk)
        assert entry["phase"] == "Imported"
    tasks_test("create_vm")
    tasks_test("validate_target")
    tasks_test("finalize_migration")

    status = sink.get("default", "steps")
    assert status["phase"] == "Ready" and status["progress"] == 100
    assert_target_matches_source(world, "raw")


def test_a_failing_task_is_reported_failed(airflow_db, store, world):
    """A mapped phase run before Validating fails (no plan), and the state says so although rc is 0."""
    create_source_vm(world)
    write_store(store, "steps.yaml", store_documents(world, name="steps"))
    with pytest.raises(AssertionError, match="ended \\['failed'\\]"):
        tasks_test("create_vm")
