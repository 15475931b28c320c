"""A whole migration (``dag.test()`` on a real libvirtd) with its run state in an SQL database instead of
files beside the spec: the plan, the disk records, the run record, the ledger and the name claim live in
the ``vmmigration_run_state`` table (the status too), nothing of them is written to the store folder, and the
phases are the same code. (SQLite here; the same store takes a PostgreSQL URL, the database of a scale-out Airflow.)"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from include.demo import create_source_vm, store_documents, write_store
from include.runstate import RUN_STATE_ENV, SqlRunState
from include.store import FileStatusSink, SpecStore
from tests.e2e.helpers import assert_target_matches_source, run_migration, task_states

pytestmark = pytest.mark.e2e


def test_a_migration_keeps_its_run_state_in_sql(airflow_db, store, world, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'runstate.db'}"
    monkeypatch.setenv(RUN_STATE_ENV, url)
    create_source_vm(world, vdb_format="qcow2")
    write_store(store, "sqlstate.yaml", store_documents(world, name="sqlstate", target_format="qcow2"))

    dagrun = run_migration("vmmigration__default__sqlstate")

    assert str(dagrun.state) == "success", task_states(dagrun)
    status = FileStatusSink(SpecStore(store)).get("default", "sqlstate")
    assert status["phase"] == "Ready"
    assert_target_matches_source(world, fmt="qcow2")

    # every run-state document, the status too, is in the table; none in the folder
    state_dir = store / "status" / "default" / "sqlstate"
    files = {p.relative_to(state_dir).as_posix() for p in state_dir.rglob("*") if p.is_file()}
    assert {f for f in files if not f.startswith(".")} == set(), files
    assert not (store / "claims").exists()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = {(r.scope, r.doc): json.loads(r.data)
                for r in conn.execute(sa.text(f"SELECT scope, doc, data FROM {SqlRunState.TABLE}"))}
    mine = {doc for scope, doc in rows if scope == "default/sqlstate"}
    assert {"plan", "run", "ledger", "disks/vda", "disks/vdb", "status"} <= mine
    assert rows[("default/sqlstate", "status")] == status
    plan = rows[("default/sqlstate", "plan")]
    assert [d["name"] for d in plan["disks"]] == ["vda", "vdb"]
    run = rows[("default/sqlstate", "run")]
    assert run["targetValidated"] == rows[("default/sqlstate", "ledger")]["run"]
    assert run["targetVm"]["name"] == f"{world.vm_name}-migrated"
    # the claim was released at the end; what the run created on the target is handed over, not owned
    assert not [doc for scope, doc in rows if scope == "claim"]
    live = [e for e in rows[("default/sqlstate", "ledger")]["entries"] if e["state"] != "deleted"]
    assert live == []
