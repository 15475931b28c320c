"""Shared fixtures: an isolated Airflow home, a real libvirtd, and a demo world per test.

Airflow reads its configuration at import, so the environment is set here, before any test module
imports it: every run gets its own AIRFLOW_HOME (SQLite), spec store and staging folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="vmmig-tests-"))
os.environ.update({
    "AIRFLOW_HOME": str(_SESSION_DIR / "airflow"),
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "VMMIGRATION_STORE": str(_SESSION_DIR / "store"),
    "VMMIGRATION_STAGING": str(_SESSION_DIR / "staging"),
    # NFS shares of the tests live in temporary folders (docs/security.md: allowed roots)
    "VMMIGRATION_ALLOWED_ROOTS": tempfile.gettempdir(),
    # every server of the tests (libvirtd over ssh, S3, WebDAV) listens on loopback
    "VMMIGRATION_ALLOW_LOOPBACK": "true",
})
if str(ROOT / "plugins") not in sys.path:
    sys.path.insert(0, str(ROOT / "plugins"))


def _venv_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """An initialised Airflow metadata DB (SQLite) in the session's AIRFLOW_HOME."""
    proc = subprocess.run([_venv_bin("airflow"), "db", "migrate"], capture_output=True, text=True, env=os.environ)
    if proc.returncode != 0:
        pytest.fail(f"airflow db migrate failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    pools = ROOT / "config" / "pools.json"
    proc = subprocess.run([_venv_bin("airflow"), "pools", "import", str(pools)], capture_output=True, text=True,
                          env=os.environ)
    if proc.returncode != 0:
        pytest.fail(f"airflow pools import failed: {proc.stderr[-2000:]}")
    return Path(os.environ["AIRFLOW_HOME"])


@pytest.fixture(scope="session")
def libvirt_uri() -> str:
    """A real libvirtd (Debian's), started by scripts/libvirtd.sh if it is not running."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "libvirtd.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"libvirtd could not be started: {proc.stderr}")
    return "qemu:///system"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh spec store and staging folder for one test."""
    folder = tmp_path / "store"
    folder.mkdir()
    monkeypatch.setenv("VMMIGRATION_STORE", str(folder))
    monkeypatch.setenv("VMMIGRATION_STAGING", str(tmp_path / "staging"))
    return folder


@pytest.fixture
def s3(tmp_path: Path, request: pytest.FixtureRequest):
    """A real versitygw S3 server on loopback (checks signatures) with one bucket: the test module's
    ``S3_BUCKET``, else ``vm-migrations``; stopped after the test."""
    from tests.servers.s3 import start_s3_server

    server = start_s3_server(tmp_path / "s3")
    server.create_bucket(getattr(request.module, "S3_BUCKET", "vm-migrations"))
    yield server
    server.stop()


from tests.servers.kube_api import kube_api  # noqa: E402, F401 - session fixture: kube-apiserver + etcd
from tests.servers.pve.server import pve  # noqa: E402, F401 - per-test fixture: a Proxmox VE API server + SSH
from tests.servers.vsphere import vcsim  # noqa: E402, F401 - session fixture: a vCenter simulator (govmomi)


@pytest.fixture
def world(libvirt_uri: str, tmp_path: Path):
    """A demo world on the real libvirtd: source and target pools, an NFS-style share; removed after."""
    from include.demo import DemoWorld, teardown

    w = DemoWorld(uri=libvirt_uri, prefix=f"t{uuid.uuid4().hex[:8]}", root=tmp_path / "world")
    w.share.mkdir(parents=True)
    yield w
    teardown(w)


_SECRET_SCAN = pytest.StashKey[object]()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep each test's captured output (``dag.test()`` prints its task logs there) as a file for the
    secret scan, named after the test."""
    text = "".join(f"=== {report.nodeid} {name}\n{content}\n" for name, content in report.sections if content)
    if text:
        import hashlib
        import re

        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", report.nodeid)[-120:]
        tag = hashlib.sha256(report.nodeid.encode()).hexdigest()[:8]
        folder = _SESSION_DIR / "captured-output"
        folder.mkdir(exist_ok=True)
        with open(folder / f"{stem}.{tag}.{report.when}.log", "a") as f:
            f.write(text)


@pytest.hookimpl(tryfirst=True)  # before pytest's tmpdir plugin may clean the base temp folder
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Zero secrets in what the suite produced: every log, XCom, status file and Airflow DB under the session
    folder and pytest's base temp folder is scanned for the secrets the tests used (tests/secret_scan.py).
    A hit fails the run. The result is printed by pytest_terminal_summary, just above the final counts."""
    if session.config.option.collectonly:
        return
    from tests import secret_scan, secrets_registry

    roots = [_SESSION_DIR]
    basetemp = getattr(getattr(session.config, "_tmp_path_factory", None), "_basetemp", None)
    if basetemp is not None:
        roots.append(Path(basetemp))
    result = secret_scan.scan(roots, secrets_registry.secrets(), secrets_registry.inputs())
    session.config.stash[_SECRET_SCAN] = result
    listing = os.environ.get("VMMIG_SECRET_SCAN_LIST")  # optional: where to write what was scanned
    if listing:
        Path(listing).write_text("".join([*(f"scanned {p}\n" for p in result.scanned),
                                          *(f"excluded {p}\n" for p in result.excluded)]))
    if result.hits and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if session.config.pluginmanager.get_plugin("terminalreporter") is None:
        for line in _secret_scan_lines(result, verbose=False):
            print(line, file=sys.stderr)


def _secret_scan_lines(result, verbose: bool) -> list[str]:
    lines = [f"SECRET LEAK: {hit}" for hit in result.hits]
    if result.hits or verbose:
        lines.append("secret scan roots: " + ", ".join(map(str, result.roots)))
    return [*lines, result.summary + (" -- the run fails" if result.hits else "")]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    result = config.stash.get(_SECRET_SCAN, None)
    if result is None:
        return
    leaks = bool(result.hits)
    terminalreporter.section("secret scan", red=leaks, green=not leaks, bold=leaks)
    for line in _secret_scan_lines(result, verbose=config.option.verbose > 0):
        terminalreporter.write_line(line, red=leaks)
