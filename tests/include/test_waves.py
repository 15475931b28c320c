"""Wave plans: parsing with field-named errors, each VM's VMMigration, windows, summary maths, and leases that are
exact across real concurrent processes (file run state and SQL run state)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from include import waves
from include.runstate import FileRunState, SqlRunState
from include.spec import SpecValidationError
from include.store import SpecStore

ROOT = Path(__file__).resolve().parents[2]


def _plan(**wave) -> dict:
    base = {"name": "w1", "vms": [{"name": "web-01"}, {"name": "db-01", "overrides": {"targetDiskFormat": "raw"}}]}
    base.update(wave)
    return {"apiVersion": waves.API_VERSION, "kind": waves.KIND, "metadata": {"name": "exit", "namespace": "team-a"},
            "spec": {"template": {"targetProviderRef": {"name": "kvm-b"}, "targetDiskFormat": "qcow2",
                                  "storage": {"type": "nfs", "path": "/mnt/share"},
                                  "retryPolicy": {"maxAttempts": 2}},
                     "waves": [base]}}


def _errors(doc) -> list[str]:
    with pytest.raises(SpecValidationError) as err:
        waves.parse_plan(doc)
    return [str(e) for e in err.value.errors]


def test_examples_parse():
    for path in sorted((ROOT / "examples" / "waves").glob("*.yaml")):
        plan = waves.parse_plan(yaml.safe_load(path.read_text()))
        assert plan.waves and all(w.vms for w in plan.waves), path


def test_each_vm_gets_its_vmmigration_template_and_overrides_deep_merged():
    doc = _plan(vms=[{"name": "web-01"},
                     {"name": "db-01", "overrides": {"targetDiskFormat": "raw", "storage": {"endpoint": "nfs.local"},
                                                     "retryPolicy": {"backoffDuration": "10s"}}}])
    plan = waves.parse_plan(doc)
    wave = plan.waves[0]
    web, db = (plan.migration_document(wave, vm) for vm in wave.vms)
    assert web["metadata"] == {"name": "exit-web-01", "namespace": "team-a",
                               "labels": {waves.LABEL_PLAN: "exit", waves.LABEL_WAVE: "w1"}}
    assert web["spec"]["sourceName"] == "web-01" and web["spec"]["targetDiskFormat"] == "qcow2"
    assert db["spec"]["targetDiskFormat"] == "raw"
    assert db["spec"]["storage"] == {"type": "nfs", "path": "/mnt/share", "endpoint": "nfs.local"}
    assert db["spec"]["retryPolicy"] == {"maxAttempts": 2, "backoffDuration": "10s"}
    assert plan.template["storage"] == {"type": "nfs", "path": "/mnt/share"}  # the template is not changed
    assert wave.limits == waves.Limits(maxConcurrent=4) and wave.onFailure == "stop"
    assert plan.dag_id == "vmwave__team-a__exit"


def test_every_error_names_its_field():
    doc = _plan(limits={"maxConcurrent": 0, "perSource": 2, "perStorage": "two"}, onFailure="halt",
                window={"start": "tomorrow", "end": "soon"})
    doc["spec"]["waves"][0]["vms"].append({"name": "Web_01"})
    doc["spec"]["waves"][0]["vms"].append({"name": "web-01"})
    doc["spec"]["waves"][0]["vms"][1]["overrides"]["targetDiskFormat"] = "vhd"
    doc["spec"]["template"]["storage"]["type"] = "ftp"
    doc["spec"]["waves"].append({"name": "w1", "vms": []})
    errors = _errors(doc)
    expected = [
        "spec.waves[0].limits.perSource: unknown field (did you mean 'perStorage'?)",
        "spec.waves[0].onFailure: must be one of stop, continue, got 'halt'",
        "spec.waves[0].limits.maxConcurrent: must be between 1 and 1000, got 0",
        "spec.waves[0].limits.perStorage: must be an integer, got a string",
        "spec.waves[0].window.start: 'tomorrow' is not an RFC 3339 time such as 2026-12-05T22:00:00Z",
        "spec.waves[0].window.end: 'soon' is neither an RFC 3339 time nor a duration such as 4h",
        "spec.waves[0].vms[2].name: 'Web_01' is not a valid name (lowercase letters, digits, '-' and '.')",
        "spec.waves[0].vms[3].name: VM 'web-01' is also in spec.waves[0].vms[0]: a plan moves each VM once",
        "spec.waves[1].name: 'w1' is also the name of spec.waves[0]",
        "spec.waves[1].vms: required: a list of at least one VM",
    ]
    for line in expected:
        assert line in errors, (line, errors)
    assert any(e.startswith("spec.waves[0].vms[1].overrides.targetDiskFormat: ") for e in errors), errors
    assert any(e.startswith("spec.template.storage.type: ") for e in errors), errors


def test_document_level_errors():
    errors = _errors({"apiVersion": "v1", "kind": "WavePlan", "metadata": {"name": "Bad!"}, "spec": {"waves": "x"}})
    assert errors[:2] == ["apiVersion: must be vmmigration.virtrigaud.io/v1alpha1, got 'v1'",
                          "kind: must be MigrationWavePlan, got 'WavePlan'"]
    assert any(e.startswith("metadata.name: 'Bad!' is not a valid name") for e in errors)
    assert "spec.waves: must be a list, got a string" in errors
    doc = _plan(window={"schedule": "every night", "start": "2026-12-05T22:00:00Z"})
    errors = _errors(doc)
    assert "spec.waves[0].window.schedule: give either schedule (cron) or start (a time), not both" in errors
    assert "spec.waves[0].window.schedule: 'every night' is not a cron expression such as '0 22 * * 6'" in errors
    errors = _errors(_plan(window={"start": "2026-12-05T22:00:00Z", "end": "2026-12-05T21:00:00Z"}))
    assert errors == ["spec.waves[0].window.end: 2026-12-05T21:00:00+00:00 is not after start "
                      "2026-12-05T22:00:00+00:00"]
    errors = _errors(_plan(window={"start": "2026-12-05T22:00:00"}))
    assert errors == ["spec.waves[0].window.start: '2026-12-05T22:00:00' is not an RFC 3339 time such as "
                      "2026-12-05T22:00:00Z"]
    errors = _errors(_plan(window={"schedule": "0 22 * * 6", "end": "2026-12-06T04:00:00Z"}))
    assert errors == ["spec.waves[0].window.end: with a schedule, end is a duration after each opening (such as 4h)"]
    long_vm = "v" * 200
    errors = _errors(_plan(vms=[{"name": long_vm}]) | {"metadata": {"name": "p" * 60}})
    assert errors and errors[0].startswith("spec.waves[0].vms[0].name: the VMMigration name <plan>-<vm>:"), errors


def test_windows():
    start = datetime(2026, 12, 5, 22, tzinfo=UTC)
    fixed = waves.parse_plan(_plan(window={"start": "2026-12-05T22:00:00Z", "end": "4h"})).waves[0]
    assert waves.window_state(fixed, start - timedelta(minutes=1)) == {
        "open": False, "ended": False, "opens": "2026-12-05T22:00:00+00:00", "closes": "2026-12-06T02:00:00+00:00"}
    assert waves.window_state(fixed, start + timedelta(hours=1))["open"] is True
    assert waves.window_state(fixed, start + timedelta(hours=4))["ended"] is True
    until = waves.parse_plan(_plan(window={"start": "2026-12-05T23:00:00+01:00",
                                           "end": "2026-12-06T01:00:00Z"})).waves[0]
    assert waves.window_state(until, start)["open"] and waves.window_state(until, start)["closes"] == \
        "2026-12-06T01:00:00+00:00"
    cron = waves.parse_plan(_plan(window={"schedule": "0 22 * * 6", "end": "4h"})).waves[0]  # Saturdays 22:00
    saturday = datetime(2026, 12, 5, 23, 30, tzinfo=UTC)
    assert saturday.weekday() == 5
    assert waves.window_state(cron, saturday) == {"open": True, "ended": False, "opens": "2026-12-05T22:00:00+00:00",
                                                  "closes": "2026-12-06T02:00:00+00:00"}
    state = waves.window_state(cron, saturday + timedelta(hours=3))  # closed: waits for next Saturday
    assert state == {"open": False, "ended": False, "opens": "2026-12-12T22:00:00+00:00",
                     "closes": "2026-12-13T02:00:00+00:00"}
    assert waves.window_state(waves.parse_plan(_plan()).waves[0], saturday)["open"] is True


def test_summary_maths():
    rows = [waves.result_from("a", "p-a", "success", {"summary": {"bytesMoved": 3 * 1024 ** 2, "seconds": 3}}),
            waves.result_from("b", "p-b", "success", {"summary": {}}),  # missing keys count 0
            waves.result_from("c", "p-c", "failed", {"phase": "Failed", "message": "pool nope not found"}),
            waves.result_from("d", "p-d", "skipped", None),
            waves.result_from("e", "p-e", None, None, "already Ready")]
    summary = waves.summarize("w1", rows, 4.0)
    assert (summary["done"], summary["failed"], summary["skipped"]) == (2, 1, 2)
    assert summary["bytesMoved"] == 3 * 1024 ** 2 and summary["seconds"] == 4.0
    assert summary["rateBytesPerSecond"] == 3 * 1024 ** 2 / 4
    assert summary["vms"][0]["rateBytesPerSecond"] == 1024 ** 2
    assert [v["reason"] for v in summary["vms"][2:]] == ["pool nope not found",
                                                         "its window ended before it could start", "already Ready"]
    text = waves.table(summary)
    assert "3MiB" in text and "1MiB/s" in text and "wave w1: 2 done, 1 failed, 2 skipped; 3MiB in 4.0s" in text
    assert waves.summarize("w2", [], 0)["rateBytesPerSecond"] == 0.0
    assert waves.gate(summary, waves.Wave("w1", (), onFailure="stop")).startswith("wave w1 had 1 failed")
    assert waves.gate(summary, waves.Wave("w1", (), onFailure="continue")) is None
    assert waves.gate(waves.summarize("w1", [], 0, started=False), waves.Wave("w1", (), onFailure="continue")) == \
        "wave w1 before it did not run"


def test_plans_are_found_in_the_store_cheaply(store):
    (store / "plan.yaml").write_text(yaml.safe_dump(_plan()))
    bad = _plan()
    bad["metadata"]["name"] = "broken"
    bad["spec"]["waves"][0]["limits"] = {"maxConcurrent": -1}
    (store / "team-a").mkdir()
    (store / "team-a" / "broken.yaml").write_text(yaml.safe_dump(bad))
    (store / "other.yaml").write_text("kind: VMMigration\nmetadata: {name: x}\n")
    entries = waves.plan_entries(SpecStore(store))
    assert [(e.key, e.plan is not None) for e in entries] == [("team-a/broken", False), ("team-a/exit", True)]
    assert entries[0].errors == ["spec.waves[0].limits.maxConcurrent: must be between 1 and 1000, got -1"]
    assert waves.find_plan(SpecStore(store), "team-a", "exit").waves[0].name == "w1"


# -- leases, with real processes ---------------------------------------------------------------------------------
def _state(kind: str, root: Path):
    if kind == "files":
        return FileRunState(SpecStore(root))
    return SqlRunState(f"sqlite:///{root / 'runstate.db'}")


def _worker(kind: str, root: str, n: int, demands: dict, log: str, rounds: int) -> None:
    leases = waves.Leases(_state(kind, Path(root)), ttl=60)
    for r in range(rounds):
        held = leases.acquire(f"worker-{n}-{r}", demands, poll=0.01)
        start = time.time()
        time.sleep(0.3)
        end = time.time()
        leases.release(held)
        with open(log, "a") as fh:
            fh.write(json.dumps({"n": n, "start": start, "end": end, "resources": sorted(held.keys)}) + "\n")


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    best = now = 0
    for _, delta in events:
        now += delta
        best = max(best, now)
    return best


@pytest.mark.parametrize("kind", ["files", "sql"])
def test_leases_are_exact_across_processes(tmp_path, kind):
    """Eight processes, each needing a source, a target and a storage lease (limits 2, 3, 1 on the shared storage
    of half of them): at no instant more holders than a limit, and every process got its turns."""
    log = tmp_path / "log.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for n in range(8):
        demands = {"source:default/kvm-a": 2, f"target:default/kvm-{n % 2}": 3}
        if n % 2:
            demands["storage:nfs:::/share"] = 1
        procs.append(ctx.Process(target=_worker, args=(kind, str(tmp_path), n, demands, str(log), 3)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 24
    by_resource: dict[str, list] = {}
    for row in rows:
        for res in row["resources"]:
            by_resource.setdefault(res, []).append((row["start"], row["end"]))
    assert _max_overlap(by_resource["source:default/kvm-a"]) == 2  # reached, never passed
    assert _max_overlap(by_resource["target:default/kvm-0"]) <= 3
    assert _max_overlap(by_resource["storage:nfs:::/share"]) == 1
    leases = waves.Leases(_state(kind, tmp_path))
    assert leases.holders("source:default/kvm-a", 2) == []  # all released


def _hold_forever(kind: str, root: str, ready: str) -> None:
    leases = waves.Leases(_state(kind, Path(root)), ttl=2)
    leases.acquire("dead-holder", {"target:default/kvm-b": 1})
    Path(ready).write_text("held")
    time.sleep(600)


@pytest.mark.parametrize("kind", ["files", "sql"])
def test_a_dead_holders_lease_expires_and_nothing_else_takes_it(tmp_path, kind):
    ctx = multiprocessing.get_context("spawn")
    ready = tmp_path / "ready"
    proc = ctx.Process(target=_hold_forever, args=(kind, str(tmp_path), str(ready)))
    proc.start()
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and proc.is_alive()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    leases = waves.Leases(_state(kind, tmp_path), ttl=30)
    assert leases.try_acquire("me", {"target:default/kvm-b": 1}) is None  # not expired yet: still the limit
    assert [h["holder"] for h in leases.holders("target:default/kvm-b", 1)] == ["dead-holder"]
    held = leases.acquire("me", {"target:default/kvm-b": 1}, deadline=time.time() + 10, poll=0.1)
    assert held is not None  # taken over once its ttl passed
    assert leases.try_acquire("other", {"target:default/kvm-b": 1}) is None
    again = leases.try_acquire("me", {"target:default/kvm-b": 1})  # a retry of the same holder takes its own
    assert again is not None and again.keys == held.keys
    leases.release(held)  # the retry's token holds it now: the first try's release leaves it alone
    assert [h["holder"] for h in leases.holders("target:default/kvm-b", 1)] == ["me"]
    leases.release(again)
    assert leases.holders("target:default/kvm-b", 1) == []


def test_all_or_nothing(tmp_path):
    leases = waves.Leases(_state("files", tmp_path))
    first = leases.try_acquire("a", {"source:s": 1, "target:t": 5})
    assert first is not None
    assert leases.try_acquire("b", {"source:s": 1, "target:t": 5}) is None
    assert leases.holders("target:t", 5) == [dict(leases.holders("target:t", 5)[0])]  # b took no target slot
    assert leases.holders("target:t", 5)[0]["holder"] == "a"
    leases.release(first)
    assert leases.try_acquire("b", {"source:s": 1, "target:t": 5}) is not None
