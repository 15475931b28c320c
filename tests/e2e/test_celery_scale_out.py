"""docker-compose's topology without Docker (ENVIRONMENT.md §14): PostgreSQL and Redis on loopback, Airflow on the
CeleryExecutor (api-server, scheduler, dag-processor, triggerer) and Celery workers, each in a working folder of its
own with its own spec store and staging folders.

- ``w1`` and ``w2`` run the phases: their store folders are empty, they share no store or staging with the
  dag-processor nor with each other; the run state (plan, ledger, disk records, status, the validated spec) is the
  SQL run state in the metadata database's server.
- ``beside-store`` serves ``$VMMIGRATION_STORE_QUEUE``: Validating runs there, with the dag-processor's store folder
  (as the compose file's ``airflow-worker-store``), and keeps the validated VMMigration and inventory in the run state
  for the others.

The migration is the demo's (local libvirt, NFS storage on a share both phase workers see): it ends Ready with the
data verified by content, and its tasks ran on both phase workers (each worker's own log names them).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from include.demo import create_source_vm, store_documents, write_store
from include.runstate import RUN_STATE_ENV, SqlRunState
from tests.e2e.helpers import assert_target_matches_source

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from airflow_stack import AirflowStack, free_port, stack_env  # noqa: E402

STORE_QUEUE = "beside-store"
PHASE_WORKERS = ("w1", "w2")


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        pytest.fail(f"PostgreSQL's {name} not found (apt-get install postgresql)")
    return found[-1]


@dataclass
class Postgres:
    data: Path
    port: int
    as_user: str | None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/airflow"

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        cmd = list(argv)
        if self.as_user:  # PostgreSQL refuses to run as root: as the recipe, run it as the postgres user
            cmd = ["su", self.as_user, "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def postgres():
    """A PostgreSQL server of its own: initdb into a fresh folder, pg_ctl on a free loopback port, database airflow."""
    as_user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="vmmig-pg-", dir="/var/tmp"))
    if as_user:
        pw = pwd.getpwnam(as_user)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    pg = Postgres(data=root / "data", port=free_port(), as_user=as_user)
    try:
        proc = pg.run(_pg_bin("initdb"), "-D", str(pg.data), "-A", "trust", "-U", "postgres")
        assert proc.returncode == 0, f"initdb failed:\n{proc.stdout}\n{proc.stderr}"
        proc = pg.run(_pg_bin("pg_ctl"), "-D", str(pg.data), "-l", str(root / "postgres.log"), "-w", "-t", "60",
                      "-o", f"-p {pg.port} -k {root} -c listen_addresses=127.0.0.1", "start")
        assert proc.returncode == 0, f"pg_ctl start failed:\n{proc.stderr}\n{(root / 'postgres.log').read_text()}"
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE airflow")
        conn.close()
        yield pg
    finally:
        pg.run(_pg_bin("pg_ctl"), "-D", str(pg.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def redis(tmp_path):
    """redis-server on a free loopback port, nothing saved to disk."""
    binary = shutil.which("redis-server")
    if not binary:
        pytest.fail("redis-server not found (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import socket

        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not answer on 127.0.0.1:{port}")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def celery_stack(tmp_path, store, postgres, redis):
    home = tmp_path / "airflow"
    port = free_port()
    env = stack_env(home, port, dict(os.environ))
    env.update({
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.url,
        "AIRFLOW__CELERY__BROKER_URL": redis,
        # db+postgresql:// alone wants psycopg 3 (ENVIRONMENT.md §14)
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + postgres.url,
        RUN_STATE_ENV: postgres.url,
        "VMMIGRATION_STORE_QUEUE": STORE_QUEUE,
    })
    stack = AirflowStack(home=home, port=port, env=env)
    try:
        stack.start(timeout=180)
    except Exception as err:  # noqa: BLE001 - the fixture fails the test with the reason
        stack.stop()
        pytest.fail(f"Airflow on Celery did not start: {err}")
    workers = {}
    try:
        for name, queue, store_dir in [("beside-store", STORE_QUEUE, store), *[(w, "default", None)
                                                                                 for w in PHASE_WORKERS]]:
            folder = tmp_path / "workers" / name
            own_store = store_dir or folder / "store"
            for path in (folder, folder / "staging", own_store):
                path.mkdir(parents=True, exist_ok=True)
            log = stack.spawn(f"worker-{name}", ["celery", "worker", "-H", f"{name}@%h", "-c", "2", "-q", queue],
                              cwd=folder, env={"VMMIGRATION_STORE": str(own_store),
                                               "VMMIGRATION_STAGING": str(folder / "staging"),
                                               "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})
            workers[name] = {"log": log, "store": own_store, "staging": folder / "staging"}
        for name, worker in workers.items():
            deadline = time.monotonic() + 120
            while "ready." not in worker["log"].read_text(errors="replace"):
                proc = stack.procs[f"worker-{name}"]
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Celery worker {name} did not start:\n{worker['log'].read_text()[-3000:]}")
                time.sleep(0.5)
        yield stack, workers
    finally:
        stack.stop()


def _tasks_run_by(log: Path) -> set[str]:
    """The task ids (``disk.export_disk[0]``) a Celery worker's log says it executed."""
    text = log.read_text(errors="replace")
    found = set()
    for line in text.splitlines():
        if "Executing workload in Celery" not in line:
            continue
        task = re.search(r"task_id='([^']+)'", line)
        index = re.search(r"map_index=(-?\d+)", line)
        if task:
            found.add(f"{task.group(1)}[{index.group(1) if index else -1}]")
    return found


def _without_secrets(docs: list[dict]) -> list[dict]:
    """The demo's documents with local libvirt Providers that name no Secret (qemu:///system needs none): a
    store-file migration's Secrets stay with the store, so a worker without it could not read them."""
    for doc in docs:
        if doc["kind"] == "Provider":
            doc["spec"].pop("credentialSecretRef", None)
    return [d for d in docs if d["kind"] != "Secret"]


def test_a_migration_runs_across_celery_workers_that_share_no_store(celery_stack, store, world, postgres):
    stack, workers = celery_stack
    create_source_vm(world)
    write_store(store, "scaleout.yaml", _without_secrets(store_documents(world, name="scaleout", target_format="raw")))
    dag_id = "vmmigration__default__scaleout"
    stack.wait_for_dag(dag_id)
    run_id = stack.trigger(dag_id)

    deadline = time.monotonic() + 420
    state = None
    while time.monotonic() < deadline:
        state = stack.run_state(dag_id, run_id)
        if state in ("success", "failed"):
            break
        time.sleep(2)
    tis = stack.task_instances(dag_id, run_id)
    states = {f"{t['task_id']}[{t['map_index']}]": t["state"] for t in tis}
    assert state == "success", (states, {n: w["log"].read_text()[-2000:] for n, w in workers.items()})

    # the status, in the SQL run state on PostgreSQL (no worker has a file of it)
    run_state = SqlRunState(postgres.url)
    status = run_state.read("default", "scaleout", "status")
    assert (status["phase"], status["progress"]) == ("Ready", 100), status
    assert_target_matches_source(world, "raw")

    # where each task ran: Validating beside the store, every later task on the phase workers, on both of them
    ran = {name: _tasks_run_by(w["log"]) for name, w in workers.items()}
    everything = set(states)
    assert ran["beside-store"] == {"validate_migration[-1]"}, ran
    assert ran["w1"] | ran["w2"] == everything - {"validate_migration[-1]"}, (ran, everything)
    assert ran["w1"] and ran["w2"], f"every task ran on one worker: {ran}"
    assert not ran["w1"] & ran["w2"], ran
    assert {t["queue"] for t in tis if t["task_id"] == "validate_migration"} == {STORE_QUEUE}

    # the phase workers' folders hold no spec and no run state: the spec came from the run state
    for name in PHASE_WORKERS:
        files = [p for p in workers[name]["store"].rglob("*") if p.is_file() and ".lock" not in p.name]
        assert files == [], f"{name}'s store folder: {files}"
    kept = run_state.read("default", "scaleout", "spec")
    assert kept["files"] == ["scaleout.yaml"] and kept["secrets"] == []
    assert sorted(d["kind"] for d in kept["documents"]) == ["Provider", "Provider", "VMMigration", "VirtualMachine"]
    assert not (store / "status").exists(), "the run state is SQL: nothing of it in the dag-processor's store"
    assert not (store.parent / "staging").exists(), "no task used the dag-processor's staging folder"
