"""VMMigrations found in the cluster (the real kube-apiserver, read as the engine's ServiceAccount of
deploy/rbac/engine.yaml) mirrored into the spec store: the migration and its inventory (VirtualMachine,
Providers, their Secrets) land in one 0600 file, the DAG factory makes its DAG, and a run of it ends Ready with
its status written back to the cluster; a resync of the same generation changes nothing, a new generation is
mirrored again with a new run id, a deleted VMMigration's mirror goes, and files the mirror did not write are
never touched."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

import pytest
import yaml

from include.demo import create_source_vm, store_documents
from include.kube_sync import ClusterInventory, mirror_path, read_header, run_id_for, sync
from tests.e2e.helpers import run_migration, task_states
from tests.e2e.kube_world import GROUP, VERSION, _connect, _get, apply_all, apply_bare

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean_cluster")]
ROOT = Path(__file__).resolve().parents[2]




def test_a_vmmigration_in_the_cluster_is_mirrored_and_runs_to_ready(airflow_db, store, world, kube_api, engine,
                                                                    monkeypatch):
    name = f"sync-{uuid.uuid4().hex[:6]}"
    create_source_vm(world)
    docs = store_documents(world, name=name)
    marker = uuid.uuid4().hex
    next(d for d in docs if d["kind"] == "Secret")["stringData"]["note"] = marker
    apply_all(kube_api, docs)
    (store / "mine.yaml").write_text("# a file of the operator's own: never touched\n")
    squatter = mirror_path(store, "default", f"other-{name}")
    squatter.write_text("# not a mirror, whatever its name says\n")
    with kube_api.client(engine) as api:
        result = sync(ClusterInventory(api), store)
    mine = next(m for m in result.changed if m.name == name)
    path = mirror_path(store, "default", name)
    assert read_header(path) == mine and stat.S_IMODE(path.stat().st_mode) == 0o600
    mirrored = list(yaml.safe_load_all(path.read_text()))
    kinds = sorted(d["kind"] for d in mirrored)
    assert kinds == ["Provider", "Provider", "VMMigration", "VirtualMachine"], kinds
    assert marker not in path.read_text(), "Secrets are never mirrored: each task reads them from the cluster"
    migration = mirrored[0]
    assert migration["metadata"]["annotations"]["vmmigration.virtrigaud.io/cluster-uid"] == mine.uid
    assert mine.run_id == run_id_for(mine.uid, 1) and mine.generation == 1
    _connect(monkeypatch, kube_api, engine)
    dagrun = run_migration(f"vmmigration__default__{name}")
    assert str(dagrun.state) == "success", task_states(dagrun)
    assert _get(kube_api, "default", name)["status"]["phase"] == "Ready"

    with kube_api.client(engine) as api:
        again = sync(ClusterInventory(api), store)
    assert name not in [m.name for m in again.changed], "the same generation is not mirrored again"
    kube_api.request("PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}",
                     body={"spec": {"targetResourceHints": {"cpu": 1, "memory": 256}}},
                     headers={"Content-Type": "application/merge-patch+json"})
    with kube_api.client(engine) as api:
        edited = sync(ClusterInventory(api), store)
    assert [m.generation for m in edited.complete if m.name == name] == [2] and read_header(path) == mine, \
        "a migration that ended Ready is not run again for an edit"
    kube_api.request("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}")
    with kube_api.client(engine) as api:
        gone = sync(ClusterInventory(api), store)
    assert path.name in gone.removed and not path.exists()
    assert (store / "mine.yaml").exists() and squatter.read_text().startswith("# not a mirror"), \
        "files the mirror did not write stay as they are"
    assert json.dumps([m.name for m in gone.current]).count(name) == 0


def test_the_watch_trigger_fires_on_a_change_and_times_out_without_one(kube_api, engine, monkeypatch):
    import threading

    from triggers.vmmigration_watch import VMMigrationWatchTrigger

    _connect(monkeypatch, kube_api, engine)
    with kube_api.client(engine) as api:
        _items, version = ClusterInventory(api).migrations()
    quiet = VMMigrationWatchTrigger("vmmigration_k8s", version, timeout=1).watch_once()
    assert quiet == {"changed": False, "resourceVersion": version}
    name = f"watch-{uuid.uuid4().hex[:6]}"
    got: dict = {}
    waiter = threading.Thread(target=lambda: got.update(
        VMMigrationWatchTrigger("vmmigration_k8s", version, timeout=30).watch_once()))
    waiter.start()
    apply_bare(kube_api, name)
    waiter.join(40)
    assert got.get("changed") and got.get("name") == f"default/{name}" and got.get("type") == "ADDED", got
    kube_api.request("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}")


def test_the_watcher_dag_parses_only_with_a_connection_and_its_sensor_sees_what_is_not_mirrored(
        kube_api, engine, monkeypatch, store):
    from pathlib import Path

    from airflow.dag_processing.dagbag import DagBag

    from sensors.vmmigration_sensor import VMMigrationSensor

    path = str(Path(__file__).resolve().parents[2] / "dags" / "vmmigration_kubernetes.py")
    monkeypatch.delenv("VMMIGRATION_KUBERNETES_CONN_ID", raising=False)
    assert DagBag(dag_folder=path).dags == {}, "no connection: no watcher"
    _connect(monkeypatch, kube_api, engine)
    bag = DagBag(dag_folder=path)
    assert not bag.import_errors and sorted(bag.dags["vmmigration_kubernetes"].task_ids) == [
        "mirror_vmmigrations", "start_runs", "wait_for_vmmigrations"]
    monkeypatch.setenv("VMMIGRATION_KUBERNETES_WATCHER_QUEUE", "beside-dag-processor")
    queued = DagBag(dag_folder=path).dags["vmmigration_kubernetes"]
    assert {t.queue for t in queued.tasks} == {"beside-dag-processor"}, "the watcher runs where the mirror is read"
    monkeypatch.delenv("VMMIGRATION_KUBERNETES_WATCHER_QUEUE")
    name = f"sense-{uuid.uuid4().hex[:6]}"
    apply_bare(kube_api, name)
    sensor = VMMigrationSensor(task_id="w", kubernetes_conn_id="vmmigration_k8s", store_path=str(store))
    assert f"default/{name}" in sensor.unmirrored()[0]
    with kube_api.client(engine) as api:
        sync(ClusterInventory(api), store)
    assert f"default/{name}" not in sensor.unmirrored()[0], "mirrored now: the sensor waits"
    kube_api.request("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}")


def test_the_watcher_dag_starts_one_run_per_generation(airflow_db, store, world, kube_api, engine, monkeypatch):
    """The watcher DAG (dag.test(), its sensor, mirror and start_runs tasks for real, in-process): a VMMigration
    whose new generation has no mirror yet wakes the sensor at once, is mirrored, and gets exactly the run its uid
    and generation name; a second round of the same generation starts nothing new (its run is skipped as
    existing). The migration's DAG must be known to Airflow first (as the dag-processor makes it known from the
    mirror): the first generation is mirrored before, as an earlier round would have."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    name = f"wd-{uuid.uuid4().hex[:6]}"
    create_source_vm(world)
    apply_all(kube_api, store_documents(world, name=name))
    with kube_api.client(engine) as api:
        first = next(m for m in sync(ClusterInventory(api), store).changed if m.name == name)
    kube_api.request("PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}",
                     body={"spec": {"targetResourceHints": {"cpu": 1, "memory": 256}}},
                     headers={"Content-Type": "application/merge-patch+json"})
    _connect(monkeypatch, kube_api, engine)
    monkeypatch.setenv("VMMIGRATION_KUBERNETES_WATCH_SECONDS", "3")  # the second round waits that long
    path = str(ROOT / "dags" / "vmmigration_kubernetes.py")
    watcher = DagBag(dag_folder=path).dags["vmmigration_kubernetes"]
    for _round in (1, 2):
        run = watcher.test()
        states = task_states(run)
        assert str(run.state) == "success", states
    dag_id = f"vmmigration__default__{name}"
    with create_session() as session:
        runs = sorted(r.run_id for r in session.query(DagRun).filter(DagRun.dag_id == dag_id))
    assert runs == [run_id_for(first.uid, 2)], runs
    assert read_header(mirror_path(store, "default", name)).generation == 2
    kube_api.request("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}")


def test_an_edit_waits_for_the_run_under_way_and_runs_after_a_failure(kube_api, engine, store):
    """A new generation while the mirrored one's run is in Transferring is deferred (the mirror stays, the sensor
    does not wake for it); once that run has Failed, it is mirrored and wants its run."""
    from include.store import SpecStore
    from sensors.vmmigration_sensor import VMMigrationSensor

    name = f"defer-{uuid.uuid4().hex[:6]}"
    apply_bare(kube_api, name)
    with kube_api.client(engine) as api:
        first = next(m for m in sync(ClusterInventory(api), store).changed if m.name == name)
    specs = SpecStore(store)
    status_path = specs.status_path("default", name)
    status_path.parent.mkdir(parents=True, exist_ok=True)
    specs.write_json(status_path, {"phase": "Transferring"})
    kube_api.request("PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}",
                     body={"spec": {"targetName": "t2"}}, headers={"Content-Type": "application/merge-patch+json"})
    with kube_api.client(engine) as api:
        during = sync(ClusterInventory(api), store)
    path = mirror_path(store, "default", name)
    assert [m.generation for m in during.deferred if m.name == name] == [2] and read_header(path) == first
    monkeypatch = pytest.MonkeyPatch()
    try:
        _connect(monkeypatch, kube_api, engine)
        sensor = VMMigrationSensor(task_id="w", kubernetes_conn_id="vmmigration_k8s", store_path=str(store))
        assert f"default/{name}" not in sensor.unmirrored()[0], "a deferred edit does not wake the sensor"
        specs.write_json(status_path, {"phase": "Failed"})
        assert f"default/{name}" in sensor.unmirrored()[0]
    finally:
        monkeypatch.undo()
    with kube_api.client(engine) as api:
        after = sync(ClusterInventory(api), store)
    assert [m.generation for m in after.changed if m.name == name] == [2] and read_header(path).generation == 2


def test_a_deleted_vmmigrations_mirror_stays_while_its_run_goes_on(kube_api, engine, store):
    """Deleting a VMMigration whose run is in Transferring keeps its mirror (its DAG must not vanish mid-run);
    once the run has ended (Failed here), the next sync removes it."""
    from include.store import SpecStore

    name = f"held-{uuid.uuid4().hex[:6]}"
    apply_bare(kube_api, name)
    with kube_api.client(engine) as api:
        sync(ClusterInventory(api), store)
    specs = SpecStore(store)
    status_path = specs.status_path("default", name)
    status_path.parent.mkdir(parents=True, exist_ok=True)
    specs.write_json(status_path, {"phase": "Transferring"})
    kube_api.request("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}")
    with kube_api.client(engine) as api:
        during = sync(ClusterInventory(api), store)
    path = mirror_path(store, "default", name)
    assert path.name in during.held and path.exists()
    specs.write_json(status_path, {"phase": "Failed"})
    with kube_api.client(engine) as api:
        after = sync(ClusterInventory(api), store)
    assert path.name in after.removed and not path.exists()


def _etcd(kube_api, path: str, body: dict) -> dict:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{kube_api.etcd_url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with opener.open(request, timeout=10) as answer:
        return json.loads(answer.read())


def test_a_watch_from_a_version_etcd_compacted_away_relists(kube_api, engine, monkeypatch, store):
    """410 Gone for real: etcd compacted past the watch's resourceVersion (etcd's own compaction API) and the API
    server restarted (its watch cache then starts after it). The trigger says relist; the next round's list and
    watch go on from a current version, and a mirror made from that list is right."""
    from triggers.vmmigration_watch import VMMigrationWatchTrigger

    _connect(monkeypatch, kube_api, engine)
    with kube_api.client(engine) as api:
        _items, old = ClusterInventory(api).migrations()
    name = f"gone-{uuid.uuid4().hex[:6]}"
    apply_bare(kube_api, name)
    revision = int(_etcd(kube_api, "/v3/kv/range", {"key": "AA=="})["header"]["revision"])
    assert revision > int(old)
    _etcd(kube_api, "/v3/kv/compaction", {"revision": str(revision), "physical": True})
    kube_api.restart_apiserver()
    event = VMMigrationWatchTrigger("vmmigration_k8s", old, timeout=5).watch_once()
    assert event.get("relist") is True and event.get("changed") is True, event
    with kube_api.client(engine) as api:
        result = sync(ClusterInventory(api), store)
    assert name in [m.name for m in result.changed]
    assert int(result.resource_version) >= revision
    fresh = VMMigrationWatchTrigger("vmmigration_k8s", result.resource_version, timeout=1).watch_once()
    assert fresh.get("changed") is False and not fresh.get("relist"), fresh
    kube_api.request("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}")


def test_two_watchers_syncing_at_once_agree_on_one_run_per_generation(kube_api, engine, store):
    """Two watchers' mirror tasks at the same moment, on one store: each mirror file is whole (written by rename),
    and both ask for the same run ids (uid and generation), so Airflow, which refuses a second run of an id,
    starts one run per generation however many watchers there are."""
    import threading

    names = [f"two-{uuid.uuid4().hex[:6]}" for _ in range(4)]
    for name in names:
        kube_api.apply_yaml({"apiVersion": f"{GROUP}/{VERSION}", "kind": "VMMigration",
                             "metadata": {"name": name, "namespace": "default"},
                             "spec": {"sourceName": "vm", "targetProviderRef": {"name": "p"}, "targetName": name,
                                      "storage": {"type": "nfs", "path": "/share"}}})
    results: list = []
    start = threading.Barrier(2)

    def watcher() -> None:
        with kube_api.client(engine) as api:
            inventory = ClusterInventory(api)
            start.wait()
            results.append(sync(inventory, store))

    threads = [threading.Thread(target=watcher) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2
    wanted = [sorted(m.run_id for m in r.current if m.name in names) for r in results]
    assert wanted[0] == wanted[1] and len(wanted[0]) == 4, wanted
    for name in names:
        path = mirror_path(store, "default", name)
        docs = list(yaml.safe_load_all(path.read_text()))
        assert read_header(path).run_id in wanted[0] and docs[0]["metadata"]["name"] == name
    assert not list(store.glob(".k8s-*.tmp")), "no temporary file left"
    for name in names:
        kube_api.request("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}")
