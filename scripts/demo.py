"""The demo: a real migration on embedded defaults (see README).

Creates (once) a source VM with two disks of real data on the local libvirtd, writes the
VMMigration and its inventory into the spec store, starts Airflow on 127.0.0.1, triggers the
migration through the REST API, follows its status until Ready or Failed, and prints where to look.
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
from include.store import FileStatusSink, SpecStore  # noqa: E402

DAG_ID = "vmmigration__default__demo"


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


def _stop(var: Path) -> None:
    pids = var / "airflow" / "pids.json"
    if not pids.exists():
        print("no demo Airflow is running")
        return
    for name, pid in json.loads(pids.read_text()).items():
        try:
            os.killpg(pid, signal.SIGTERM)
            print(f"stopped airflow {name} ({pid})")
        except ProcessLookupError:
            pass
    pids.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", nargs="?", default="run", choices=["run", "stop"])
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8080")))
    args = parser.parse_args()
    var = Path(os.environ.get("VMMIG_VAR", ROOT / "var"))
    if args.action == "stop":
        _stop(var)
        return 0
    _stop(var) if (var / "airflow" / "pids.json").exists() else None

    world = DemoWorld(uri=os.environ.get("DEMO_LIBVIRT_URI", "qemu:///system"), prefix="demo", root=var / "demo")
    world.share.mkdir(parents=True, exist_ok=True)
    print(f"source VM {world.vm_name}: two disks (qcow2) with real data in pool {world.source_pool}")
    create_source_vm(world, vda_mib=1024, vdb_mib=512, data_scale=4)
    _reset_target(world)
    store = SpecStore(os.environ.get("VMMIGRATION_STORE", var / "store"))
    spec_file = write_store(store.root, "demo.yaml", store_documents(world, name="demo", target_format="raw"))
    print(f"VMMigration default/demo written to {spec_file}")

    home = var / "airflow"
    stack = AirflowStack(home=home, port=args.port, env=stack_env(home, args.port))
    print(f"starting Airflow on http://127.0.0.1:{args.port} (logs in {home / 'component-logs'}) ...")
    stack.start()
    (home / "pids.json").write_text(json.dumps({k: p.pid for k, p in stack.procs.items()}))
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


if __name__ == "__main__":
    sys.exit(main())
