"""Tools for the fault tests (tests/e2e/test_faults.py): a real Airflow stack with extra settings,
status polling, finding a task's process, restarting libvirtd, and fingerprints of a source VM taken
from its guest-visible content (a libvirt snapshot rewrites a qcow2 file's metadata, so the file's
own sha256 is not what "intact" means; the bytes the guest sees are)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from include.demo import DemoWorld, store_documents
from include.store import FileStatusSink, SpecStore

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

from airflow_stack import AirflowStack, free_port, stack_env  # noqa: E402

ZEROS = bytes(4 * 1024 * 1024)


# -- content -------------------------------------------------------------------------------------------
def guest_sha256(path: str | os.PathLike[str], fmt: str) -> str:
    """sha256 of what the guest sees (holes read as zeros), read through the image's map."""
    from include import diskio

    h = hashlib.sha256()
    for seg in diskio.guest_segments(path, fmt):
        if seg.data is not None:
            h.update(seg.data)
            continue
        left = seg.length
        while left:
            n = min(left, len(ZEROS))
            h.update(ZEROS[:n] if n < len(ZEROS) else ZEROS)
            left -= n
    return h.hexdigest()


def source_fingerprint(world: DemoWorld) -> dict[str, Any]:
    """The source VM's definition (disk targets and files) and each disk's guest-visible sha256."""
    import xml.etree.ElementTree as ET

    conn = world.conn()
    try:
        dom = conn.lookupByName(world.vm_name)
        root = ET.fromstring(dom.XMLDesc(0))
        disks = {}
        for disk in root.findall("./devices/disk[@device='disk']"):
            dev = disk.find("target").get("dev")
            path = disk.find("source").get("file")
            fmt = disk.find("driver").get("type")
            disks[dev] = {"path": path, "format": fmt, "sha256": guest_sha256(path, fmt)}
        return {"vm": dom.name(), "uuid": dom.UUIDString(), "disks": disks}
    finally:
        conn.close()


def assert_source_intact(world: DemoWorld, before: dict[str, Any], created: dict[str, str] | None = None) -> None:
    """The source VM is still defined, with the same disk files, each holding the same guest data
    (and, when ``created`` is given, the data create_source_vm wrote)."""
    after = source_fingerprint(world)
    assert after == before, f"source changed:\nbefore {before}\nafter  {after}"
    for disk, digest in (created or {}).items():
        assert after["disks"][disk]["sha256"] == digest, f"source {disk} no longer holds the data written"


def target_state(world: DemoWorld, vm: str, pool: str | None = None) -> dict[str, Any]:
    """The target VM's presence and the volumes in the target pool."""
    conn = world.conn()
    try:
        p = conn.storagePoolLookupByName(pool or world.target_pool)
        p.refresh(0)
        return {"vm": vm in [d.name() for d in conn.listAllDomains(0)],
                "volumes": sorted(v.name() for v in p.listAllVolumes(0)),
                "paths": {v.name(): v.path() for v in p.listAllVolumes(0)}}
    finally:
        conn.close()


# -- documents --------------------------------------------------------------------------------------------
def s3_documents(world: DemoWorld, name: str, server, *, retry: dict | None = None, **kw: Any) -> list[dict]:
    docs = store_documents(world, name=name, extra_spec={
        "storage": {"type": "s3", "bucket": "vm-migrations", "endpoint": server.endpoint, "region": "us-east-1",
                    "credentialsSecretRef": {"name": f"{name}-s3"}},
        **({"retryPolicy": retry} if retry else {}),
    }, **kw)
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-s3", "namespace": "default"},
                 "stringData": {"accessKey": server.access_key, "secretKey": server.secret_key}})
    return docs


# -- status -----------------------------------------------------------------------------------------------
def wait_status(store: Path, name: str, until: Callable[[dict[str, Any]], bool], *, timeout: float,
                namespace: str = "default", interval: float = 0.1) -> dict[str, Any]:
    """Poll the status document until ``until(status)``; returns it, or raises TimeoutError with the last one."""
    sink = FileStatusSink(SpecStore(store))
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status = sink.get(namespace, name) or {}
        except (ValueError, OSError):  # written atomically, but be lenient
            status = {}
        if until(status):
            return status
        time.sleep(interval)
    raise TimeoutError(f"status of {namespace}/{name} did not reach the expected state in {timeout:.0f}s: "
                       f"{status}")


def disk_status(status: dict[str, Any], disk: str) -> dict[str, Any]:
    return next((d for d in status.get("disks", []) if d.get("name") == disk), {})


def in_progress(phase: str, disk: str, *, min_fraction: float = 0.0) -> Callable[[dict[str, Any]], bool]:
    """``disk`` is in ``phase`` with 0 < bytesDone < bytesTotal (and at least ``min_fraction`` done)."""
    def check(status: dict[str, Any]) -> bool:
        if status.get("phase") in ("Ready", "Failed"):
            raise AssertionError(f"the migration ended before {disk} was caught in {phase}: {status}")
        d = disk_status(status, disk)
        done, total = d.get("bytesDone", 0), d.get("bytesTotal", 0)
        return d.get("phase") == phase and 0 < done < total and done >= total * min_fraction

    return check


def finished(status: dict[str, Any]) -> bool:
    return status.get("phase") in ("Ready", "Failed")


def failed_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == "Failed"), {})


def assert_no_failed_interlude(status: dict[str, Any]) -> None:
    """A migration that Airflow retried to Ready never showed Failed (a final phase) on the way, and
    carries no Failed condition afterwards."""
    history = [h["phase"] for h in status.get("phaseHistory", [])]
    assert "Failed" not in history, (f"the status went Failed while Airflow was retrying: {history}",
                                     failed_condition(status))
    assert not failed_condition(status), status.get("conditions")


# -- the Airflow stack -----------------------------------------------------------------------------------
def start_stack(home: Path, extra_env: dict[str, str] | None = None) -> AirflowStack:
    """A real Airflow (api-server, scheduler, dag-processor, triggerer) on a free loopback port, with the
    current environment (spec store, loopback permission...) plus ``extra_env``."""
    port = free_port()
    env = stack_env(home, port, dict(os.environ))
    env.update(extra_env or {})
    stack = AirflowStack(home=home, port=port, env=env)
    try:
        stack.start()
    except Exception:
        stack.stop()
        raise
    return stack


class BackgroundStack:
    """``start_stack`` in a thread, so that a test prepares its disks while Airflow starts.

    ``get()`` waits for it (raising what the start raised); ``stop()`` stops it whenever it got."""

    def __init__(self, home: Path, extra_env: dict[str, str] | None = None) -> None:
        import threading

        self._result: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(home, extra_env), daemon=True)
        self._thread.start()

    def _run(self, home: Path, extra_env: dict[str, str] | None) -> None:
        try:
            self._result["stack"] = start_stack(home, extra_env)
        except BaseException as err:  # noqa: BLE001 - re-raised by get()
            self._result["error"] = err

    def get(self, timeout: float = 180.0) -> AirflowStack:
        self._thread.join(timeout)
        if "error" in self._result:
            raise self._result["error"]
        if "stack" not in self._result:
            raise TimeoutError(f"Airflow did not start in {timeout:.0f}s")
        return self._result["stack"]

    def stop(self) -> None:
        self._thread.join(180)
        if "stack" in self._result:
            self._result["stack"].stop()


def task_instance(stack: AirflowStack, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict:
    run = urllib.parse.quote(run_id, safe="")
    path = f"/api/v2/dags/{dag_id}/dagRuns/{run}/taskInstances/{task_id}"
    return stack.get(path + (f"/{map_index}" if map_index >= 0 else ""))


def wait_run_state(stack: AirflowStack, dag_id: str, run_id: str, *, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    state = stack.run_state(dag_id, run_id)
    while state not in ("success", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        state = stack.run_state(dag_id, run_id)
    return state


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def task_runner_pids(ti_id: str) -> list[int]:
    """The Airflow 3 task runner processes of one task instance: the supervisor's child names itself
    ``airflow worker -- <task instance id>`` (setproctitle in airflow.sdk.execution_time.task_runner)."""
    want = f"airflow worker -- {ti_id}"
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(int(p.name)) == want]


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is gone for our purposes (its parent has not reaped it yet)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.05)
    return process_gone(pid)


# -- libvirtd ----------------------------------------------------------------------------------------------
def libvirtd_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and _cmdline(int(p.name)).split(" ")[0] == "/usr/sbin/libvirtd"]


def restart_libvirtd(timeout: float = 20.0) -> dict[str, Any]:
    """Stop the running libvirtd (SIGTERM, SIGKILL after ``timeout``) and start it again the way
    scripts/libvirtd.sh does; returns the old and new pids."""
    old = libvirtd_pids()
    if not old:
        raise RuntimeError("no libvirtd is running")
    for pid in old:
        os.kill(pid, signal.SIGTERM)
    for pid in old:
        if not wait_gone(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 5)
    down = time.monotonic()
    start_libvirtd()
    new = libvirtd_pids()
    return {"old": old, "new": new, "downSeconds": time.monotonic() - down}


def start_libvirtd() -> None:
    """scripts/libvirtd.sh; its output goes to a file, not a pipe: the daemon it backgrounds (and the
    subshell around it) keep their stdout open, so a pipe would never see EOF."""
    import tempfile

    with tempfile.TemporaryFile() as out:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "libvirtd.sh")], stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=180)
        if proc.returncode != 0:
            out.seek(0)
            raise RuntimeError(f"libvirtd did not start again: {out.read().decode(errors='replace')}")
