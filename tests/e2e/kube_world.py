"""The Kubernetes side of the e2e tests: the engine's ServiceAccount (deploy/rbac/engine.yaml applied as it is)
on the session's API server, an Airflow kubernetes connection for it, and reading VMMigrations back."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from demo_kubernetes import events  # noqa: E402  (oldest first, as kubectl describe lists them)

GROUP, VERSION = "infra.virtrigaud.io", "v1beta1"
ENGINE = "engine-sa"


@pytest.fixture(scope="session")
def engine(kube_api):
    """The engine's ServiceAccount (deploy/rbac/engine.yaml applied as it is) and a token for it."""
    kube_api.apply_yaml({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "vmmigration"}})
    kube_api.apply_yaml(ROOT / "deploy" / "rbac" / "engine.yaml")
    if ENGINE not in kube_api.identities:
        kube_api.add_service_account("vmmigration-engine", "vmmigration", identity=ENGINE)
    return ENGINE


SUBMITTER = "submitter-sa"


@pytest.fixture(scope="session")
def submitter(kube_api, engine):
    """The trigger form's ServiceAccount (deploy/rbac/submitter.yaml applied as it is) and a token for it."""
    kube_api.apply_yaml(ROOT / "deploy" / "rbac" / "submitter.yaml")
    if SUBMITTER not in kube_api.identities:
        kube_api.add_service_account("vmmigration-submitter", "vmmigration", identity=SUBMITTER)
    return SUBMITTER


def _connect(monkeypatch, kube_api, identity: str) -> None:
    conn = {"conn_type": "kubernetes", "extra": {"kube_config_path": str(kube_api.kubeconfig(identity))}}
    monkeypatch.setenv("AIRFLOW_CONN_VMMIGRATION_K8S", json.dumps(conn))
    monkeypatch.setenv("VMMIGRATION_KUBERNETES_CONN_ID", "vmmigration_k8s")


def _in_cluster(kube_api, docs: list[dict]) -> None:
    migration = json.loads(json.dumps(docs[0]))
    migration.pop("status", None)
    kube_api.apply_yaml(migration)


def apply_all(kube_api, docs: list[dict]) -> None:
    """The VMMigration and its inventory applied to the cluster; a VirtualMachine's status (its id, as a provider
    would have set it) patched in through its status subresource."""
    for doc in docs:
        doc = copy.deepcopy(doc)
        if doc["kind"] != "VirtualMachine":
            doc.pop("status", None)
        assert kube_api.apply_yaml(doc)
        if doc["kind"] == "VirtualMachine" and "status" in doc:
            kube_api.request("PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/{doc['metadata']['namespace']}/"
                             f"virtualmachines/{doc['metadata']['name']}/status", body={"status": doc["status"]},
                             headers={"Content-Type": "application/merge-patch+json"})


def apply_bare(kube_api, name: str, namespace: str = "default", target: str = "t") -> None:
    """A VMMigration that names nothing that exists (for the watcher's own tests: it is never run)."""
    kube_api.apply_yaml({"apiVersion": f"{GROUP}/{VERSION}", "kind": "VMMigration",
                         "metadata": {"name": name, "namespace": namespace},
                         "spec": {"sourceName": "vm", "targetProviderRef": {"name": "p"}, "targetName": target,
                                  "storage": {"type": "nfs", "path": "/share"}}})


def _get(kube_api, namespace: str, name: str) -> dict:
    return kube_api.request("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/vmmigrations/{name}")[1]


def _events(kube_api, namespace: str, name: str) -> list[dict]:
    return events(kube_api, namespace, name)




@pytest.fixture
def clean_cluster(kube_api):
    """Each test's VMMigrations leave the session's API server with it (a watcher lists the whole cluster)."""
    yield
    path = f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations"
    for item in kube_api.request("GET", path)[1].get("items") or []:
        kube_api.request("DELETE", f"{path}/{item['metadata']['name']}")
