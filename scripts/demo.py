"""The demo: a real migration on embedded defaults (see README).

Creates (once) a source VM with two disks of real data on the local libvirtd, writes the
VMMigration and its inventory into the spec store, starts Airflow on 127.0.0.1, triggers the
migration through the REST API, follows its status until Ready or Failed, and prints where to look.

``--kubernetes``: the same migration through a local kube-apiserver instead (scripts/demo_kubernetes.py): the
VMMigration and its inventory are applied to the cluster, Airflow's watcher DAG finds it and starts its run, and
the VMMigration is followed in the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from airflow_stack import AirflowStack, stack_env  # noqa: E402

from include.demo import DemoWorld, create_source_vm, store_documents, write_store  # noqa: E402
from include.kube_sync import mirror_path, read_header, run_id_for  # noqa: E402
from include.store import FileStatusSink, SpecStore  # noqa: E402

DAG_ID = "vmmigration__default__demo"
SPEC_FILE = "demo.yaml"


def _reset_target(world: DemoWorld) -> None:
    """The demo's own target from an earlier demo run goes, so the demo can run again."""
    import libvirt

    conn = world.conn()
    try:
        try:
            dom = conn.lookupByName(f"{world.vm_name}-migrated")
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        except libvirt.libvirtError:
            pass
        pool = conn.storagePoolLookupByName(world.target_pool)
        pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            vol.delete(0)
    finally:
        conn.close()


def _stop(var: Path, *, quiet: bool = False) -> None:
    """Stop what an earlier demo left running: its Airflow and (``--kubernetes``) its API server."""
    from demo_kubernetes import alive, stop_cluster

    pids = var / "airflow" / "pids.json"
    if pids.exists():
        stopped = []
        for name, pid in json.loads(pids.read_text()).items():
            try:
                os.killpg(pid, signal.SIGTERM)
                print(f"stopped airflow {name} ({pid})")
                stopped.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20  # its port and log server ports are free again before a new one starts
        while stopped and time.monotonic() < deadline:
            stopped = [pid for pid in stopped if alive(pid)]
            time.sleep(0.2)
        pids.unlink()
    elif not quiet:
        print("no demo Airflow is running")
    if not stop_cluster(var / "kube") and not quiet:
        print("no demo API server is running")


def _forget_previous(store: SpecStore) -> None:
    """default/demo is defined once: the other variant's spec of it goes (the folder demo's file, or the mirror an
    earlier --kubernetes demo's watcher wrote of a cluster that is gone now)."""
    (store.root / SPEC_FILE).unlink(missing_ok=True)
    mirror = mirror_path(store.root, "default", "demo")
    if read_header(mirror) is not None:
        mirror.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", nargs="?", default="run", choices=["run", "stop"])
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8080")))
    parser.add_argument("--kubernetes", action="store_true",
                        help="through a local kube-apiserver: kubectl apply, the watcher DAG, status in the cluster")
    args = parser.parse_args()
    var = Path(os.environ.get("VMMIG_VAR", ROOT / "var"))
    if args.action == "stop":
        _stop(var)
        return 0
    _stop(var, quiet=True)

    world = DemoWorld(uri=os.environ.get("DEMO_LIBVIRT_URI", "qemu:///system"), prefix="demo", root=var / "demo")
    world.share.mkdir(parents=True, exist_ok=True)
    print(f"source VM {world.vm_name}: two disks (qcow2) with real data in pool {world.source_pool}")
    create_source_vm(world, vda_mib=1024, vdb_mib=512, data_scale=4)
    _reset_target(world)
    store = SpecStore(os.environ.get("VMMIGRATION_STORE", var / "store"))
    _forget_previous(store)
    docs = store_documents(world, name="demo", target_format="raw")
    if args.kubernetes:
        return _kubernetes(args, var, world, docs)
    spec_file = write_store(store.root, SPEC_FILE, docs)
    print(f"VMMigration default/demo written to {spec_file}")

    home = var / "airflow"
    stack = _start_airflow(home, args.port, {})
    stack.wait_for_dag(DAG_ID)
    run_id = stack.trigger(DAG_ID)
    print(f"triggered {DAG_ID} run {run_id}")
    sink = FileStatusSink(store)
    last = None
    status: dict = {}
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        status = sink.get("default", "demo") or {}
        line = f"[{status.get('phase', 'Pending'):>16}] {status.get('progress', 0):3d}%  {status.get('message', '')}"
        if line != last:
            print(line, flush=True)
            last = line
        if status.get("phase") in ("Ready", "Failed") and stack.run_state(DAG_ID, run_id) in ("success", "failed"):
            break
        time.sleep(1)
    print()
    print(f"Airflow UI:   http://127.0.0.1:{args.port}/dags/{DAG_ID}  (still running; stop: ./scripts/demo.sh stop)")
    print(f"status:       .venv/bin/python -m include status default/demo --store {store.root}")
    print(f"target VM:    virsh -c {world.uri} dominfo {world.vm_name}-migrated")
    print(f"              virsh -c {world.uri} vol-list {world.target_pool}")
    return 0 if status.get("phase") == "Ready" else 1


def _start_airflow(home: Path, port: int, extra_env: dict[str, str]) -> AirflowStack:
    stack = AirflowStack(home=home, port=port, env={**stack_env(home, port), **extra_env})
    print(f"starting Airflow on http://127.0.0.1:{port} (logs in {home / 'component-logs'}) ...")
    stack.start()
    (home / "pids.json").write_text(json.dumps({k: p.pid for k, p in stack.procs.items()}))
    return stack


def _kubernetes(args: argparse.Namespace, var: Path, world: DemoWorld, docs: list[dict]) -> int:
    """The Quick Start through a local API server: kubectl apply, the watcher DAG, kubectl get -w, describe."""
    import demo_kubernetes as k8s

    port = int(os.environ["DEMO_KUBE_PORT"]) if os.environ.get("DEMO_KUBE_PORT") else None
    print(f"starting kube-apiserver and etcd (logs in {var / 'kube'}) ...")
    kube = k8s.start_cluster(var / "kube", port=port)
    print(f"kube-apiserver {kube.url}: CRDs of deploy/crds applied, the engine's identity of deploy/rbac/engine.yaml")
    k8s.apply_documents(kube, docs[1:])
    print("applied VirtualMachine, Providers and Secret: " + ", ".join(
        f"{d['kind']} {d['metadata']['name']}" for d in docs[1:]))
    home = var / "airflow"
    stack = _start_airflow(home, args.port, k8s.connection_env(kube.kubeconfig(k8s.ENGINE)))
    stack.wait_for_dag(k8s.WATCHER_DAG)
    for state in ("running", "queued"):  # a round of an earlier demo's watcher, watching a cluster that is gone
        for run in stack.runs(k8s.WATCHER_DAG, state):
            stack.set_run_state(k8s.WATCHER_DAG, run["dag_run_id"], "failed")
    stack.unpause(k8s.WATCHER_DAG)
    print(f"watcher DAG {k8s.WATCHER_DAG} unpaused")
    migration = k8s.apply_documents(kube, docs[:1])[0]
    uid = migration["metadata"]["uid"]
    run_id = run_id_for(uid, migration["metadata"]["generation"])
    print(f"kubectl apply: vmmigration.{k8s.GROUP}/demo created (uid {uid}); its run will be {run_id}")
    stack.wait_for_dag(DAG_ID, timeout=300)  # the watcher mirrors it, the dag-processor parses the mirror
    stack.unpause(DAG_ID)
    print()

    def run_ended(_obj: dict) -> bool:
        try:
            return stack.run_state(DAG_ID, run_id) in ("success", "failed")
        except OSError:  # not triggered yet (404), or the API server is busy
            return False

    final = k8s.follow(kube, "default", "demo", until=run_ended)
    print()
    print("\n".join(k8s.describe(kube, "default", "demo")))
    runs = [r["dag_run_id"] for r in stack.runs(DAG_ID) if r["dag_run_id"].startswith(f"k8s__{uid}__")]
    print()
    print(f"runs of {DAG_ID} for this VMMigration: {', '.join(runs) or 'none'}")
    kubeconfig = kube.kubeconfig("admin")
    api = f"{kube.url}/apis/{k8s.GROUP}/{k8s.VERSION}/namespaces/default/vmmigrations/demo"
    print(f"Airflow UI:   http://127.0.0.1:{args.port}/dags/{DAG_ID}/runs/{run_id}  (still running, as is the "
          f"API server; stop both: ./scripts/demo.sh stop)")
    print(f"watcher:      http://127.0.0.1:{args.port}/dags/{k8s.WATCHER_DAG}")
    print(f"kubeconfig:   {kubeconfig}  (admin; the engine's: {kube.kubeconfig(k8s.ENGINE)})")
    print(f"kubectl:      KUBECONFIG={kubeconfig} kubectl get vmmigration demo -w   (or describe vmmigration demo)")
    print(f"curl:         curl -s --cacert {kube.ca_path} -H \"Authorization: Bearer $(sed -n 's/^ *token: //p' "
          f"{kubeconfig})\" {api}")
    print(f"target VM:    virsh -c {world.uri} dominfo {world.vm_name}-migrated")
    return 0 if (final.get("status") or {}).get("phase") == "Ready" else 1


if __name__ == "__main__":
    sys.exit(main())
