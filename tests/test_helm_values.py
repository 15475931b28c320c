"""deploy/helm/values.yaml, the values for the official Apache Airflow Helm chart, checked statically.

The chart's own values.schema.json (650 kB) is not copied here: the keys these values use are held against a
hand-made subset of it (``CHART_SCHEMA``: the same key names and types as the chart's schema), and every value is
held against what the engine, the image and deploy/rbac/engine.yaml actually provide.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VALUES = ROOT / "deploy" / "helm" / "values.yaml"
ENGINE_RBAC = ROOT / "deploy" / "rbac" / "engine.yaml"

_ENV_LIST = {"type": "array", "items": {"type": "object", "required": ["name", "value"], "additionalProperties": False,
                                        "properties": {"name": {"type": "string"}, "value": {"type": "string"}}}}
_VOLUMES = {"type": "array", "items": {"type": "object", "required": ["name"]}}
_SERVICE_ACCOUNT = {"type": "object", "additionalProperties": False,
                    "properties": {"create": {"type": "boolean"}, "name": {"type": ["string", "null"]},
                                   "annotations": {"type": "object"},
                                   "automountServiceAccountToken": {"type": "boolean"}}}
#: the chart's top-level keys (its values.yaml), and the part of its values.schema.json these values use
CHART_KEYS = {
    "fullnameOverride", "nameOverride", "useStandardNaming", "revisionHistoryLimit", "uid", "gid", "securityContext",
    "securityContexts", "containerLifecycleHooks", "airflowHome", "defaultAirflowRepository", "defaultAirflowTag",
    "defaultAirflowDigest", "airflowVersion", "images", "imagePullSecrets", "registry", "labels", "ingress",
    "networkPolicies", "airflowPodAnnotations", "airflowConfigAnnotations", "airflowLocalSettings", "rbac",
    "executor", "allowPodLaunching", "env", "volumes", "volumeMounts", "secret", "enableBuiltInSecretEnvVars",
    "priorityClasses", "extraSecrets", "extraConfigMaps", "extraEnv", "extraEnvFrom", "data", "fernetKey",
    "fernetKeySecretName", "webserverSecretKey", "webserverSecretKeySecretName", "kerberos", "workers", "scheduler",
    "createUserJob", "migrateDatabaseJob", "apiServer", "webserver", "triggerer", "dagProcessor", "flower", "statsd",
    "pgbouncer", "redis", "elasticsearch", "opensearch", "ports", "quotas", "limits", "cleanup", "databaseCleanup",
    "postgresql", "config", "multiNamespaceMode", "podTemplate", "dags", "logs", "nodeSelector", "affinity",
    "tolerations", "topologySpreadConstraints", "schedulerName",
}
CHART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "executor": {"type": "string"},
        "defaultAirflowTag": {"type": "string"},
        "airflowVersion": {"type": "string"},
        "images": {"type": "object", "properties": {"airflow": {
            "type": "object", "additionalProperties": False,
            "properties": {"repository": {"type": ["string", "null"]}, "tag": {"type": ["string", "null"]},
                           "digest": {"type": ["string", "null"]},
                           "pullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]}}}}},
        "dags": {"type": "object", "properties": {
            "persistence": {"type": "object", "properties": {"enabled": {"type": "boolean"}}},
            "gitSync": {"type": "object", "properties": {"enabled": {"type": "boolean"}}}}},
        "postgresql": {"type": "object", "properties": {"enabled": {"type": "boolean"}}},
        "redis": {"type": "object", "properties": {"enabled": {"type": "boolean"}}},
        "config": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": {
            "type": ["boolean", "integer", "number", "string"]}}},
        "env": _ENV_LIST,
        "extraEnv": {"type": ["string", "null"]},
        "migrateDatabaseJob": {"type": "object", "properties": {
            "enabled": {"type": "boolean"}, "args": {"type": "array", "items": {"type": "string"}}}},
        "workers": {"type": "object", "properties": {
            "serviceAccount": _SERVICE_ACCOUNT, "extraVolumes": _VOLUMES, "extraVolumeMounts": _VOLUMES}},
        "apiServer": {"type": "object", "properties": {"extraVolumes": _VOLUMES, "extraVolumeMounts": _VOLUMES}},
        "dagProcessor": {"type": "object", "properties": {
            "enabled": {"type": ["boolean", "null"]}, "extraVolumes": _VOLUMES, "extraVolumeMounts": _VOLUMES}},
        "triggerer": {"type": "object", "properties": {"serviceAccount": _SERVICE_ACCOUNT}},
    },
}


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    data = yaml.safe_load(VALUES.read_text())
    assert isinstance(data, dict)
    return data


def _env(values: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in values["env"]}


def test_values_fit_the_chart(values):
    assert set(values) <= CHART_KEYS, f"not keys of the chart: {sorted(set(values) - CHART_KEYS)}"
    jsonschema.validate(values, CHART_SCHEMA)


def test_kubernetes_executor_on_our_image(values):
    assert values["executor"] == "KubernetesExecutor"
    pin = re.search(r"^apache-airflow==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    base = re.search(r"^FROM\s+apache/airflow:(\S+?)-python", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert values["images"]["airflow"]["tag"] == values["airflowVersion"] == values["defaultAirflowTag"] == pin == base
    assert values["images"]["airflow"]["repository"] != "apache/airflow", "the chart would run the plain image"
    assert values["redis"]["enabled"] is False, "the KubernetesExecutor needs no broker"


def test_code_is_in_the_image(values):
    assert values["dags"]["persistence"]["enabled"] is False and values["dags"]["gitSync"]["enabled"] is False
    dockerfile = (ROOT / "Dockerfile").read_text()
    for folder in ("dags", "plugins", "include"):
        assert re.search(rf"^COPY\s+(?:--\S+\s+)*{folder}\s+/opt/airflow/{folder}$", dockerfile, re.M), folder
    assert _env(values)["PYTHONPATH"] == "/opt/airflow"


def test_pools_are_imported_after_the_migration(values):
    job = values["migrateDatabaseJob"]
    script = " ".join(job["args"])
    assert job["enabled"] is True
    assert script.index("airflow db migrate") < script.index("airflow pools import /opt/airflow/config/pools.json")
    assert re.search(r"^COPY\s+(?:--\S+\s+)*config/pools.json\s+/opt/airflow/config/pools.json$",
                     (ROOT / "Dockerfile").read_text(), re.M), "the image does not carry the pools file"


def test_vmmigration_env_names_are_read_by_the_engine(values):
    """A misspelt variable would be ignored silently: every VMMIGRATION_* name must occur in the engine's code."""
    code = "\n".join(p.read_text() for folder in ("include", "plugins", "dags") for p in (ROOT / folder).rglob("*.py"))
    names = {n for n in _env(values) if n.startswith("VMMIGRATION_")}
    names |= set(re.findall(r"name: (VMMIGRATION_\w+)", values["extraEnv"]))
    assert {"VMMIGRATION_STORE", "VMMIGRATION_RUN_STATE", "VMMIGRATION_KUBERNETES_CONN_ID"} <= names
    for name in names:
        assert f'"{name}"' in code, f"{name} is read nowhere in include/, plugins/ or dags/"


def test_run_state_is_the_metadata_database(values):
    extra = yaml.safe_load(values["extraEnv"].replace("{{ .Release.Name }}", "release"))
    run_state = next(e for e in extra if e["name"] == "VMMIGRATION_RUN_STATE")
    # the chart's Secret <release>-metadata holds the metadata database's URL under "connection"
    assert run_state["valueFrom"]["secretKeyRef"] == {"name": "release-metadata", "key": "connection"}
    assert values["postgresql"]["enabled"] is True


def test_tasks_and_triggerer_run_as_the_engine_service_account(values):
    docs = [d for d in yaml.safe_load_all(ENGINE_RBAC.read_text()) if d]
    account = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]
    for component in ("workers", "triggerer"):
        assert values[component]["serviceAccount"] == {"create": False, "name": account["name"]}, component
    assert f"-n {account['namespace']}" in VALUES.read_text(), "the install command must use the engine's namespace"
    env = _env(values)
    conn_id = env["VMMIGRATION_KUBERNETES_CONN_ID"]
    conn = json.loads(env[f"AIRFLOW_CONN_{conn_id.upper()}"])
    assert conn == {"conn_type": "kubernetes", "extra": {"in_cluster": True}}


def test_volumes_are_where_the_engine_looks(values):
    env = _env(values)
    for component in ("workers", "dagProcessor", "apiServer"):
        names = {v["name"] for v in values[component]["extraVolumes"]}
        mounts = {m["mountPath"]: m["name"] for m in values[component]["extraVolumeMounts"]}
        assert set(mounts.values()) <= names, component
        assert mounts[env["VMMIGRATION_STORE"]] == "store", component
    mounts = {m["mountPath"]: m["name"] for m in values["workers"]["extraVolumeMounts"]}
    assert mounts[env["VMMIGRATION_ALLOWED_ROOTS"]] == "share"
    assert mounts[env["VMMIGRATION_STAGING"]] == "staging"
    # one staging claim for every task pod, named as one place in the ledger: a disk's tasks run in other pods
    staging = next(v for v in values["workers"]["extraVolumes"] if v["name"] == "staging")
    assert staging == {"name": "staging", "persistentVolumeClaim": {"claimName": "vmmigration-staging"}}
    assert env["VMMIGRATION_STAGING_SCOPE"]
    # the API server only reads the store (the Migrations page)
    assert all(m.get("readOnly") for m in values["apiServer"]["extraVolumeMounts"])
