"""The "Migrations" page in a real Airflow (API server, scheduler, dag-processor, triggerer on loopback) with
login on (SimpleAuthManager, a passwords file): headless Chromium logs in through the UI, opens the page from
the navigation, sees a real migration of the demo world move and end Ready, and opens its DAG run from it."""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from include.demo import create_source_vm, store_documents, write_store
from include.store import FileStatusSink, SpecStore
from tests import secrets_registry
from tests.e2e.browser import chromium_page, screenshot

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from airflow_stack import AirflowStack, free_port, stack_env  # noqa: E402

NAME = "page"
DAG_ID = f"vmmigration__default__{NAME}"
#: the phases of a run under way (the page polls every 2.5 s; disk rows carry bytes from Exporting on)
UNDER_WAY = ("Validating", "Snapshotting", "Exporting", "Transferring", "Converting", "Importing", "Creating",
             "ValidatingTarget")


class LoginStack(AirflowStack):
    """The project's AirflowStack, its REST calls made with the admin's JWT (auth is on)."""

    token: str | None = None

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")


@pytest.fixture
def stack(tmp_path, store):
    password = secrets.token_urlsafe(16)
    jwt_secret = secrets.token_urlsafe(64)
    secrets_registry.register(password, "SimpleAuthManager password of the migrations page test")
    secrets_registry.register(jwt_secret, "JWT secret of the migrations page test")
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"admin": password}))
    secrets_registry.register_input(passwords)
    port = free_port()
    home = tmp_path / "airflow"
    env = stack_env(home, port, dict(os.environ))
    env.update({
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret,
    })
    stack = LoginStack(home=home, port=port, env=env)
    try:
        stack.start()
        stack.token = stack._request("POST", "/auth/token", {"username": "admin", "password": password})[
            "access_token"]
    except Exception as err:  # noqa: BLE001 - the fixture fails the test with the reason
        stack.stop()
        pytest.fail(f"Airflow did not start: {err}")
    stack.password = password
    yield stack
    stack.stop()


def http_status(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_migrations_page_follows_a_real_migration(stack, store, world):
    # ~1 GiB of data in two disks (vda 2 GiB virtual, vdb 512 MiB): long enough to be seen moving
    create_source_vm(world, vda_mib=2048, vdb_mib=512, data_scale=8)
    write_store(store, f"{NAME}.yaml", store_documents(world, name=NAME, target_format="raw"))
    stack.wait_for_dag(DAG_ID)

    # the plugin's app refuses anonymous callers and answers a logged-in one
    status, body = http_status(f"{stack.url}/vmmigrations/api/migrations")
    assert status == 401 and NAME.encode() not in body
    status, body = http_status(f"{stack.url}/vmmigrations/api/migrations", stack.token)
    assert status == 200 and [m["key"] for m in json.loads(body)["migrations"]] == [f"default/{NAME}"]

    sink = FileStatusSink(SpecStore(store))
    with chromium_page() as page:
        page.goto(stack.url + "/")
        page.wait_for_url(re.compile(r"/auth/login"))  # Airflow's own login page
        page.fill("input[name=username]", "admin")
        page.fill("input[name=password]", stack.password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda url: "/auth/login" not in url)
        nav = page.locator("a[href$='plugin/migrations']").first
        nav.wait_for()
        nav.click()
        page.wait_for_url(re.compile(r"/plugin/migrations"))
        frame = page.wait_for_selector("iframe[title='Migrations']").content_frame()
        frame.wait_for_selector(f"tr.migration[data-key='default/{NAME}']")

        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        run_id = stack.trigger(DAG_ID)
        row = f"tr.migration[data-key='default/{NAME}']"
        disks = f"tr.details[data-key='default/{NAME}'] tr.disk"
        # while the run is under way: a phase before Ready and disk rows with byte counts, in IEC units
        try:
            frame.wait_for_function(
                """([row, disks, underWay]) => {
                     const r = document.querySelector(row);
                     const cells = [...document.querySelectorAll(disks + ' td.bytes')].map(td => td.textContent);
                     return r && underWay.includes(r.dataset.phase) && cells.some(t => / [KMG]iB \\(/.test(t));
                   }""", arg=[row, disks, list(UNDER_WAY)], timeout=150_000, polling=200)
        except PlaywrightTimeout:
            screenshot(page, "migrations-page-running-not-seen")
            pytest.fail(f"no disk bytes seen before Ready; status {sink.get('default', NAME)}; "
                        f"tasks {stack.task_states(DAG_ID, run_id)}")
        running_phase = frame.locator(row).get_attribute("data-phase")
        byte_cells = frame.locator(f"{disks} td.bytes").all_text_contents()
        screenshot(page, "migrations-page-running")
        assert running_phase in UNDER_WAY
        assert any(re.fullmatch(r"[\d.]+ (B|KiB|MiB|GiB) / [\d.]+ (B|KiB|MiB|GiB) \(\d+%\)", t) for t in byte_cells), \
            byte_cells
        route = frame.locator(f"{row} td.route").inner_text()
        assert route.startswith(f"{world.vm_name} on {world.prefix}-kvm-source (libvirt)"), route

        frame.wait_for_function(
            "(row) => ['Ready', 'Failed'].includes(document.querySelector(row)?.dataset.phase)",
            arg=row, timeout=240_000, polling=500)
        final = sink.get("default", NAME) or {}
        assert final.get("phase") == "Ready", (final.get("message"), stack.task_states(DAG_ID, run_id))
        # the run's own state follows the status by a scheduler loop; the page shows it once it is there
        frame.wait_for_function(
            "(row) => document.querySelector(row + ' td.run .badge')?.textContent === 'success'",
            arg=row, timeout=60_000, polling=500)
        assert frame.locator(row).get_attribute("data-progress") == "100"
        assert frame.locator(f"{row} td.run a.run-link").inner_text() == run_id
        checksums = {d["name"]: d["checksum"] for d in final.get("disks", []) if "checksum" in d}
        for disk, state in checksums.items():
            assert state == "verified", checksums
            assert frame.locator(f"{disks}[data-disk='{disk}'] td.checksum").inner_text() == "verified"
        if final.get("summary"):
            assert frame.locator(f"tr.details[data-key='default/{NAME}'] .summary").inner_text().startswith(
                "Run summary: moved ")
        screenshot(page, "migrations-page-ready")
        assert stack.password not in page.content() and stack.password not in frame.content()

        # the run link opens the run in the Airflow UI (the top window, not the frame)
        frame.locator(f"{row} td.run a.run-link").click()
        page.wait_for_url(re.compile(rf"/dags/{DAG_ID}/runs/{re.escape(urllib.parse.quote(run_id, safe=''))}$"))
        page.get_by_text(run_id).first.wait_for()
        time.sleep(1)
        screenshot(page, "migrations-page-run")
        assert not page.locator("iframe[title='Migrations']").count()
