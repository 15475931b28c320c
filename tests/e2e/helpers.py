"""Running a generated migration DAG in-process."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "vmmigrations.py"))
    assert not bag.import_errors, bag.import_errors
    assert dag_id in bag.dags, f"{dag_id} not generated; DAGs: {sorted(bag.dags)}"
    return bag.dags[dag_id]


def run_migration(dag_id: str):
    """``dag.test()`` of the generated DAG; returns the finished DagRun."""
    return load_dag(dag_id).test()


def task_states(dagrun) -> dict[str, str]:
    return {f"{ti.task_id}[{ti.map_index}]": str(ti.state) for ti in dagrun.get_task_instances()}
