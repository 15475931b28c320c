"""A VMMigration's life in the cluster while its run goes on, against the real kube-apiserver (read and written as
the engine's ServiceAccount of deploy/rbac/engine.yaml), each migration mirrored by include.kube_sync and run by
its generated DAG in-process (``dag.test()``): deleted mid-run (the run stops and rolls back what it created),
edited mid-run (the running run keeps its validated plan, the edit is reported and not run after Ready), the API
server restarted mid-run (no status lost, Ready), and bad input found in the cluster (Failed, naming it). A
background thread acts on the cluster once the run's own status file shows the phase wanted."""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from include.demo import create_source_vm, store_documents
from include.kube_sync import ClusterInventory, mirror_path, read_header, sync
from include.ledger import Ledger
from include.store import FileStatusSink, SpecStore
from tests.e2e.fault_tools import assert_source_intact, source_fingerprint, target_state, wait_status
from tests.e2e.helpers import assert_target_matches_source, run_migration, task_states
from tests.e2e.kube_world import GROUP, VERSION, _connect, _events, _get, apply_all

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean_cluster")]
MERGE = {"Content-Type": "application/merge-patch+json"}




def _path(name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}"


def _sync(kube_api, engine, store):
    with kube_api.client(engine) as api:
        return sync(ClusterInventory(api), store)


class _When:
    """Runs ``action`` in a thread once the migration's status file shows one of ``phases`` (what the run is
    doing then is recorded in ``seen``)."""

    def __init__(self, store: Path, name: str, phases: tuple[str, ...], action: Callable[[], Any]) -> None:
        self.seen: dict[str, Any] = {}
        self.error: BaseException | None = None

        def body() -> None:
            try:
                self.seen = wait_status(store, name, lambda s: s.get("phase") in phases + ("Ready", "Failed"),
                                        timeout=300, interval=0.02)
                if self.seen.get("phase") in phases:
                    self.seen["result"] = action()
            except BaseException as err:  # noqa: BLE001 - re-raised in the test by check()
                self.error = err

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def check(self) -> dict[str, Any]:
        self.thread.join(60)
        if self.error is not None:
            raise self.error
        return self.seen


def _snapshots(world) -> list[str]:
    conn = world.conn()
    try:
        return conn.lookupByName(world.vm_name).snapshotListNames(0)
    finally:
        conn.close()


def _mirrored_world(world, kube_api, engine, store, name: str, **kw: Any) -> list[dict]:
    create_source_vm(world)
    docs = store_documents(world, name=name, **kw)
    apply_all(kube_api, docs)
    assert name in [m.name for m in _sync(kube_api, engine, store).changed]
    return docs


def test_deleting_a_vmmigration_mid_run_stops_the_run_and_rolls_back(airflow_db, store, world, kube_api, engine,
                                                                    monkeypatch):
    name = f"del-{uuid.uuid4().hex[:6]}"
    _mirrored_world(world, kube_api, engine, store, name)
    before = source_fingerprint(world)
    _connect(monkeypatch, kube_api, engine)
    when = _When(store, name, ("Exporting", "Transferring"),
                 lambda: kube_api.request("DELETE", _path(name))[0])
    dagrun = run_migration(f"vmmigration__default__{name}")
    seen = when.check()
    assert seen.get("result") in (200, 202), f"the VMMigration was deleted mid-run: {seen}"
    states = task_states(dagrun)
    assert str(dagrun.state) == "failed", states
    assert states["validate_target[-1]"] != "success", states
    status = FileStatusSink(SpecStore(store)).get("default", name)
    assert status["phase"] == "Failed", status
    failed = [c for c in status["conditions"] if c["status"] == "False"]
    assert failed and failed[0]["reason"] == "Deleted" and "deleted from the cluster" in failed[0]["message"], failed
    # rolled back: no target VM, no volume in the target pool, nothing left on the share; the source untouched
    left = target_state(world, f"{world.vm_name}-migrated")
    assert not left["vm"] and not left["volumes"], left
    assert not [p for p in Path(world.share).rglob("*") if p.is_file()], "the intermediate files are removed"
    assert_source_intact(world, before)
    assert not _snapshots(world), "its snapshot goes too (deleteSnapshot): there is no next run to reuse it"
    left_in_ledger = [e for e in Ledger.of(SpecStore(store), "default", name).entries() if e.kind != "claim"]
    assert not left_in_ledger, left_in_ledger
    # the run has ended: the next sync removes the mirror (and with it the DAG)
    assert mirror_path(store, "default", name).name in _sync(kube_api, engine, store).removed


def test_a_vmmigration_deleted_and_made_again_mid_run_never_gets_the_old_runs_status(
        airflow_db, store, world, kube_api, engine, monkeypatch):
    """The old run's writes test its uid: the new VMMigration of the same name is refused them (422), the old
    run stops and rolls back, and the new one's status is never the old run's."""
    name = f"again-{uuid.uuid4().hex[:6]}"
    docs = _mirrored_world(world, kube_api, engine, store, name)
    _connect(monkeypatch, kube_api, engine)

    def again() -> Any:
        kube_api.request("DELETE", _path(name))
        migration = copy.deepcopy(docs[0])
        migration.pop("status", None)
        return kube_api.apply_yaml(migration)

    when = _When(store, name, ("Exporting", "Transferring"), again)
    dagrun = run_migration(f"vmmigration__default__{name}")
    assert when.check().get("result"), "deleted and made again mid-run"
    assert str(dagrun.state) == "failed", task_states(dagrun)
    local = FileStatusSink(SpecStore(store)).get("default", name)
    failed = [c for c in local["conditions"] if c["status"] == "False"]
    assert failed and failed[0]["reason"] == "Deleted", failed
    assert not _get(kube_api, "default", name).get("status"), "the new VMMigration got none of the old run's status"
    left = target_state(world, f"{world.vm_name}-migrated")
    assert not left["vm"] and not left["volumes"], left
    # the old run has ended: the new VMMigration is mirrored and wants its own run
    result = _sync(kube_api, engine, store)
    assert name in [m.name for m in result.changed]


def test_a_spec_edited_mid_run_leaves_the_run_on_its_plan_and_is_reported(airflow_db, store, world, kube_api,
                                                                         engine, monkeypatch):
    name = f"edit-{uuid.uuid4().hex[:6]}"
    _mirrored_world(world, kube_api, engine, store, name)
    mirror = mirror_path(store, "default", name)
    first = read_header(mirror)
    _connect(monkeypatch, kube_api, engine)

    def edit() -> Any:
        kube_api.request("PATCH", _path(name), body={"spec": {"targetName": "somewhere-else",
                                                              "targetResourceHints": {"cpu": 1, "memory": 256}}},
                         headers=MERGE)
        return _sync(kube_api, engine, store)

    when = _When(store, name, ("Exporting", "Transferring"), edit)
    dagrun = run_migration(f"vmmigration__default__{name}")
    during = when.check()["result"]
    assert str(dagrun.state) == "success", task_states(dagrun)
    assert [m.generation for m in during.deferred if m.name == name] == [2] and not during.changed, during
    assert [m.run_id for m in during.current if m.name == name] == [first.run_id], \
        "the run start_runs asks for is still the validated generation's"
    assert read_header(mirror) == first, "the mirror (and so the DAG) stayed on the validated generation"
    assert_target_matches_source(world)  # moved where generation 1 said, not to somewhere-else
    assert not target_state(world, "somewhere-else")["vm"]
    cluster = _get(kube_api, "default", name)
    assert cluster["status"]["phase"] == "Ready" and cluster["metadata"]["generation"] == 2
    # after Ready the edit is not run: a migration moves its VM once
    after = _sync(kube_api, engine, store)
    assert [m.generation for m in after.complete if m.name == name] == [2] and not after.changed
    assert name not in [m.name for m in after.wanted], "an ended run is never asked for again"
    assert read_header(mirror) == first and _sync(kube_api, engine, store).changed == ()
    reasons = [(e["reason"], e["type"]) for e in _events(kube_api, "default", name)]
    assert reasons.count(("SpecChangedDuringRun", "Warning")) == 1, reasons
    assert reasons.count(("SpecChangedAfterReady", "Normal")) == 1, reasons


def test_a_restart_of_the_api_server_mid_run_loses_no_status(airflow_db, store, world, kube_api, engine,
                                                            monkeypatch):
    name = f"rst-{uuid.uuid4().hex[:6]}"
    _mirrored_world(world, kube_api, engine, store, name)
    _connect(monkeypatch, kube_api, engine)
    when = _When(store, name, ("Exporting", "Transferring"), lambda: kube_api.restart_apiserver() or "restarted")
    dagrun = run_migration(f"vmmigration__default__{name}")
    assert when.check().get("result") is not None, "the API server was restarted mid-run"
    assert str(dagrun.state) == "success", task_states(dagrun)
    status = _get(kube_api, "default", name)["status"]
    local = FileStatusSink(SpecStore(store)).get("default", name)
    assert (status["phase"], status["progress"]) == ("Ready", 100), status
    assert status == local, "the cluster holds the whole final status"
    assert [e["reason"] for e in _events(kube_api, "default", name)].count("Ready") == 1
    assert_target_matches_source(world)


def _bad(world, name: str, case: str) -> list[dict]:
    docs = store_documents(world, name=name)
    if case == "unknown provider":
        docs[0]["spec"]["targetProviderRef"] = {"name": "no-such-provider"}
    elif case == "missing Secret":
        docs = [d for d in docs if d["kind"] != "Secret"]
    elif case == "missing grant":
        docs[0]["spec"]["targetProviderRef"] = {"name": docs[0]["spec"]["targetProviderRef"]["name"],
                                                "namespace": "vmmigration"}
        for doc in docs:
            if doc["kind"] == "Provider":
                doc["metadata"]["namespace"] = "vmmigration"
    return docs


@pytest.mark.parametrize("case, named", [("unknown provider", "no-such-provider"),
                                         ("missing Secret", "not found"),
                                         ("missing grant", "ReferenceGrant")])
def test_bad_input_found_in_the_cluster_ends_failed_naming_it(airflow_db, store, world, kube_api, engine,
                                                             monkeypatch, case, named):
    name = f"bad-{uuid.uuid4().hex[:6]}"
    docs = _bad(world, name, case)
    apply_all(kube_api, docs)
    _sync(kube_api, engine, store)
    mirrored = list(yaml.safe_load_all(mirror_path(store, "default", name).read_text()))
    assert "Secret" not in [d["kind"] for d in mirrored], "Secrets are read from the cluster, never mirrored"
    _connect(monkeypatch, kube_api, engine)
    dagrun = run_migration(f"vmmigration__default__{name}")
    assert str(dagrun.state) == "failed"
    status = _get(kube_api, "default", name)["status"]
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert status["phase"] == "Failed" and validated["status"] == "False", status
    assert named in validated["message"], validated
    assert "Traceback" not in validated["message"]
