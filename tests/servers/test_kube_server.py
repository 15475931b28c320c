"""The Kubernetes API server fixture (tests/servers/kube_api.py) against the real kube-apiserver 1.36 and etcd:
the project's CRDs are served as a cluster serves them (status subresource, schema and CEL validation, printer
columns), RBAC is enforced for the test identities, and data survives an API server restart."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from tests.servers.kube_api import CRD_DIR, KubeApiServer, ServerStartError, find_binaries, start_kube_api

GROUP, VERSION, PLURAL = "infra.virtrigaud.io", "v1beta1", "vmmigrations"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


def _crd(plural: str) -> dict[str, Any]:
    return yaml.safe_load((CRD_DIR / f"{GROUP}_{plural}.yaml").read_text().split("\n---\n", 1)[-1])


def _migration(name: str, **spec: Any) -> dict[str, Any]:
    """A valid VMMigration (S3 storage) with ``spec`` merged over it; a value of None drops that field."""
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VMMigration",
        "metadata": {"name": name},
        "spec": {
            "sourceName": "web-01",
            "targetProviderRef": {"name": "vsphere-prod"},
            "targetName": "web-01-migrated",
            "storage": {"type": "s3", "bucket": "vm-migrations", "credentialsSecretRef": {"name": "s3-creds"}},
        },
    }
    for key, value in spec.items():
        if value is None:
            body["spec"].pop(key, None)
        else:
            body["spec"][key] = value
    return body


def _eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """``check()``'s result once it stops raising ApiException 403 (RBAC changes reach the authorizer's cache
    through a watch, within milliseconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except ApiException as exc:
            if exc.status != 403 or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


@pytest.fixture
def namespace(kube_api: KubeApiServer) -> str:
    """A fresh namespace per test (namespaces are never deleted: no namespace controller runs)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube_api.apply_yaml({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


@pytest.fixture
def custom(kube_api: KubeApiServer):
    with kube_api.client() as api_client:
        yield k8s.CustomObjectsApi(api_client)


def test_server_version_and_crds_established(kube_api: KubeApiServer) -> None:
    expected = {yaml.safe_load(p.read_text().split("\n---\n", 1)[-1])["metadata"]["name"]
                for p in CRD_DIR.glob("*.yaml")}  # fmt: skip
    assert len(expected) == 4
    with kube_api.client() as api_client:
        assert k8s.VersionApi(api_client).get_code().git_version == "v1.36.3"
        crds = {c.metadata.name: c for c in k8s.ApiextensionsV1Api(api_client).list_custom_resource_definition().items}
    assert expected <= set(crds)
    for name in expected:
        conditions = {c.type: c.status for c in crds[name].status.conditions}
        assert conditions["Established"] == "True", (name, conditions)
        assert conditions["NamesAccepted"] == "True", (name, conditions)
    assert kube_api.startup_seconds is not None and kube_api.startup_seconds < 60
    assert kube_api.apiserver_log.stat().st_size > 0 and kube_api.etcd_log.exists()


def test_status_is_a_subresource(kube_api: KubeApiServer, namespace: str, custom: k8s.CustomObjectsApi) -> None:
    body = _migration("status-sub")
    body["status"] = {"phase": "Ready", "progress": 100}  # dropped: status is not written through the main resource
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    assert "status" not in created
    assert created["metadata"]["generation"] == 1
    assert created["spec"]["retryPolicy"]["maxAttempts"] == 3  # a schema default, filled in by the server

    patched = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "status-sub", {"status": {"phase": "Exporting", "progress": 40}}
    )
    assert patched["status"] == {"phase": "Exporting", "progress": 40}
    assert patched["metadata"]["generation"] == 1  # a status write is no spec change

    # a spec change through the main resource (merge patch and a full PUT) leaves status alone
    changed = custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "status-sub",
        {"spec": {"targetName": "web-01-renamed"}, "status": {"phase": "Failed", "progress": 0}},
    )  # fmt: skip
    assert changed["spec"]["targetName"] == "web-01-renamed"
    assert changed["status"] == {"phase": "Exporting", "progress": 40}
    assert changed["metadata"]["generation"] == 2
    changed["spec"]["sourceName"] = "web-02"
    changed["status"] = {"phase": "Ready", "progress": 100}
    replaced = custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "status-sub", changed)
    assert replaced["spec"]["sourceName"] == "web-02"
    assert replaced["status"] == {"phase": "Exporting", "progress": 40}

    # the status schema is enforced too
    with pytest.raises(ApiException) as bad:
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, "status-sub", {"status": {"phase": "Bogus", "progress": 101}}
        )
    assert bad.value.status == 422
    fields = {c["field"] for c in json.loads(bad.value.body)["details"]["causes"]}
    # (an enum failure also adds a cause with field "<nil>": "some validation rules were not checked")
    assert {"status.phase", "status.progress"} <= fields
    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "status-sub")
    assert stored["status"] == {"phase": "Exporting", "progress": 40}


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"storage": None}, "spec.storage", "Required value"),
        ({"sourceName": 5}, "spec.sourceName", "must be of type string"),
        ({"targetDiskFormat": "vhd"}, "spec.targetDiskFormat", "Unsupported value"),
        (
            {"storage": {"type": "s3", "credentialsSecretRef": {"name": "s3-creds"}}},
            "spec.storage.bucket",
            "bucket is required when type is s3",
        ),  # an x-kubernetes-validations (CEL) rule
    ],
    ids=["missing-required", "wrong-type", "not-in-enum", "cel-rule"],
)
def test_malformed_vmmigration_refused(
    namespace: str, custom: k8s.CustomObjectsApi, spec: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _migration("bad", **spec))
    assert refused.value.status == 422
    answer = json.loads(refused.value.body)
    assert answer["reason"] == "Invalid"
    causes = {c["field"]: c["message"] for c in answer["details"]["causes"]}
    assert field in causes, causes
    assert message in causes[field]
    with pytest.raises(ApiException) as missing:
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "bad")
    assert missing.value.status == 404


def test_table_has_printer_columns(kube_api: KubeApiServer, namespace: str, custom: k8s.CustomObjectsApi) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _migration("table"))
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "table", {"status": {"phase": "Transferring", "progress": 55}}
    )
    status, table = kube_api.request(
        "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", headers={"Accept": TABLE}
    )
    assert status == 200 and table["kind"] == "Table"
    columns = [c["name"] for c in table["columnDefinitions"]]
    (version,) = _crd(PLURAL)["spec"]["versions"]
    assert columns == ["Name", *(c["name"] for c in version["additionalPrinterColumns"])]
    assert {"Phase", "Progress"} <= set(columns)
    (row,) = table["rows"]
    cells = dict(zip(columns, row["cells"]))
    assert cells["Name"] == "table" and cells["Phase"] == "Transferring" and cells["Progress"] == 55
    assert cells["Source"] == "web-01" and cells["Target"] == "web-01-migrated" and cells["Storage"] == "s3"


def _list_as(kube_api: KubeApiServer, identity: str, namespace: str) -> list[dict[str, Any]]:
    with kube_api.client(identity) as api_client:
        answer = k8s.CustomObjectsApi(api_client).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    return answer["items"]


def _patch_status_as(kube_api: KubeApiServer, identity: str, namespace: str, name: str, phase: str) -> dict:
    with kube_api.client(identity) as api_client:
        return k8s.CustomObjectsApi(api_client).patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": {"phase": phase}}
        )


def _role_and_binding(namespace: str, name: str, rules: list[dict], subject: dict) -> str:
    return yaml.safe_dump_all([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": name, "namespace": namespace}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [subject]},
    ])  # fmt: skip


def test_rbac_is_enforced(kube_api: KubeApiServer, namespace: str, custom: k8s.CustomObjectsApi) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _migration("rbac"))
    for identity in ("engine", "viewer"):
        with pytest.raises(ApiException) as denied:
            _list_as(kube_api, identity, namespace)
        assert denied.value.status == 403
        message = json.loads(denied.value.body)["message"]
        assert f'User "{kube_api.identities[identity].user}" cannot list resource "vmmigrations"' in message

    engine = {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": kube_api.identities["engine"].user}
    read = {"apiGroups": [GROUP], "resources": ["vmmigrations"], "verbs": ["get", "list", "watch"]}
    kube_api.apply_yaml(_role_and_binding(namespace, "engine-read", [read], engine))
    items = _eventually(lambda: _list_as(kube_api, "engine", namespace))
    assert [i["metadata"]["name"] for i in items] == ["rbac"]
    with pytest.raises(ApiException) as other:  # the viewer still gets nothing
        _list_as(kube_api, "viewer", namespace)
    assert other.value.status == 403
    with pytest.raises(ApiException) as no_status:  # reading is not writing status
        _patch_status_as(kube_api, "engine", namespace, "rbac", "Validating")
    assert no_status.value.status == 403

    status = {"apiGroups": [GROUP], "resources": ["vmmigrations/status"], "verbs": ["patch"]}
    kube_api.apply_yaml(_role_and_binding(namespace, "engine-read", [read, status], engine))
    patched = _eventually(lambda: _patch_status_as(kube_api, "engine", namespace, "rbac", "Validating"))
    assert patched["status"]["phase"] == "Validating"

    # a kubeconfig for the engine identity works with the client's own loader
    config = k8s.Configuration()
    k8s_config.load_kube_config(config_file=str(kube_api.kubeconfig("engine", namespace)),
                                client_configuration=config)  # fmt: skip
    config.proxy = None
    with k8s.ApiClient(config) as api_client:
        items = k8s.CustomObjectsApi(api_client).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    assert [i["metadata"]["name"] for i in items["items"]] == ["rbac"]


def test_service_account_identity(kube_api: KubeApiServer, namespace: str) -> None:
    sa = kube_api.add_service_account("engine", namespace)
    assert sa.user == f"system:serviceaccount:{namespace}:engine"
    with pytest.raises(ApiException) as denied:
        _list_as(kube_api, sa.name, namespace)
    assert denied.value.status == 403
    read = {"apiGroups": [GROUP], "resources": ["vmmigrations"], "verbs": ["list"]}
    kube_api.apply_yaml(
        _role_and_binding(
            namespace, "sa-read", [read], {"kind": "ServiceAccount", "name": "engine", "namespace": namespace}
        )
    )
    assert _eventually(lambda: _list_as(kube_api, sa.name, namespace)) == []


def test_data_survives_apiserver_restart(kube_api: KubeApiServer, namespace: str, custom: k8s.CustomObjectsApi) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _migration("durable"))
    before = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "durable", {"status": {"phase": "Converting", "progress": 70}}
    )
    port = kube_api.port
    seconds = kube_api.restart_apiserver()
    assert kube_api.port == port and seconds < 40
    after = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "durable")  # a client from before
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["spec"] == before["spec"] and after["status"] == {"phase": "Converting", "progress": 70}
    kube_api.wait_established([_crd(PLURAL)["metadata"]["name"]], timeout=5)


def test_add_user_restarts_with_a_new_static_token(kube_api: KubeApiServer, namespace: str) -> None:
    auditor = kube_api.add_user(f"auditor-{namespace}", groups=["vmmigration-auditors"])
    assert kube_api.identities[auditor.name] == auditor and kube_api.last_restart_seconds is not None
    with pytest.raises(ApiException) as denied:
        _list_as(kube_api, auditor.name, namespace)
    assert denied.value.status == 403
    read = {"apiGroups": [GROUP], "resources": ["vmmigrations"], "verbs": ["list"]}
    group = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "vmmigration-auditors"}
    kube_api.apply_yaml(_role_and_binding(namespace, "auditors", [read], group))
    assert _eventually(lambda: _list_as(kube_api, auditor.name, namespace)) == []
    assert _list_as(kube_api, "admin", namespace) == []  # the other identities still work after the restart


# -- startup failures are reported, not skipped -------------------------------------------------------------------
def test_start_failure_has_reason_and_leaves_nothing(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ServerStartError, match="address already in use") as failed:
            start_kube_api(tmp_path, port=busy.getsockname()[1])
    assert "kube-apiserver exited" in str(failed.value)
    assert "=== " in (tmp_path / "etcd.log").read_text()
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and str(tmp_path) in _cmdline(pid)]
    assert left == []  # etcd, started first, was stopped again


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_missing_binary_points_to_install_script(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBE_APISERVER", str(tmp_path / "no-such-kube-apiserver"))
    with pytest.raises(ServerStartError, match="install_servers.sh kube"):
        find_binaries()


def test_clients_ignore_proxies_from_the_environment(kube_api: KubeApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there: a client using it would fail
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    config = kube_api.configuration("admin")
    assert config.proxy is None and config.ssl_ca_cert == str(kube_api.ca_path)
    with kube_api.client() as api_client:
        assert k8s.CoreV1Api(api_client).read_namespace("default").metadata.name == "default"
    assert kube_api.request("GET", "/version")[1]["gitVersion"] == "v1.36.3"
