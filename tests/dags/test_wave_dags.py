"""dags/vmmigration_waves.py: one DAG per MigrationWavePlan, shaped by its waves; a bad plan gets a DAG that fails
naming its fields; a store of a thousand VMMigrations is not parsed by it."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from include.demo import DemoWorld, store_documents

ROOT = Path(__file__).resolve().parents[2]


def _bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags" / "vmmigration_waves.py"))


def _copy_examples(store: Path) -> None:
    for path in (ROOT / "examples" / "waves").glob("*.yaml"):
        (store / path.name).write_text(path.read_text())


def test_one_dag_per_plan_shaped_by_its_waves(store):
    _copy_examples(store)
    bag = _bag()
    assert bag.import_errors == {}
    assert set(bag.dags) == {"vmwave__default__dc1-exit", "vmwave__default__weekly-batch"}
    dag = bag.dags["vmwave__default__dc1-exit"]
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert "wave-plan" in dag.tags and "vmmigration" in dag.tags
    # a one-off at the first window's start: that minute's cron, the DAG ending then
    assert dag.timetable.expression == "0 22 12 12 *" and dag.end_date.isoformat() == "2026-12-12T22:00:00+00:00"
    assert {t.task_id for t in dag.tasks} == {f"{w}.{t}" for w in ("pilot", "apps", "databases")
                                              for t in ("window", "prepare", "migrate", "summary")} | {"plan_summary"}
    limits = {w: dag.get_task(f"{w}.migrate").max_active_tis_per_dagrun for w in ("pilot", "apps", "databases")}
    assert limits == {"pilot": 2, "apps": 3, "databases": 1}
    for wave in ("pilot", "apps", "databases"):
        assert dag.get_task(f"{wave}.migrate").pool == "default_pool"
        assert dag.get_task(f"{wave}.summary").trigger_rule == "all_done"
        assert dag.get_task(f"{wave}.summary").upstream_task_ids == {f"{wave}.prepare", f"{wave}.migrate"}
        assert dag.get_task(f"{wave}.window").mode == "reschedule"
    # the waves run in order: each window waits for the summary before it
    assert dag.get_task("apps.window").upstream_task_ids == {"pilot.summary"}
    assert dag.get_task("databases.window").upstream_task_ids == {"apps.summary"}
    assert dag.get_task("plan_summary").upstream_task_ids == {"pilot.summary", "apps.summary", "databases.summary"}
    from airflow.serialization.serialized_objects import DagSerialization

    for each in bag.dags.values():  # what the dag-processor stores must load back (schedules included)
        assert DagSerialization.from_dict(DagSerialization.to_dict(each)).dag_id == each.dag_id
    cron = bag.dags["vmwave__default__weekly-batch"]
    assert cron.timetable.expression == "0 22 * * 6"


def test_a_bad_plan_gets_a_dag_that_fails_naming_its_fields(store, airflow_db):
    _copy_examples(store)
    doc = yaml.safe_load((store / "dc1-exit.yaml").read_text())
    doc["metadata"]["name"] = "broken"
    doc["spec"]["waves"][1]["limits"]["maxConcurent"] = 3
    (store / "broken.yaml").write_text(yaml.safe_dump(doc))
    bag = _bag()
    assert bag.import_errors == {}
    broken = bag.dags["vmwave__default__broken"]
    assert [t.task_id for t in broken.tasks] == ["validate_plan"]
    assert "spec.waves[1].limits.maxConcurent: unknown field (did you mean 'maxConcurrent'?)" in broken.doc_md
    result = broken.test()
    assert result.state == "failed"
    assert "vmwave__default__dc1-exit" in bag.dags  # the good plans keep their DAGs


def test_a_thousand_vmmigrations_do_not_slow_the_wave_file(store):
    world = DemoWorld(uri="qemu:///system", prefix="parse", root=store.parent)
    for i in range(1000):
        (store / f"vm-{i:04d}.yaml").write_text(yaml.safe_dump_all(store_documents(world, name=f"vm-{i:04d}"),
                                                                     sort_keys=False))
    _copy_examples(store)
    started = time.monotonic()
    bag = _bag()
    elapsed = time.monotonic() - started
    assert bag.import_errors == {} and len(bag.dags) == 2
    assert elapsed < 5, f"parsing the wave file took {elapsed:.1f}s with 1000 VMMigrations in the store"
