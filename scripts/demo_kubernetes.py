"""The demo's Kubernetes variant (``./scripts/demo.sh --kubernetes``, see README): the guide's Quick Start on a
local kube-apiserver. A fresh cluster (the tests' ``KubeApiServer``: kube-apiserver and etcd on loopback, the
project's CRDs), the engine's identity of deploy/rbac/engine.yaml, the VMMigration and what it names applied to
it, Airflow told of the cluster through a kubernetes connection; the watcher DAG ``vmmigration_kubernetes``
finds the VMMigration and starts its run, and the VMMigration is followed in the cluster as
``kubectl get vmmigration -w`` and ``kubectl describe vmmigration`` would show it.

The API server keeps running after the demo (as the Airflow does) until ``./scripts/demo.sh stop``.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION = "infra.virtrigaud.io", "v1beta1"
CONN_ID = "vmmigration_k8s"
ENGINE = "engine-sa"
WATCHER_DAG = "vmmigration_kubernetes"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


def start_cluster(workdir: Path, *, port: int | None = None):
    """A fresh cluster in ``workdir`` (an earlier one there is removed first) that outlives this process, with
    the engine's identity; the pids and where things are in ``workdir/cluster.json``."""
    from tests.servers.kube_api import start_kube_api

    shutil.rmtree(workdir, ignore_errors=True)
    kube = start_kube_api(workdir, port=port, detached=True)
    try:
        engine_identity(kube)
        (workdir / "cluster.json").write_text(json.dumps({
            "url": kube.url, "pids": kube.pids, "ca": str(kube.ca_path),
            "kubeconfig": str(kube.kubeconfig("admin")), "engine_kubeconfig": str(kube.kubeconfig(ENGINE))}))
    except BaseException:
        kube.stop()
        raise
    return kube


def stop_cluster(workdir: Path) -> bool:
    """Stop the cluster ``start_cluster`` left running in ``workdir`` (SIGTERM to each process group, then
    SIGKILL); False when there is none."""
    state = workdir / "cluster.json"
    if not state.exists():
        return False
    pids = json.loads(state.read_text()).get("pids") or {}
    for name in ("kube-apiserver", "etcd"):  # the API server first: it drains, then its store goes
        pid = pids.get(name)
        if not pid:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.2)
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)
        print(f"stopped {name} ({pid})")
    state.unlink()
    return True


def alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (its parent, this demo's earlier process, is gone and nobody reaps it) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def engine_identity(kube) -> str:
    """The engine's ServiceAccount (deploy/rbac/engine.yaml applied as it is) and a token for it: the identity
    Airflow uses."""
    kube.apply_yaml({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "vmmigration"}})
    kube.apply_yaml(ROOT / "deploy" / "rbac" / "engine.yaml")
    if ENGINE not in kube.identities:
        kube.add_service_account("vmmigration-engine", "vmmigration", identity=ENGINE)
    return ENGINE


def connection_env(kubeconfig: Path) -> dict[str, str]:
    """The environment that tells Airflow of the cluster: a kubernetes connection and the variable naming it."""
    conn = {"conn_type": "kubernetes", "extra": {"kube_config_path": str(kubeconfig)}}
    return {f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(conn), "VMMIGRATION_KUBERNETES_CONN_ID": CONN_ID}


def apply_documents(kube, docs: Iterable[dict[str, Any]], identity: str = "admin") -> list[dict[str, Any]]:
    """``kubectl apply`` of the documents (server-side apply), in order. A VirtualMachine's status (its id on the
    hypervisor) is then written through its ``/status``, as its provider would have; any other status is left
    out (the engine writes the VMMigration's)."""
    stored = []
    for doc in docs:
        doc = copy.deepcopy(doc)
        status = doc.pop("status", None)
        stored += kube.apply_yaml(doc, identity)
        if doc["kind"] == "VirtualMachine" and status:
            meta = doc["metadata"]
            kube.request("PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/{meta['namespace']}/virtualmachines/"
                         f"{meta['name']}/status", identity=identity, body={"status": status},
                         headers={"Content-Type": "application/merge-patch+json"})
    return stored


def get_migration(kube, namespace: str, name: str, identity: str = "admin") -> dict[str, Any]:
    return kube.request("GET", _path(namespace, name), identity=identity)[1]


def _path(namespace: str, name: str = "") -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/vmmigrations" + (f"/{name}" if name else "")


def table_row(kube, namespace: str, name: str, identity: str = "admin") -> dict[str, Any]:
    """The VMMigration as ``kubectl get`` prints it: the CRD's printer columns (Name, Phase, Progress, ...), as
    the API server's Table gives them."""
    table = kube.request("GET", _path(namespace, name), identity=identity, headers={"Accept": TABLE})[1]
    columns = [c["name"] for c in table["columnDefinitions"]]
    return dict(zip(columns, table["rows"][0]["cells"], strict=True))


def _age(since: str, now: datetime.datetime) -> str:
    """A timestamp as kubectl shows an age (``45s``, ``3m12s``, ``2h5m``)."""
    then = datetime.datetime.strptime(since, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = max(int((now - then).total_seconds()), 0)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60}s" if seconds < 600 else f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60}m"


def follow(kube, namespace: str, name: str, *, timeout: float = 1800, interval: float = 1.0,
           out: Callable[[str], None] = print, until: Callable[[dict[str, Any]], bool] | None = None,
           rows: list[dict[str, Any]] | None = None) -> dict:
    """Print the VMMigration's row each time its phase, progress or message changes, as ``kubectl get vmmigration
    NAME -w`` would (its columns, plus the status message), until ``until(obj)`` says so (default: its phase is
    Ready or Failed; the demo waits for its Airflow run to end, the record a failed status write cannot lose) or
    ``timeout`` s have passed; returns the object as last read. Each row printed is also appended to ``rows`` (the
    columns by name, and ``Message``), if given."""
    widths = {"Name": max(len(name), 4), "Phase": 16, "Progress": 8, "Source": 12, "Target": 18, "Storage": 7,
              "Age": 6}
    out("   ".join(k.upper().ljust(w) for k, w in widths.items()) + "   MESSAGE")
    last, obj, finished = None, {}, False
    deadline = time.monotonic() + timeout
    while True:
        obj = get_migration(kube, namespace, name)
        status = obj.get("status") or {}
        row = table_row(kube, namespace, name)
        key = (row.get("Phase"), row.get("Progress"), status.get("message"))
        if key != last:
            if rows is not None:
                rows.append({**row, "Message": status.get("message")})
            out("   ".join(("" if row.get(k) is None else str(row.get(k))).ljust(w) for k, w in widths.items())
                + "   " + str(status.get("message") or ""))
            last = key
        if finished or time.monotonic() > deadline:
            return obj
        # once it is over, one more read: the row of the last change is printed too
        finished = until(obj) if until else status.get("phase") in ("Ready", "Failed")
        if not finished:
            time.sleep(interval)


def events(kube, namespace: str, name: str) -> list[dict[str, Any]]:
    """The Events about the VMMigration, oldest first."""
    items = kube.request("GET", f"/api/v1/namespaces/{namespace}/events")[1].get("items") or []
    mine = [e for e in items if (e.get("involvedObject") or {}).get("name") == name
            and (e.get("involvedObject") or {}).get("kind") == "VMMigration"]
    return sorted(mine, key=event_order)


def event_order(event: dict[str, Any]) -> tuple[str, int, str]:
    """Oldest first: timestamps have whole seconds, so within one second the API server's resourceVersion (etcd's
    revision at creation, a number on every API server we know) orders them; the generated name is random."""
    meta = event.get("metadata") or {}
    version = str(meta.get("resourceVersion") or "")
    return (event.get("firstTimestamp") or event.get("eventTime") or meta.get("creationTimestamp") or "",
            int(version) if version.isdigit() else 0, meta.get("name") or "")


def describe(kube, namespace: str, name: str) -> list[str]:
    """The VMMigration's conditions and Events, as ``kubectl describe vmmigration NAME`` lists them."""
    obj = get_migration(kube, namespace, name)
    meta, status = obj["metadata"], obj.get("status") or {}
    lines = [f"Name:         {meta['name']}", f"Namespace:    {meta['namespace']}", f"UID:          {meta['uid']}",
             f"Generation:   {meta.get('generation')}", "Status:",
             f"  Phase:            {status.get('phase')}", f"  Progress:         {status.get('progress')}",
             f"  Start Time:       {status.get('startTime')}",
             f"  Completion Time:  {status.get('completionTime')}", f"  Message:          {status.get('message')}",
             "  Conditions:"]
    conditions = status.get("conditions") or []
    rows = [("Type", "Status", "Reason", "Last Transition Time", "Message")]
    rows += [(c.get("type", ""), c.get("status", ""), c.get("reason", ""), c.get("lastTransitionTime", ""),
              c.get("message", "")) for c in conditions]
    lines += _columns(rows, indent="    ")
    lines.append("Events:")
    now = datetime.datetime.now(datetime.UTC)
    rows = [("Type", "Reason", "Age", "From", "Message")]
    for e in events(kube, namespace, name):
        count = e.get("count") or 1
        age = _age(e.get("lastTimestamp") or e["metadata"]["creationTimestamp"], now)
        rows.append((e.get("type", ""), e.get("reason", ""), age + (f" (x{count})" if count > 1 else ""),
                     (e.get("source") or {}).get("component", "") or e.get("reportingComponent", ""),
                     e.get("message", "")))
    lines += _columns(rows, indent="  ") if len(rows) > 1 else ["  <none>"]
    return lines


def _columns(rows: list[tuple[str, ...]], indent: str) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    rule = tuple("-" * len(h) for h in rows[0])
    out = []
    for row in [rows[0], rule, *rows[1:]]:
        out.append(indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + str(row[-1]))
    return out
