"""A local Airflow (API server, scheduler, dag-processor, triggerer) on loopback, driven through its
REST API. Used by the demo and by the end-to-end tests.

The components run separately (not ``airflow standalone``) so that SIGTERM stops each cleanly;
see ../shared/ENVIRONMENT.md. The environment must already carry the project's Airflow settings
(``scripts/airflow_env.sh`` or the test conftest).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AirflowStack:
    home: Path
    port: int
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _airflow(self) -> str:
        return str(Path(sys.executable).parent / "airflow")

    def start(self, timeout: float = 90.0) -> None:
        logs = self.home / "component-logs"
        logs.mkdir(parents=True, exist_ok=True)
        subprocess.run([self._airflow(), "db", "migrate"], env=self.env, check=True, capture_output=True)
        pools = Path(__file__).resolve().parent.parent / "config" / "pools.json"
        subprocess.run([self._airflow(), "pools", "import", str(pools)], env=self.env, check=True,
                       capture_output=True)
        for comp in COMPONENTS:
            self._spawn(comp)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for comp, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"airflow {comp} exited ({proc.returncode}); see {logs / (comp + '.log')}:\n"
                                       + (logs / f"{comp}.log").read_text()[-3000:])
            try:
                health = self.get("/api/v2/monitor/health")
                if all(health.get(k, {}).get("status") == "healthy" for k in ("metadatabase", "scheduler",
                                                                                "dag_processor")):
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Airflow did not become healthy in {timeout:.0f}s; logs in {logs}")

    def _spawn(self, comp: str) -> None:
        self.spawn(comp, comp.split())

    def spawn(self, name: str, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
              ) -> Path:
        """Start ``airflow <args>`` as the component ``name`` (a Celery worker, say: ``["celery", "worker", ...]``),
        with ``env`` over the stack's environment and in the folder ``cwd``; its log file. ``stop`` and
        ``stop_component`` stop it with the others."""
        log = self.home / "component-logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")  # noqa: SIM115 - kept open for the process's life
        self.procs[name] = subprocess.Popen([self._airflow(), *args], env={**self.env, **(env or {})}, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            cwd=str(cwd) if cwd else None)
        return log

    def stop_component(self, comp: str, timeout: float = 15.0) -> None:
        """Stop one component (SIGTERM to its process group, SIGKILL after ``timeout``); ``start_component``
        starts it again (its log goes on)."""
        proc = self.procs[comp]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def start_component(self, comp: str) -> None:
        self._spawn(comp)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    # -- REST ----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")

    def get(self, path: str) -> dict:
        return self._request("GET", path)

    def wait_for_dag(self, dag_id: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get(f"/api/v2/dags/{dag_id}")
                return
            except urllib.error.HTTPError as err:
                if err.code != 404:
                    raise
            time.sleep(1)
        errors = self.get("/api/v2/importErrors")
        raise RuntimeError(f"DAG {dag_id} did not appear in {timeout:.0f}s; import errors: {errors}")

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        run = self._request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def unpause(self, dag_id: str) -> None:
        self._request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def runs(self, dag_id: str, state: str | None = None) -> list[dict]:
        """The DAG's runs (oldest first), each as the REST API gives it (``dag_run_id``, ``state``, ...); none for
        a DAG not parsed yet."""
        query = "?order_by=id&limit=100" + (f"&state={state}" if state else "")
        try:
            return self.get(f"/api/v2/dags/{dag_id}/dagRuns{query}")["dag_runs"]
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return []
            raise

    def set_run_state(self, dag_id: str, run_id: str, state: str) -> None:
        """Mark a run ``failed`` or ``success`` (as the UI does; its running tasks are stopped)."""
        quoted = urllib.parse.quote(run_id, safe="")
        self._request("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}", {"state": state})

    def run_state(self, dag_id: str, run_id: str) -> str:
        quoted = urllib.parse.quote(run_id, safe="")
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{quoted}")["state"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        """The run's task instances as the REST API gives them (``task_id``, ``map_index``, ``state``, ``hostname``,
        ``queue``, ...)."""
        quoted = urllib.parse.quote(run_id, safe="")
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances?limit=100")["task_instances"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        return {f"{t['task_id']}[{t['map_index']}]": t["state"] for t in self.task_instances(dag_id, run_id)}


def stack_env(home: Path, port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(base if base is not None else os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__PARALLELISM": env.get("AIRFLOW__CORE__PARALLELISM", "4"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "2",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "2",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
    })
    return env
