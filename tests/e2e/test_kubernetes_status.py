"""Status written back to the cluster, against the real kube-apiserver (tests/servers/kube_api.py): a migration
whose VMMigration is in the cluster gets its ``/status`` patched (phase, progress, conditions, times) and
Events for its phases, through an Airflow kubernetes connection (the cncf-kubernetes KubernetesHook), as the
engine's ServiceAccount with exactly the permissions of deploy/rbac/engine.yaml. A status write the cluster
refuses never fails the migration."""

from __future__ import annotations

import uuid

import pytest
from kubernetes.client.exceptions import ApiException

from include.demo import create_source_vm, store_documents, write_store
from include.store import FileStatusSink, SpecStore
from tests.e2e.helpers import run_migration, task_states
from tests.e2e.kube_world import GROUP, VERSION, _connect, _events, _get, _in_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean_cluster")]


def test_status_and_events_reach_the_vmmigration_in_the_cluster(airflow_db, store, world, kube_api, engine,
                                                               monkeypatch):
    name = f"k8s-{uuid.uuid4().hex[:6]}"
    create_source_vm(world)
    docs = store_documents(world, name=name)
    write_store(store, f"{name}.yaml", docs)
    _in_cluster(kube_api, docs)
    _connect(monkeypatch, kube_api, engine)
    dagrun = run_migration(f"vmmigration__default__{name}")
    assert str(dagrun.state) == "success", task_states(dagrun)
    status = _get(kube_api, "default", name)["status"]
    local = FileStatusSink(SpecStore(store)).get("default", name)
    assert (status["phase"], status["progress"]) == ("Ready", 100), status
    assert status == {k: v for k, v in local.items() if k in status}, "the cluster holds the status the run made"
    assert status["startTime"] and status["completionTime"]
    types = {c["type"]: c["status"] for c in status["conditions"]}
    for ctype in ("Validated", "Snapshotted", "Exported", "Transferred", "Imported", "Ready"):
        assert types.get(ctype) == "True", (ctype, types)
    assert all(c.get("lastTransitionTime") for c in status["conditions"])
    table = kube_api.request("GET", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}",
                             headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})[1]
    columns = [c["name"] for c in table["columnDefinitions"]]
    row = dict(zip(columns, table["rows"][0]["cells"], strict=True))
    assert (row["Phase"], str(row["Progress"])) == ("Ready", "100"), row
    reasons = [e["reason"] for e in _events(kube_api, "default", name)]
    assert "PhaseValidating" in reasons and "PhaseTransferring" in reasons and reasons.count("Ready") == 1, reasons
    assert all(e["type"] == "Normal" and e["source"]["component"] == "vmmigration-engine"
               for e in _events(kube_api, "default", name))


def test_a_failure_is_in_the_cluster_status_with_a_warning_event(airflow_db, store, world, kube_api, engine,
                                                               monkeypatch):
    name = f"k8s-bad-{uuid.uuid4().hex[:6]}"
    ensure = store_documents(world, name=name)
    ensure[0]["spec"]["sourceName"] = "no-such-vm"
    ensure[1]["metadata"]["name"] = "no-such-vm"
    ensure[1]["status"] = {"id": "no-such-vm"}
    write_store(store, f"{name}.yaml", ensure)
    _in_cluster(kube_api, ensure)
    _connect(monkeypatch, kube_api, engine)
    dagrun = run_migration(f"vmmigration__default__{name}")
    assert str(dagrun.state) == "failed"
    status = _get(kube_api, "default", name)["status"]
    assert status["phase"] == "Failed", status
    failed = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert failed["status"] == "False" and "no-such-vm" in failed["message"], failed
    warnings = [e for e in _events(kube_api, "default", name) if e["type"] == "Warning"]
    assert warnings and "no-such-vm" in warnings[-1]["message"], warnings


def test_a_status_write_the_cluster_refuses_never_fails_the_migration(airflow_db, store, world, kube_api,
                                                                     monkeypatch):
    """As ``viewer`` (no permission at all): every patch is refused (403), the migration still ends Ready, its
    status is in the run's files, and the cluster's VMMigration has no status."""
    name = f"k8s-ro-{uuid.uuid4().hex[:6]}"
    create_source_vm(world)
    docs = store_documents(world, name=name)
    write_store(store, f"{name}.yaml", docs)
    _in_cluster(kube_api, docs)
    _connect(monkeypatch, kube_api, "viewer")
    dagrun = run_migration(f"vmmigration__default__{name}")
    assert str(dagrun.state) == "success", task_states(dagrun)
    assert FileStatusSink(SpecStore(store)).get("default", name)["phase"] == "Ready"
    assert not _get(kube_api, "default", name).get("status"), "nothing was written as viewer"


def test_the_engine_identity_has_no_permission_beyond_its_role(kube_api, engine):
    """deploy/rbac/engine.yaml grants reading the inventory, patching status and creating Events; not deleting or
    editing a VMMigration's spec, not Secrets outside the namespaces bound, not Secrets cluster-wide."""
    base = f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations"
    assert kube_api.request("GET", base, identity=engine)[0] == 200
    kube_api.apply_yaml({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "unserved"}})
    for method, path in (("DELETE", f"{base}/anything"), ("POST", base), ("GET", "/api/v1/secrets"),
                         ("GET", "/api/v1/namespaces/unserved/secrets/x"),
                         ("LIST", "/api/v1/namespaces/default/secrets")):
        verb = "GET" if method == "LIST" else method
        with pytest.raises(ApiException) as err:
            kube_api.request(verb, path, identity=engine, body={} if verb == "POST" else None)
        assert err.value.status == 403, (method, path, err.value.status)
