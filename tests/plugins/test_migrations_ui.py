"""The "Migrations" page's FastAPI app inside Airflow's own API server app (``create_app``: the plugin is
loaded from the plugins folder and mounted at /vmmigrations), against a real spec store folder of specs and
statuses, through FastAPI's TestClient. Authentication is the SimpleAuthManager's, with a passwords file."""

from __future__ import annotations

import datetime
import json
import secrets
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

from include.demo import DemoWorld, store_documents, write_store
from include.status import Phase, complete_phase, enter_phase, mark_ready, report_bytes
from include.store import FileStatusSink, SpecStore, dag_id_for
from tests import secrets_registry

MiB = 1024 * 1024
GiB = 1024 * MiB


@pytest.fixture(scope="module")
def airflow_client(airflow_db, tmp_path_factory):
    """Airflow's API server app with the SimpleAuthManager (users from a passwords file, not all-admins),
    a client for it and the password of each user (admin, viewer)."""
    from airflow.api_fastapi.app import create_app, purge_cached_app
    from fastapi.testclient import TestClient

    folder = tmp_path_factory.mktemp("sam")
    password = secrets.token_urlsafe(16)
    passwords = folder / "passwords.json"
    users = {"admin": password, "viewer": secrets.token_urlsafe(16)}
    passwords.write_text(json.dumps(users))
    for user in users.values():
        secrets_registry.register(user, "SimpleAuthManager password of the migrations UI test")
    secrets_registry.register_input(passwords)
    jwt_secret = secrets.token_urlsafe(64)
    secrets_registry.register(jwt_secret, "JWT secret of the migrations UI test")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__CORE__AUTH_MANAGER",
                  "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager")
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin,viewer:viewer")
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
        mp.setenv("AIRFLOW__API_AUTH__JWT_SECRET", jwt_secret)
        purge_cached_app()
        try:
            with TestClient(create_app()) as client:
                yield client, users
        finally:
            purge_cached_app()


def login(client, users: dict[str, str], user: str = "admin") -> str:
    """What the UI's login form does: POST /auth/token (the page then keeps the JWT as the ``_token`` cookie)."""
    resp = client.post("/auth/token", json={"username": user, "password": users[user]})
    assert resp.status_code == 201, resp.text
    return resp.json()["access_token"]


def world_for(store: Path, prefix: str) -> DemoWorld:
    """The demo's documents of one migration (no libvirt needed: only names and types go into the store)."""
    return DemoWorld(uri="qemu:///system", prefix=prefix, root=store.parent / prefix)


def write_running(store: Path, name: str) -> None:
    """A migration half way through its transfer, its status written by the engine's own helpers."""
    write_store(store, f"{name}.yaml", store_documents(world_for(store, f"w{name}"), name=name))
    sink = FileStatusSink(SpecStore(store))

    def mutate(status):
        enter_phase(status, Phase.VALIDATING)
        complete_phase(status, Phase.VALIDATING)
        enter_phase(status, Phase.TRANSFERRING, disk="vda")
        report_bytes(status, Phase.TRANSFERRING, "vda", 384 * MiB, 1024 * MiB, rate=48 * MiB, eta=13)
        report_bytes(status, Phase.TRANSFERRING, "vdb", 16 * MiB, 128 * MiB)
        status["disks"][0].update(virtualBytes=2 * GiB, checksum="pending")

    sink.update("default", name, mutate)


def write_ready(store: Path, name: str) -> None:
    write_store(store, f"{name}.yaml", store_documents(world_for(store, f"w{name}"), name=name))

    def mutate(status):
        enter_phase(status, Phase.VALIDATING)
        report_bytes(status, Phase.IMPORTING, "vda", 1024 * MiB, 1024 * MiB)
        mark_ready(status, "VM is ready")
        status["disks"][0].update(virtualBytes=2 * GiB, checksum="verified")
        status["summary"] = {"seconds": 95, "bytesMoved": 1536 * MiB, "rateBytesPerSecond": 16 * MiB,
                             "disks": [{"name": "vda", "virtualBytes": 2 * GiB, "allocatedBytes": 1024 * MiB,
                                        "bytesMoved": 1024 * MiB, "checksum": "verified", "seconds": 64,
                                        "rateBytesPerSecond": 16 * MiB}]}

    FileStatusSink(SpecStore(store)).update("default", name, mutate)


def test_units_are_iec():
    from migrations_ui.overview import disk_view, duration, iec_bytes

    assert [iec_bytes(n) for n in (0, 512, 1536, 384 * MiB, GiB, 3 * GiB // 2)] == \
        ["0 B", "512 B", "1.5 KiB", "384 MiB", "1 GiB", "1.5 GiB"]
    assert [duration(s) for s in (7, 200, 3900)] == ["7 s", "3 min 20 s", "1 h 5 min"]
    view = disk_view({"name": "vda", "bytesDone": 384 * MiB, "bytesTotal": GiB, "virtualBytes": 10 * GiB,
                      "rateBytesPerSecond": 120 * MiB, "etaSeconds": 5})
    assert view["text"] == {"bytes": "384 MiB / 1 GiB (37%)", "virtual": "10 GiB", "rate": "120 MiB/s",
                            "eta": "5 s"}
    assert view["percent"] == 37
    # keys not written (yet) by the engine are left out, not shown as zero
    assert disk_view({"name": "vdb"}) == {"name": "vdb", "text": {}}


def test_json_lists_every_migration_with_status_disks_summary(airflow_client, store):
    client, users = airflow_client
    write_running(store, "alpha")
    write_ready(store, "beta")
    write_store(store, "gamma.yaml", store_documents(world_for(store, "wgamma"), name="gamma"))  # no status yet
    bad = store_documents(world_for(store, "wdelta"), name="delta")
    bad[0]["spec"]["targetDiskFormat"] = "qcow3"
    write_store(store, "delta.yaml", bad)

    resp = client.get("/vmmigrations/api/migrations", headers={"Authorization": f"Bearer {login(client, users)}"})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["runsAvailable"] is True
    by_key = {m["key"]: m for m in doc["migrations"]}
    assert list(by_key) == ["default/alpha", "default/beta", "default/delta", "default/gamma"]
    assert doc["total"] == 4 and doc["phases"] == {"Transferring": 1, "Ready": 1, "None": 2}

    alpha = by_key["default/alpha"]
    assert alpha["dagId"] == dag_id_for("default", "alpha")
    assert alpha["phase"] == "Transferring" and 15 < alpha["progress"] < 55
    assert alpha["source"] == {"name": "walpha-vm", "namespace": "default", "provider": "walpha-kvm-source",
                               "providerNamespace": "default", "providerType": "libvirt"}
    assert alpha["target"]["name"] == "walpha-vm-migrated"
    assert alpha["target"]["provider"] == "walpha-kvm-target" and alpha["target"]["providerType"] == "libvirt"
    assert alpha["storageType"] == "nfs"
    vda, vdb = alpha["disks"]
    assert vda["bytesDone"] == 384 * MiB and vda["bytesTotal"] == 1024 * MiB and vda["checksum"] == "pending"
    assert vda["text"] == {"bytes": "384 MiB / 1 GiB (37%)", "virtual": "2 GiB", "rate": "48 MiB/s", "eta": "13 s"}
    assert vdb["text"] == {"bytes": "16 MiB / 128 MiB (12%)"}
    assert alpha["summary"] is None and alpha["run"] is None
    assert {c["type"] for c in alpha["conditions"]} >= {"Validated", "Transferring"}

    beta = by_key["default/beta"]
    assert beta["phase"] == "Ready" and beta["progress"] == 100
    assert beta["disks"][0]["checksum"] == "verified"
    assert beta["summary"]["text"] == {"seconds": "1 min 35 s", "bytesMoved": "1.5 GiB", "rate": "16 MiB/s"}
    assert beta["summary"]["disks"][0]["text"] == {"virtual": "2 GiB", "allocated": "1 GiB", "moved": "1 GiB",
                                                   "seconds": "1 min 4 s", "rate": "16 MiB/s"}
    assert by_key["default/gamma"]["phase"] is None and by_key["default/gamma"]["disks"] == []
    assert "qcow3" in by_key["default/delta"]["specError"]
    # no secret: the Secret documents of the store are never read into the page
    assert "stringData" not in resp.text and "libvirt-creds" not in resp.text


def test_latest_run_links_to_the_run_page(airflow_client, store):
    """The latest run of the migration's DAG, read from Airflow's DB, links to /dags/<dag_id>/runs/<run_id>."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunType

    client, users = airflow_client
    name = f"runs-{uuid.uuid4().hex[:6]}"
    write_running(store, name)
    dag_id = dag_id_for("default", name)
    now = datetime.datetime.now(datetime.UTC)
    with create_session() as session:
        for i, state in enumerate((DagRunState.FAILED, DagRunState.RUNNING)):
            session.add(DagRun(dag_id=dag_id, run_id=f"manual__{i}:00+00:00", run_type=DagRunType.MANUAL,
                               state=state, run_after=now, start_date=now))
    resp = client.get("/vmmigrations/api/migrations", headers={"Authorization": f"Bearer {login(client, users)}"})
    run = next(m for m in resp.json()["migrations"] if m["name"] == name)["run"]
    assert run["runId"] == "manual__1:00+00:00" and run["state"] == "running"
    assert run["url"] == f"../dags/{dag_id}/runs/" + urllib.parse.quote("manual__1:00+00:00", safe="")
    assert urllib.parse.urljoin("http://h/vmmigrations/", run["url"]) == \
        f"http://h/dags/{dag_id}/runs/manual__1%3A00%2B00%3A00"


def test_refused_without_login_allowed_with_the_ui_cookie(airflow_client, store):
    client, users = airflow_client
    write_running(store, "alpha")
    client.cookies.clear()

    resp = client.get("/vmmigrations/api/migrations")
    assert resp.status_code == 401 and "alpha" not in resp.text
    assert client.get("/vmmigrations/static/migrations.js").status_code == 401
    resp = client.get("/vmmigrations/api/migrations", headers={"Authorization": "Bearer not-a-jwt"})
    assert resp.status_code == 403 and "alpha" not in resp.text
    client.cookies.set("_token", "not-a-jwt")
    assert client.get("/vmmigrations/api/migrations").status_code == 403
    client.cookies.clear()
    # the page sends an anonymous browser to Airflow's login page, which comes back to it
    resp = client.get("/vmmigrations/", follow_redirects=False)
    assert resp.status_code == 303
    location = urllib.parse.urlsplit(resp.headers["location"])
    assert location.path == "/auth/login"
    assert urllib.parse.parse_qs(location.query)["next"] == ["http://testserver/vmmigrations/"]
    assert resp.text == ""

    for user in ("admin", "viewer"):  # any logged-in role may read DAGs, so sees the migrations
        client.cookies.set("_token", login(client, users, user))
        page = client.get("/vmmigrations/")
        assert page.status_code == 200 and "<h1>Migrations</h1>" in page.text
        resp = client.get("/vmmigrations/api/migrations")
        assert resp.status_code == 200, resp.text
        assert [m["key"] for m in resp.json()["migrations"]] == ["default/alpha"]
        assert client.get("/vmmigrations/static/migrations.js").status_code == 200
        client.cookies.clear()


def test_plugin_puts_migrations_in_the_navigation(airflow_client):
    client, users = airflow_client
    resp = client.get("/api/v2/plugins", headers={"Authorization": f"Bearer {login(client, users)}"})
    plugin = next(p for p in resp.json()["plugins"] if p["name"] == "vmmigration_migrations_ui")
    assert plugin["fastapi_apps"] == [{"app": "migrations_ui_plugin.LazyMigrationsApp", "url_prefix": "/vmmigrations",
                                       "name": "VM migrations"}]
    view = plugin["external_views"][0]
    assert (view["name"], view["href"], view["url_route"], view["destination"]) == \
        ("Migrations", "vmmigrations/", "migrations", "nav")


def test_hundreds_of_migrations_stay_fast(airflow_client, store):
    client, users = airflow_client
    token = login(client, users)
    count = 300
    sink = FileStatusSink(SpecStore(store))
    for i in range(count):
        name = f"vm-{i:03d}"
        write_store(store, f"{name}.yaml", store_documents(world_for(store, f"w{i:03d}"), name=name))

        def mutate(status, i=i):
            enter_phase(status, Phase.VALIDATING)
            report_bytes(status, Phase.TRANSFERRING, "vda", i * MiB, 512 * MiB)

        sink.update("default", name, mutate)
    headers = {"Authorization": f"Bearer {token}"}
    started = time.monotonic()
    first = client.get("/vmmigrations/api/migrations", headers=headers)
    first_seconds = time.monotonic() - started
    timings = []
    for _ in range(3):
        started = time.monotonic()
        resp = client.get("/vmmigrations/api/migrations", headers=headers)
        timings.append(time.monotonic() - started)
    assert first.status_code == resp.status_code == 200
    assert resp.json()["total"] == count
    assert resp.json()["migrations"][5]["disks"][0]["text"]["bytes"] == "5 MiB / 512 MiB (0%)"
    # the store is parsed once; each poll then stats the spec files and reads one status per migration
    assert min(timings) < 1.0, (first_seconds, timings)
    assert min(timings) < first_seconds, (first_seconds, timings)


def test_a_changed_store_is_read_again(airflow_client, store):
    """The parsed store is kept between polls only while no spec file changed."""
    client, users = airflow_client
    headers = {"Authorization": f"Bearer {login(client, users)}"}

    def keys():
        return [m["key"] for m in client.get("/vmmigrations/api/migrations", headers=headers).json()["migrations"]]

    write_running(store, "alpha")
    assert keys() == ["default/alpha"]
    write_ready(store, "beta")
    assert keys() == ["default/alpha", "default/beta"]
    (store / "alpha.yaml").unlink()
    assert keys() == ["default/beta"]
    docs = store_documents(world_for(store, "wbeta"), name="beta")
    docs[0]["spec"]["targetName"] = "renamed-target"
    write_store(store, "beta.yaml", docs)
    target = client.get("/vmmigrations/api/migrations", headers=headers).json()["migrations"][0]["target"]
    assert target["name"] == "renamed-target"
