"""How long the dags folder takes to parse, and a task's start-up, as the spec store grows.

    .venv/bin/python -m bench.parse_bench [--counts 1,200,1000]

For each store size: the dag-processor's parse of the whole folder (every migration's DAG; the target
is under 2 s for 1,000 specs) and the parse a worker does before running one task of a validated
migration (only its own spec files; the target is the same time with 1,000 specs as with 1). Printed
with the ratio to the one-spec store. Wall-clock figures belong here, never in a unit test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]  # as Airflow puts plugins/ on the path


def _store(folder: Path, count: int) -> None:
    from include.demo import DemoWorld, store_documents

    world = DemoWorld(uri="qemu:///system", prefix="bench", root=folder.parent)
    for i in range(count):
        docs = store_documents(world, name=f"vm-{i:04d}", namespace="wave1" if i % 2 else "default")
        (folder / f"vm-{i:04d}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))


def _parse(dag_id: str | None) -> tuple[float, int]:
    """The dag-processor's parse of the folder; with ``dag_id``, a worker's parse of that DAG's file."""
    from airflow.dag_processing.dagbag import DagBag

    if dag_id:
        os.environ["_AIRFLOW_PARSING_CONTEXT_DAG_ID"] = dag_id
    else:
        os.environ.pop("_AIRFLOW_PARSING_CONTEXT_DAG_ID", None)
    started = time.perf_counter()
    bag = DagBag(dag_folder=str(ROOT / "dags" / "vmmigrations.py") if dag_id else str(ROOT / "dags"))
    return time.perf_counter() - started, len(bag.dags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,200,1000")
    args = parser.parse_args()
    from include.phases import MigrationContext
    from include.store import SpecStore

    rows = []
    for count in [int(c) for c in args.counts.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "store"
            folder.mkdir()
            os.environ["VMMIGRATION_STORE"] = str(folder)
            _store(folder, count)
            ctx = MigrationContext(namespace="default", name="vm-0000", store=SpecStore(folder))
            ctx.validating = True
            SpecStore(folder).save_plan("default", "vm-0000", {"specFiles": ctx.spec_files(), "disks": []})
            _parse(None)  # warm the imports: what is measured is the store, not Airflow's start
            full, dags = _parse(None)
            task, _ = _parse("vmmigration__default__vm-0000")
            started = time.perf_counter()
            later = MigrationContext(namespace="default", name="vm-0000", store=SpecStore(folder))
            _ = later.resolved
            phase = time.perf_counter() - started
            rows.append((count, dags, full, task, phase))
    base = rows[0]
    print(f"{'specs':>6} {'DAGs':>6} {'full parse s':>13} {'task parse s':>13} {'ratio':>6} {'phase ctx s':>12} "
          f"{'ratio':>6}")
    for count, dags, full, task, phase in rows:
        print(f"{count:>6} {dags:>6} {full:>13.3f} {task:>13.3f} {task / base[3]:>6.2f} {phase:>12.4f} "
              f"{phase / base[4]:>6.2f}")


if __name__ == "__main__":
    main()
