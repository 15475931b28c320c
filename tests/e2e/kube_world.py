"""The Kubernetes side of the e2e tests: the engine's ServiceAccount (deploy/rbac/engine.yaml applied as it is)
on the session's API server, an Airflow kubernetes connection for it, and reading VMMigrations back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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


def _connect(monkeypatch, kube_api, identity: str) -> None:
    conn = {"conn_type": "kubernetes", "extra": {"kube_config_path": str(kube_api.kubeconfig(identity))}}
    monkeypatch.setenv("AIRFLOW_CONN_VMMIGRATION_K8S", json.dumps(conn))
    monkeypatch.setenv("VMMIGRATION_KUBERNETES_CONN_ID", "vmmigration_k8s")


def _in_cluster(kube_api, docs: list[dict]) -> None:
    migration = json.loads(json.dumps(docs[0]))
    migration.pop("status", None)
    kube_api.apply_yaml(migration)


def _get(kube_api, namespace: str, name: str) -> dict:
    return kube_api.request("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/vmmigrations/{name}")[1]


def _events(kube_api, namespace: str, name: str) -> list[dict]:
    items = kube_api.request("GET", f"/api/v1/namespaces/{namespace}/events")[1]["items"]
    return sorted((e for e in items if e["involvedObject"]["name"] == name), key=lambda e: e["metadata"]["name"])




@pytest.fixture
def clean_cluster(kube_api):
    """Each test's VMMigrations leave the session's API server with it (a watcher lists the whole cluster)."""
    yield
    path = f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations"
    for item in kube_api.request("GET", path)[1].get("items") or []:
        kube_api.request("DELETE", f"{path}/{item['metadata']['name']}")
