"""Running a generated migration DAG in-process, or a standalone Airflow for it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def running_airflow(home: Path, *, env: dict[str, str] | None = None,
                    ready: Callable[[Any], None] | None = None) -> Iterator[Any]:
    """A standalone Airflow (``scripts/airflow_stack.py``: api-server, scheduler, dag-processor, triggerer) on a
    free loopback port, with ``env`` over this process's environment; stopped after. ``ready(stack)`` runs once it
    answers (waiting for a DAG, unpausing one). A start that fails fails the test with the reason."""
    import pytest

    sys.path.insert(0, str(ROOT / "scripts"))
    from airflow_stack import AirflowStack, free_port, stack_env

    port = free_port()
    stack = AirflowStack(home=home, port=port, env=stack_env(home, port, {**os.environ, **(env or {})}))
    try:
        stack.start()
        if ready is not None:
            ready(stack)
    except Exception as err:  # noqa: BLE001 - the fixture fails the test with the reason
        stack.stop()
        pytest.fail(f"standalone Airflow did not start: {err}")
    try:
        yield stack
    finally:
        stack.stop()


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


def unknown_status_fields(status: dict) -> list[str]:
    """Fields of a real status document that the VMMigration CRD's status schema does not declare
    (the API server would silently drop them)."""
    import yaml

    crd = yaml.safe_load((ROOT / "deploy" / "crds" / "infra.virtrigaud.io_vmmigrations.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    missing: list[str] = []

    def walk(value, node, path):
        if isinstance(value, dict):
            props = node.get("properties")
            if props is None:
                return
            for key, sub in value.items():
                if key not in props:
                    missing.append(f"{path}.{key}")
                else:
                    walk(sub, props[key], f"{path}.{key}")
        elif isinstance(value, list) and "items" in node:
            for i, item in enumerate(value):
                walk(item, node["items"], f"{path}[{i}]")

    walk(status, schema, "status")
    return missing


def assert_target_matches_source(world, fmt: str = "raw", source_formats: dict[str, str] | None = None) -> None:
    """Every target volume of the demo VM holds its source disk's guest-visible content (qemu-img compare)."""
    from include import diskio

    formats = source_formats or {"vda": "qcow2", "vdb": "qcow2"}
    conn = world.conn()
    try:
        pool = conn.storagePoolLookupByName(world.target_pool)
        pool.refresh(0)
        for disk, src_fmt in formats.items():
            dst = pool.storageVolLookupByName(f"{world.vm_name}-migrated-{disk}.{fmt}").path()
            src = world.root / "pools" / "src" / f"{world.vm_name}-{disk}.{src_fmt}"
            assert diskio.compare(src, dst, src_fmt, fmt), f"{disk} differs from its source"
    finally:
        conn.close()


def form_conf(world, name: str, target: str) -> dict[str, Any]:
    """A valid conf of the trigger form (DAG vmmigration_request): the world's VM to its target Provider through
    its NFS-style share, raw disks in the target pool."""
    return {"migration_name": name, "source_vm": f"default/{world.vm_name}",
            "target_provider": f"default/{world.prefix}-kvm-target", "target_name": target,
            "target_disk_format": "raw", "target_storage_hint": world.target_pool, "storage_type": "nfs",
            "storage_path": str(world.share), "storage_endpoint": "nfs.local",
            "network_hints": [{"name": "eth0", "bridge": "virbr0"}], "cpu": 2, "memory_mb": 512,
            "max_attempts": 2, "backoff_duration": "5s", "max_backoff_duration": "10s"}


def launched(stack, form_dag: str, form_run_id: str) -> tuple[str, str]:
    """The migration DAG and run a launcher's run started (its run_migration task's XCom)."""
    import json
    import urllib.parse

    quoted = urllib.parse.quote(form_run_id, safe="")
    value = stack.get(f"/api/v2/dags/{form_dag}/dagRuns/{quoted}/taskInstances/run_migration/xcomEntries/"
                      f"return_value")["value"]
    value = json.loads(value) if isinstance(value, str) else value
    return value["dag_id"], value["run_id"]


def task_log(stack, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
    """A task instance's log through the REST API, as text."""
    import json
    import urllib.parse
    import urllib.request

    quoted = urllib.parse.quote(run_id, safe="")
    req = urllib.request.Request(
        f"{stack.url}/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}/logs/{try_number}",
        headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        content = json.loads(resp.read()).get("content")
    return "\n".join(json.dumps(c) if not isinstance(c, str) else c for c in content) \
        if isinstance(content, list) else str(content)


def wait_run(stack, dag_id: str, run_id: str, timeout: float) -> str:
    """The run's end state (success or failed), polled through the REST API."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = stack.run_state(dag_id, run_id)
        if state in ("success", "failed"):
            return state
        time.sleep(1)
    raise AssertionError(f"{dag_id} run {run_id} did not end in {timeout:.0f}s: {stack.task_states(dag_id, run_id)}")
