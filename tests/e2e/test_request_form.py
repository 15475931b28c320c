"""Start a migration from the UI: the form DAG ``vmmigration_request`` on a real standalone Airflow (API server,
scheduler, dag-processor, triggerer), its store holding a demo world's VirtualMachine and Providers on the real
libvirtd but no VMMigration. Triggered through the REST API and through the trigger dialog of the Airflow 3 UI in a
headless Chromium; each accepted form becomes a VMMigration whose own DAG runs it to Ready, its disks compared by
content. Bad input is refused before any run (HTTP 400 naming the param) or at submit (naming the spec field), and
nothing is written to the store.

One Airflow and one world for the module (starting Airflow is most of a test's time)."""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.parse
import uuid
from pathlib import Path

import pytest

from include import diskio, request_form
from include.demo import DemoWorld, create_source_vm, store_documents, teardown, write_store
from include.store import FileStatusSink, SpecStore
from tests.e2e.browser import chromium_page, screenshot
from tests.e2e.helpers import assert_target_matches_source, form_conf, launched, task_log, wait_run

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from airflow_stack import AirflowStack, free_port, stack_env  # noqa: E402

FORM = "vmmigration_request"
RUN_TIMEOUT = 240


class Env:
    def __init__(self, stack: AirflowStack, store: Path, world: DemoWorld) -> None:
        self.stack, self.store, self.world = stack, store, world

    def conf(self, name: str, target: str) -> dict:
        """A valid form: the demo VM to the demo target Provider through the world's NFS-style share."""
        return form_conf(self.world, name, target)

    def files(self) -> list[str]:
        """Every file of the store (specs and state), relative to it."""
        return sorted(str(p.relative_to(self.store)) for p in self.store.rglob("*") if p.is_file())

    def wait_run(self, dag_id: str, run_id: str, timeout: float = RUN_TIMEOUT) -> str:
        return wait_run(self.stack, dag_id, run_id, timeout)

    def log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        return task_log(self.stack, dag_id, run_id, task_id, try_number)

    def launched(self, form_run_id: str) -> tuple[str, str]:
        """The migration DAG and run the form's run started (run_migration's XCom)."""
        return launched(self.stack, FORM, form_run_id)

    def assert_migrated(self, form_run_id: str, name: str) -> None:
        state = self.wait_run(FORM, form_run_id)
        tasks = self.stack.task_states(FORM, form_run_id)
        status = FileStatusSink(SpecStore(self.store)).get("default", name) or {}
        assert state == "success", (tasks, status.get("message"), self.log(FORM, form_run_id, "submit_migration"))
        dag_id, run_id = self.launched(form_run_id)
        assert dag_id == f"vmmigration__default__{name}"
        assert self.stack.run_state(dag_id, run_id) == "success"
        assert status.get("phase") == "Ready" and status.get("progress") == 100, status
        # the migration is an ordinary VMMigration of the store, written by the form
        spec_file = self.store / f"submitted--default.{name}.yaml"
        assert spec_file.read_text().startswith("# submitted through Airflow (the trigger form of vmmigration_request)")
        assert SpecStore(self.store).entry("default", name).migration is not None


@pytest.fixture(scope="module")
def env(tmp_path_factory, libvirt_uri):
    root = tmp_path_factory.mktemp("request-form")
    world = DemoWorld(uri=libvirt_uri, prefix=f"t{uuid.uuid4().hex[:8]}", root=root / "world")
    world.share.mkdir(parents=True)
    store = root / "store"
    stack = None
    try:
        create_source_vm(world, vda_mib=128, vdb_mib=64, data_scale=0.5)  # small disks: a short module
        # the inventory only (a VirtualMachine, two Providers, a Secret): no VMMigration
        write_store(store, "inventory.yaml", store_documents(world, name="unused")[1:])
        port = free_port()
        home = root / "airflow"
        base = {**os.environ, "VMMIGRATION_STORE": str(store), "VMMIGRATION_STAGING": str(root / "staging")}
        stack = AirflowStack(home=home, port=port, env=stack_env(home, port, base))
        try:
            stack.start()
            stack.wait_for_dag(FORM)
        except Exception as err:  # noqa: BLE001 - the fixture fails the test with the reason
            pytest.fail(f"standalone Airflow did not start: {err}")
        yield Env(stack, store, world)
    finally:
        if stack is not None:
            stack.stop()
        teardown(world)


def test_rest_trigger_of_the_form_migrates_the_vm(env):
    run_id = env.stack.trigger(FORM, env.conf("form-rest", f"{env.world.vm_name}-migrated"))
    env.assert_migrated(run_id, "form-rest")
    assert_target_matches_source(env.world, "raw")


@pytest.mark.parametrize(("field", "value"), [("target_name", "Not_A_DNS_Name"), ("storage_type", "ftp")])
def test_rest_trigger_with_a_bad_field_is_refused_naming_it(env, field, value):
    before, runs = env.files(), len(env.stack.runs(FORM))
    with pytest.raises(urllib.error.HTTPError) as err:
        env.stack.trigger(FORM, {**env.conf("form-bad", "form-bad-vm"), field: value})
    assert err.value.code == 400
    body = err.value.read().decode()
    assert f"Invalid input for param {field}" in body, body
    assert len(env.stack.runs(FORM)) == runs  # no run exists
    assert env.files() == before  # nothing written


def test_an_unknown_vm_fails_at_submit_naming_spec_source_name(env):
    before = env.files()
    run_id = env.stack.trigger(FORM, {**env.conf("form-ghost", "ghost-migrated"), "source_vm": "default/ghost"})
    assert env.wait_run(FORM, run_id) == "failed"
    tasks = env.stack.task_states(FORM, run_id)
    assert tasks == {"submit_migration[-1]": "failed", "run_migration[-1]": "upstream_failed"}, tasks
    log = env.log(FORM, run_id, "submit_migration")
    assert "spec.sourceName (form field source_vm): VirtualMachine default/ghost not found" in log, log
    assert "nothing was written" in log
    assert env.files() == before
    assert env.stack.runs("vmmigration__default__form-ghost") == []


def _field(page, dialog, title: str):
    """The input of the form field titled ``title`` (number fields carry no element id)."""
    return dialog.get_by_role("group").filter(has=page.locator("label", has_text=title)).locator("input").first


def _select(page, element_id: str, option: str) -> None:
    page.locator(f"#{element_id}").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_the_trigger_dialog_renders_the_form_and_starts_the_migration(env):
    w, name, target = env.world, "form-ui", f"{env.world.vm_name}-ui"
    runs_before = {r["dag_run_id"] for r in env.stack.runs(FORM)}
    with chromium_page() as page:
        page.goto(f"{env.stack.url}/dags/{FORM}")
        page.wait_for_load_state("networkidle")
        page.get_by_role("button", name="Trigger").first.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Trigger Dag - Start a VM migration").wait_for()
        for section in request_form.SECTIONS:  # each section renders as its own part of the form
            assert dialog.get_by_role("button", name=section, exact=True).is_visible(), section

        def open_section(section: str) -> None:
            dialog.get_by_role("button", name=section, exact=True).click()
            page.wait_for_timeout(300)

        open_section("Source")
        page.locator("#element_migration_name").fill(name)
        page.locator("#element_source_vm").fill(f"default/{w.vm_name}")
        # the store's VM is proposed
        assert page.locator("#list_source_vm option").first.get_attribute("value") == f"default/{w.vm_name}"
        open_section("Target")
        page.locator("#element_target_provider").fill(f"default/{w.prefix}-kvm-target")
        page.locator("#element_target_name").fill(target)
        _select(page, "element_target_disk_format", "raw")
        page.locator("#element_target_storage_hint").fill(w.target_pool)
        open_section("Intermediate storage")
        _select(page, "element_storage_type", "NFS (mounted share)")
        page.locator("#element_storage_path").fill(str(w.share))
        open_section("Disks and hints")
        editor = page.locator("#element_network_hints .monaco-editor").first
        editor.click()
        page.keyboard.press("Control+A")
        page.keyboard.press("Delete")
        page.keyboard.insert_text('[{"name": "eth0", "bridge": "virbr0"}]')
        _field(page, dialog, "vCPUs").fill("2")
        _field(page, dialog, "Memory (MiB)").fill("512")
        open_section("Cleanup and retry")
        _field(page, dialog, "Retries per phase").fill("2")
        page.locator("#element_backoff_duration").fill("5s")
        page.locator("#element_max_backoff_duration").fill("10s")
        page.wait_for_timeout(500)
        screenshot(page, "trigger-form")
        submit = dialog.get_by_role("button", name="Trigger", exact=True)
        assert submit.is_enabled()
        submit.click()
        deadline = time.monotonic() + 30
        new: set[str] = set()
        while not new and time.monotonic() < deadline:
            new = {r["dag_run_id"] for r in env.stack.runs(FORM)} - runs_before
            time.sleep(0.5)
        assert len(new) == 1, "the dialog started no run"
        run_id = new.pop()
        env.assert_migrated(run_id, name)
        page.goto(f"{env.stack.url}/dags/{FORM}/runs/{urllib.parse.quote(run_id, safe='')}")
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(3000)
        screenshot(page, "trigger-form-run")
    # the form's values, as the run received them
    conf = env.stack.get(f"/api/v2/dags/{FORM}/dagRuns/{urllib.parse.quote(run_id, safe='')}")["conf"]
    assert {k: conf[k] for k in ("migration_name", "target_name", "storage_type", "target_disk_format", "cpu",
                                 "memory_mb", "network_hints", "max_attempts", "backoff_duration")} == {
        "migration_name": name, "target_name": target, "storage_type": "nfs", "target_disk_format": "raw",
        "cpu": 2, "memory_mb": 512, "network_hints": [{"name": "eth0", "bridge": "virbr0"}], "max_attempts": 2,
        "backoff_duration": "5s"}
    conn = w.conn()
    try:
        pool = conn.storagePoolLookupByName(w.target_pool)
        pool.refresh(0)
        for disk in ("vda", "vdb"):
            dst = pool.storageVolLookupByName(f"{target}-{disk}.raw").path()
            src = w.root / "pools" / "src" / f"{w.vm_name}-{disk}.qcow2"
            assert diskio.compare(src, dst, "qcow2", "raw"), f"{disk} differs from its source"
    finally:
        conn.close()
