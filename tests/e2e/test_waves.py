"""Migration waves on a real standalone Airflow (parallelism 12, so the wave's limit, not the executor, is what
holds) and a real libvirtd: six tiny VMs with distinct content under maxConcurrent 2, a plan whose first wave fails
with onFailure stop, and a re-run that skips what is Ready."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from include import diskio, waves
from include.demo import MiB, _write_pattern, ensure_world_pools, store_documents, write_store
from include.diskio import qemu_img_path
from include.store import FileStatusSink, SpecStore
from tests.e2e.helpers import running_airflow

pytestmark = pytest.mark.e2e

VMS = [f"vm{i}" for i in range(6)]


@pytest.fixture
def stack(tmp_path, store):
    # parallelism above the wave's limit: the limit, not the executor, is what holds
    with running_airflow(tmp_path / "airflow", env={"AIRFLOW__CORE__PARALLELISM": "12"}) as stack:
        yield stack


def _tiny_vms(world, names: list[str]) -> dict[str, Path]:
    """A shut-off VM per name (``<prefix>-<name>``) with one 16 MiB qcow2 disk of its own random content."""
    conn = world.conn()
    try:
        pool, folder = ensure_world_pools(conn, world)
        disks = {}
        for seed, name in enumerate(names, start=100):
            vm = f"{world.prefix}-{name}"
            raw, disk = folder / f".{vm}.raw", folder / f"{vm}-vda.qcow2"
            _write_pattern(raw, 16 * MiB, [(0, 2 * MiB), (9 * MiB, MiB)], seed=seed)
            subprocess.run([qemu_img_path(), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True)
            raw.unlink()
            os.chmod(disk, 0o644)
            conn.defineXML(
                f"<domain type='kvm'><name>{vm}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
                f"<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
                f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>"
                f"<target dev='vda' bus='virtio'/></disk></devices></domain>")
            disks[name] = disk
        pool.refresh(0)
        return disks
    finally:
        conn.close()


def _inventory(world, names: list[str]) -> list[dict]:
    docs = store_documents(world, name="unused")
    vm_doc = docs[1]
    out = []
    for name in names:
        vm = json.loads(json.dumps(vm_doc))
        vm["metadata"]["name"] = vm["status"]["id"] = f"{world.prefix}-{name}"
        out.append(vm)
    return out + docs[2:]  # the two Providers and the Secret


def _plan(world, plan: str, waves_: list[dict]) -> dict:
    spec = store_documents(world, name="unused", target_format="raw")[0]["spec"]
    template = {k: v for k, v in spec.items() if k not in ("sourceName", "targetName")}
    template["targetResourceHints"] = {"cpu": 1, "memory": 128}
    return {"apiVersion": waves.API_VERSION, "kind": waves.KIND, "metadata": {"name": plan, "namespace": "default"},
            "spec": {"template": template, "waves": waves_}}


def _vm(world, name: str, **overrides) -> dict:
    return {"name": f"{world.prefix}-{name}",
            "overrides": {"targetName": f"{world.prefix}-{name}-migrated", **overrides}}


def _window() -> dict:
    start = datetime.now(UTC) - timedelta(minutes=1)
    return {"start": start.strftime("%Y-%m-%dT%H:%M:%SZ"), "end": "1h"}


def _wait_run(stack, dag_id: str, run_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = stack.run_state(dag_id, run_id)
        if state in ("success", "failed"):
            return state
        time.sleep(2)
    raise AssertionError(f"{dag_id} {run_id} still {state} after {timeout:.0f}s: {stack.task_states(dag_id, run_id)}")


def _first_run(stack, dag_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = stack.runs(dag_id)
        if runs:
            assert len(runs) == 1 and runs[0]["run_type"] == "scheduled", runs
            return runs[0]["dag_run_id"]
        time.sleep(1)
    raise AssertionError(f"the scheduler started no run of {dag_id} in {timeout:.0f}s")


def _intervals(stack, dag_id: str) -> list[tuple[datetime, datetime]]:
    """Each run of a migration DAG as [first task start, last task end], from its task instances (REST API)."""
    out = []
    for run in stack.runs(dag_id):
        quoted = urllib.parse.quote(run["dag_run_id"], safe="")
        tis = stack.get(f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances?limit=100")["task_instances"]
        starts = [datetime.fromisoformat(t["start_date"]) for t in tis if t.get("start_date")]
        ends = [datetime.fromisoformat(t["end_date"]) for t in tis if t.get("end_date")]
        if starts:
            out.append((min(starts), max(ends)))
    return out


def _xcom(stack, dag_id: str, run_id: str, task_id: str, key: str = "return_value"):
    quoted = urllib.parse.quote(run_id, safe="")
    entry = stack.get(f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}/xcomEntries/{key}")
    value = entry["value"]
    return json.loads(value) if isinstance(value, str) else value


def _max_overlap(intervals) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    best = now = 0
    for _, delta in events:
        now += delta
        best = max(best, now)
    return best


def test_waves_on_a_real_airflow(stack, store, world):
    names = [*VMS, "bad", "later"]
    disks = _tiny_vms(world, names)
    write_store(store, "inventory.yaml", _inventory(world, names))
    limits = {"maxConcurrent": 2, "perTargetProvider": 2, "perStorage": 2}
    write_store(store, "plan-six.yaml", [_plan(world, "six", [
        {"name": "all", "vms": [_vm(world, n) for n in VMS], "window": _window(), "limits": limits}])])
    write_store(store, "plan-stop.yaml", [_plan(world, "stop", [
        {"name": "first", "vms": [_vm(world, "bad", targetStorageHint=f"{world.prefix}-no-such-pool")],
         "window": _window(), "onFailure": "stop"},
        {"name": "second", "vms": [_vm(world, "later")], "window": _window()}])])
    six, stop = "vmwave__default__six", "vmwave__default__stop"
    stack.wait_for_dag(six)
    stack.wait_for_dag(stop)
    # each plan's schedule is a one-off at its first window's start, a minute ago: the scheduler starts it
    run_six, run_stop = _first_run(stack, six), _first_run(stack, stop)

    assert _wait_run(stack, stop, run_stop, 200) == "failed"
    states = stack.task_states(stop, run_stop)
    assert states["first.migrate[0]"] == "failed" and states["first.summary[-1]"] == "success", states
    assert states["second.window[-1]"] == "failed", states
    assert states["second.prepare[-1]"] == "upstream_failed" and states["second.migrate[-1]"] == "upstream_failed"
    later = f"vmmigration__default__stop-{world.prefix}-later"
    assert stack.runs(later) == []  # the second wave's migration never started (not even submitted)
    assert not (store / f"submitted--default.stop-{world.prefix}-later.yaml").exists()
    first = _xcom(stack, stop, run_stop, "first.summary")
    assert (first["failed"], first["done"]) == (1, 0) and "no-such-pool" in first["vms"][0]["reason"], first
    second = _xcom(stack, stop, run_stop, "second.summary")
    assert second["started"] is False and "onFailure is stop" in second["reason"], second

    assert _wait_run(stack, six, run_six, 280) == "success", stack.task_states(six, run_six)
    sink = FileStatusSink(SpecStore(store))
    intervals = []
    for name in VMS:
        migration = f"six-{world.prefix}-{name}"
        assert (sink.get("default", migration) or {}).get("phase") == "Ready", migration
        runs = stack.runs(f"vmmigration__default__{migration}")
        assert [r["state"] for r in runs] == ["success"], runs
        intervals += _intervals(stack, f"vmmigration__default__{migration}")
    assert len(intervals) == 6
    assert _max_overlap(intervals) == 2, intervals  # the limit was reached and never passed
    conn = world.conn()
    try:
        pool = conn.storagePoolLookupByName(world.target_pool)
        pool.refresh(0)
        for name in VMS:
            dst = pool.storageVolLookupByName(f"{world.prefix}-{name}-migrated-vda.raw").path()
            assert diskio.compare(disks[name], dst, "qcow2", "raw"), f"{name}: target differs from its source"
        # distinct content: no two targets are the same disk
        assert not diskio.compare(disks[VMS[0]], pool.storageVolLookupByName(
            f"{world.prefix}-{VMS[1]}-migrated-vda.raw").path(), "qcow2", "raw")
    finally:
        conn.close()
    summary = _xcom(stack, six, run_six, "all.summary")
    assert (summary["done"], summary["failed"], summary["skipped"]) == (6, 0, 0), summary
    assert summary["bytesMoved"] >= 0 and summary["seconds"] > 0

    # a re-run skips the Ready VMs: no new migration run
    rerun = stack.trigger(six)
    assert _wait_run(stack, six, rerun, 120) == "success", stack.task_states(six, rerun)
    again = _xcom(stack, six, rerun, "all.summary")
    assert (again["done"], again["skipped"]) == (0, 6) and {v["reason"] for v in again["vms"]} == {"already Ready"}
    assert stack.task_states(six, rerun)["all.migrate[-1]"] == "skipped"
    for name in VMS:
        assert len(stack.runs(f"vmmigration__default__six-{world.prefix}-{name}")) == 1
    assert yaml.safe_load((store / "plan-six.yaml").read_text())["metadata"]["name"] == "six"
