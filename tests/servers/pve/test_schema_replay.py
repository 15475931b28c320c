"""Replay the session's PVE request log against the official schema: every request a real Proxmox VE 9.1 node
would refuse (unknown path, unknown or malformed parameter, a required one missing) fails this test, listed.

The log is written by every ``pve`` test server of the session (tests/servers/pve/server.py,
``session_request_log``; ``$PVE_REQUEST_LOG`` to share one across runs): this module's own tests and, later,
the driver tests. Requests marked ``X-Pve-Test-Expect: reject`` were sent to provoke a rejection; for those the
test checks that the server did refuse them. If the session logged nothing before this test (it runs alone), it
first drives a server through a small migration-like workload so that there is something to replay.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.servers.pve import schema
from tests.servers.pve.server import PveServer, session_request_log, start_pve_server


def _workload(server: PveServer, folder: Path) -> None:
    """What a migration to Proxmox VE does: look around, upload an import volume, create a VM from it, snapshot,
    start, clean up."""
    api = server.proxmox()
    node = api.nodes("pve1")
    api.version.get()
    api.cluster.resources.get(type="vm")
    node.storage.get(content="import")
    node.network.get(type="bridge")
    image = folder / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    with open(image, "rb") as f:
        server.wait_task(node.storage("local").upload.post(content="import", filename=f))
    vmid = int(api.cluster.nextid.get())
    server.wait_task(node.qemu.post(vmid=vmid, name="replay", memory="1024", cores=1, scsihw="virtio-scsi-single",
                                    scsi0="local-lvm:0,import-from=local:import/disk.qcow2",
                                    net0="virtio,bridge=vmbr0"))
    node.qemu(vmid).config.get()
    server.wait_task(node.qemu(vmid).snapshot.post(snapname="before"))
    node.qemu(vmid).snapshot.get()
    server.wait_task(node.qemu(vmid).status.start.post())
    node.qemu(vmid).status.current.get()
    server.wait_task(node.qemu(vmid).status.stop.post())
    server.wait_task(node.qemu(vmid).delete(purge=1))
    server.wait_task(node.storage("local").content("local:import/disk.qcow2").delete())


def _entries(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def replay(entries: list[dict]) -> list[str]:
    """One line per logged request that a node would reject (or, if marked, that was not rejected)."""
    problems = []
    for e in entries:
        where = f"{e['method']} {e['path']} {json.dumps(e.get('params', {}), sort_keys=True)}"
        try:
            schema.validate(e["method"], e["path"], e.get("params") or {})
            refused = None
        except schema.Rejection as rej:
            refused = f"{rej.status} {rej.message} {json.dumps(rej.errors, sort_keys=True)}"
        if e.get("expect_reject"):
            if refused is None and e.get("status") == 200:
                problems.append(f"{where}: marked as provoking a rejection, but the server answered 200")
        elif refused is not None:
            problems.append(f"{where}: a node answers {refused} (test server said {e.get('status')})")
    return problems


def test_logged_requests_pass_the_schema(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    log = session_request_log(tmp_path_factory)
    if not _entries(log):
        with start_pve_server(tmp_path / "pve", ssh=False, request_log=log) as server:
            _workload(server, tmp_path)
    entries = _entries(log)
    assert entries, f"no requests logged in {log}"
    problems = replay(entries)
    assert not problems, f"{len(problems)} of {len(entries)} logged requests would be rejected:\n" + "\n".join(problems)


def test_replay_flags_what_a_node_rejects() -> None:
    good = {"method": "GET", "path": "/nodes/pve1/qemu/100/config", "params": {}, "status": 200}
    bad = {"method": "POST", "path": "/nodes/pve1/qemu", "params": {"vmid": "100", "cores": "0"}, "status": 200}
    unknown = {"method": "GET", "path": "/nodes/pve1/nothing", "params": {}, "status": 501}
    provoked = {"method": "POST", "path": "/nodes/pve1/qemu", "params": {}, "status": 400, "expect_reject": True}
    problems = replay([good, bad, unknown, provoked])
    assert len(problems) == 2
    assert "cores" in problems[0] and "501" in problems[1]
