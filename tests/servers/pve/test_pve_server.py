"""The Proxmox VE test server answers as a node does: auth, schema validation, VMs, storage, tasks, SSH stand-ins.

Some tests use proxmoxer (the client library the project pins) to make sure a real client works against it.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
import requests
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException

from tests.servers.pve.server import PveServer, start_pve_server


def _image(folder: Path, name: str, fmt: str, payload: bytes, size: str = "64M") -> Path:
    """A disk image with ``payload`` at its start: raw written, then converted to ``fmt``."""
    raw = folder / f"{name}.src.raw"
    raw.write_bytes(payload)
    subprocess.run(["qemu-img", "resize", "-q", "-f", "raw", str(raw), size], check=True)
    out = folder / f"{name}.{fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(out)], check=True)
    return out


def _same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True).returncode == 0


def _session(pve: PveServer) -> requests.Session:
    s = requests.Session()
    s.verify = str(pve.ca_file)
    s.trust_env = False
    return s


# -- auth ---------------------------------------------------------------------------------------------------------
def test_token_auth_with_proxmoxer(pve: PveServer) -> None:
    api = pve.proxmox()
    assert api.version.get()["release"] == "9.1"
    assert [n["node"] for n in api.nodes.get()] == ["pve1"]


def test_ticket_auth_and_csrf(pve: PveServer) -> None:
    api = ProxmoxAPI(pve.host, port=pve.port, user=pve.user, password=pve.password, verify_ssl=str(pve.ca_file),
                     backend="https")
    assert api.cluster.nextid.get() == "100"
    api.nodes("pve1").qemu.post(vmid=100, name="by-ticket", memory="512")  # POST: proxmoxer sends the CSRF token
    s = _session(pve)
    login = s.post(f"{pve.url}/access/ticket", data={"username": "root@pam", "password": pve.password}).json()["data"]
    assert login["username"] == "root@pam" and login["ticket"].startswith("PVE:root@pam:")
    cookie = {"PVEAuthCookie": login["ticket"]}
    assert s.get(f"{pve.url}/nodes", cookies=cookie).status_code == 200  # GET needs no CSRF token
    no_csrf = s.post(f"{pve.url}/nodes/pve1/qemu", cookies=cookie, data={"vmid": 101},
                     headers={"X-Pve-Test-Expect": "reject"})
    assert no_csrf.status_code == 401 and no_csrf.json() == {"data": None}
    assert "csrf" in no_csrf.reason.lower()
    ok = s.post(f"{pve.url}/nodes/pve1/qemu", cookies=cookie, data={"vmid": 101},
                headers={"CSRFPreventionToken": login["CSRFPreventionToken"]})
    assert ok.status_code == 200 and ok.json()["data"].startswith("UPID:pve1:")
    bad = s.get(f"{pve.url}/nodes", cookies={"PVEAuthCookie": login["ticket"][:-4] + "AAAA"},
                headers={"X-Pve-Test-Expect": "reject"})
    assert (bad.status_code, bad.reason) == (401, "permission denied - invalid PVE ticket")
    wrong = s.post(f"{pve.url}/access/ticket", data={"username": "root@pam", "password": "wrong"},
                   headers={"X-Pve-Test-Expect": "reject"})
    assert (wrong.status_code, wrong.reason, wrong.json()) == (401, "authentication failure", {"data": None})


def test_wrong_or_missing_token_is_401(pve: PveServer) -> None:
    status, reason, body = pve.raw("GET", "/nodes", headers={
        "Authorization": f"PVEAPIToken={pve.token_id}=00000000-0000-0000-0000-000000000000"}, expect_reject=True)
    assert (status, reason, body) == (401, "authentication failure", {"data": None})
    status, reason, body = pve.raw("GET", "/nodes", auth=False, expect_reject=True)
    assert (status, body) == (401, {"data": None})
    with pytest.raises(ResourceException) as err:
        pve.proxmox(token_value="not-the-secret", expect_reject=True).nodes.get()
    assert err.value.status_code == 401


# -- validation -----------------------------------------------------------------------------------------------------
def test_unknown_path_is_501(pve: PveServer) -> None:
    status, reason, _ = pve.raw("GET", "/nodes/pve1/no-such-thing", expect_reject=True)
    assert status == 501 and reason == "Method 'GET /api2/json/nodes/pve1/no-such-thing' not implemented"
    status, _, _ = pve.raw("PUT", "/nodes/pve1/qemu", {"vmid": 100}, expect_reject=True)
    assert status == 501


def test_parameter_verification(pve: PveServer) -> None:
    status, reason, body = pve.raw("POST", "/nodes/pve1/qemu", {"name": "x"}, expect_reject=True)
    assert (status, reason) == (400, "Parameter verification failed.")
    assert body["errors"] == {"vmid": "property is missing and it is not optional"}
    status, _, body = pve.raw("POST", "/nodes/pve1/qemu", {"vmid": 42}, expect_reject=True)
    assert status == 400 and body["errors"] == {"vmid": "value must have a minimum value of 100"}
    status, _, body = pve.raw("POST", "/nodes/pve1/qemu", {"vmid": 100, "scsihw": "fast"}, expect_reject=True)
    assert status == 400 and "enumeration" in body["errors"]["scsihw"]
    status, _, body = pve.raw("POST", "/nodes/pve1/qemu", {"vmid": 100, "bogus": 1}, expect_reject=True)
    assert status == 400 and "not defined in schema" in body["errors"]["bogus"]
    status, _, body = pve.raw("POST", "/nodes/pve1/qemu", {"vmid": 100, "net0": "virtio=zz,bridge=vmbr0"},
                              expect_reject=True)
    assert status == 400 and "macaddr" in body["errors"]["net0"]
    with pytest.raises(ResourceException) as err:
        pve.proxmox(expect_reject=True).nodes("pve1").qemu.post(vmid=100, cores=0)
    assert err.value.status_code == 400


# -- VMs, storage, tasks ------------------------------------------------------------------------------------------
def test_upload_then_create_with_import_from(pve: PveServer, tmp_path: Path) -> None:
    qcow = _image(tmp_path, "debian", "qcow2", b"qcow2 payload " * 5000)
    raw = _image(tmp_path, "data", "raw", b"raw payload " * 7000, size="16M")
    api = pve.proxmox()
    node = api.nodes("pve1")
    for image in (qcow, raw):
        with open(image, "rb") as f:
            # in pveproxy's order (content, checksum-algorithm, checksum, then the file): it takes no other
            upid = node.storage("local").upload.post(content="import", **{"checksum-algorithm": "sha256"},
                                                     checksum=hashlib.sha256(image.read_bytes()).hexdigest(),
                                                     filename=f)
        assert pve.wait_task(upid)["exitstatus"] == "OK", pve.task_log(upid)
    content = node.storage("local").content.get(content="import")
    assert {c["volid"] for c in content} == {"local:import/debian.qcow2", "local:import/data.raw"}
    vmid = int(api.cluster.nextid.get())
    upid = node.qemu.post(vmid=vmid, name="imported", cores=2, memory="2048", scsihw="virtio-scsi-single",
                          scsi0="local-lvm:0,import-from=local:import/debian.qcow2,iothread=1",
                          virtio0="local:0,import-from=local:import/data.raw",
                          net0="virtio=BC:24:11:AA:BB:CC,bridge=vmbr1", ostype="l26")
    assert upid.startswith("UPID:pve1:") and f":qmcreate:{vmid}:root@pam!migrate:" in upid
    status = pve.wait_task(upid)
    assert status["exitstatus"] == "OK", pve.task_log(upid)
    log = pve.task_log(upid)
    assert log[-1] == "TASK OK" and any("successfully created disk" in line for line in log)
    config = node.qemu(vmid).config.get()
    assert config["scsi0"] == f"local-lvm:vm-{vmid}-disk-0,iothread=1,size=64M"
    assert config["virtio0"] == f"local:{vmid}/vm-{vmid}-disk-0.raw,size=16M"
    assert config["cores"] == 2 and config["name"] == "imported" and "digest" in config
    assert _same(pve.volume_path(f"local-lvm:vm-{vmid}-disk-0"), qcow)
    assert _same(pve.volume_path(f"local:{vmid}/vm-{vmid}-disk-0.raw"), raw)
    images = {c["volid"]: c for c in node.storage("local-lvm").content.get(vmid=vmid)}
    assert images[f"local-lvm:vm-{vmid}-disk-0"]["format"] == "raw"  # LVM-thin holds raw volumes: converted
    assert images[f"local-lvm:vm-{vmid}-disk-0"]["size"] == 64 * 1024 ** 2
    # the upload's bytes are not in the request log; the parameters are
    entries = [line for line in pve.request_log.read_text().splitlines() if "/upload" in line]
    assert entries and all("qcow2 payload" not in e for e in entries)
    assert any('"filename": "debian.qcow2"' in e for e in entries)  # the log is the session's: any entry


def test_upload_rejects_wrong_extension_and_content(pve: PveServer, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"x" * 1024)
    s = _session(pve)
    with open(disk, "rb") as f:
        r = s.post(f"{pve.url}/nodes/pve1/storage/local/upload", headers=pve.auth_header() | {
            "X-Pve-Test-Expect": "reject"}, data={"content": "import"}, files={"filename": ("disk.img", f)})
    assert r.status_code == 400 and r.json()["errors"] == {"filename": "invalid filename or wrong extension"}
    with open(disk, "rb") as f:
        r = s.post(f"{pve.url}/nodes/pve1/storage/local-lvm/upload", headers=pve.auth_header() | {
            "X-Pve-Test-Expect": "reject"}, data={"content": "import"}, files={"filename": ("disk.qcow2", f)})
    assert r.status_code == 400 and "content" in r.json()["errors"]
    assert not list((pve.workdir / "tmp").glob("pveupload-*"))  # temporary files removed


def test_failing_task_has_error_and_log(pve: PveServer) -> None:
    upid = pve.api("POST", "/nodes/pve1/qemu",
                   {"vmid": 120, "scsi0": "local-lvm:0,import-from=local:import/nope.qcow2"})
    status = pve.wait_task(upid)
    assert status["status"] == "stopped"
    assert status["exitstatus"] == "unable to create VM 120 - volume 'local:import/nope.qcow2' does not exist"
    log = pve.task_log(upid)
    assert log[-1] == f"TASK ERROR: {status['exitstatus']}"
    assert "120" not in pve.state()["vms"]  # a failed create leaves no VM behind
    assert pve.api("GET", "/cluster/nextid") == "100"


def test_existing_vmid_and_nextid(pve: PveServer) -> None:
    pve.add_vm("pve1", 100, "src", disks=[("scsi0", "local-lvm", "raw", 1 << 20)])
    pve.add_vm("pve1", 101, "src2")
    assert pve.api("GET", "/cluster/nextid") == "102"
    assert pve.api("GET", "/cluster/nextid", {"vmid": 150}) == "150"
    status, _, body = pve.raw("GET", "/cluster/nextid", {"vmid": 100}, expect_reject=True)
    assert status == 400 and body["errors"] == {"vmid": "VM 100 already exists"}
    status, reason, _ = pve.raw("POST", "/nodes/pve1/qemu", {"vmid": 100}, expect_reject=True)
    assert (status, reason) == (500, "unable to create VM 100 - VM 100 already exists on node 'pve1'")


def test_status_resources_and_destroy(pve: PveServer) -> None:
    pve.add_vm("pve1", 100, "web", disks=[("scsi0", "local", "qcow2", 1 << 30), ("scsi1", "local-lvm", "raw", 1 << 20)])
    api = pve.proxmox()
    vm = api.nodes("pve1").qemu(100)
    assert vm.status.current.get()["status"] == "stopped"
    assert pve.wait_task(vm.status.start.post())["exitstatus"] == "OK"
    current = vm.status.current.get()
    assert current["status"] == "running" and current["qmpstatus"] == "running" and current["maxmem"] == 2048 << 20
    resources = api.cluster.resources.get(type="vm")
    assert [(r["vmid"], r["node"], r["name"], r["status"], r["type"]) for r in resources] == [
        (100, "pve1", "web", "running", "qemu")]
    status, reason, _ = pve.raw("DELETE", "/nodes/pve1/qemu/100", expect_reject=True)
    assert (status, reason) == (500, "VM 100 is running - destroy failed")
    again = pve.wait_task(vm.status.start.post())
    assert again["exitstatus"] == "VM 100 already running"
    assert pve.wait_task(vm.status.stop.post())["exitstatus"] == "OK"
    files = list(pve.disk_files(100).values())
    assert all(f.exists() for f in files) and len(files) == 2
    upid = vm.delete(**{"destroy-unreferenced-disks": 1, "purge": 1})
    assert pve.wait_task(upid)["exitstatus"] == "OK"
    assert not any(f.exists() for f in files)
    assert api.cluster.resources.get(type="vm") == []
    status, reason, _ = pve.raw("GET", "/nodes/pve1/qemu/100/config", expect_reject=True)
    assert (status, reason) == (500, "Configuration file 'nodes/pve1/qemu-server/100.conf' does not exist")


def test_config_update_new_disk_and_unused(pve: PveServer) -> None:
    pve.add_vm("pve1", 100, "db", disks=[("scsi0", "local-lvm", "raw", 1 << 20)])
    api = pve.proxmox()
    vm = api.nodes("pve1").qemu(100)
    upid = vm.config.post(scsi1="local:1,format=qcow2", cores=4)
    assert pve.wait_task(upid)["exitstatus"] == "OK", pve.task_log(upid)
    config = vm.config.get()
    assert config["scsi1"] == "local:100/vm-100-disk-0.qcow2,size=1G" and config["cores"] == 4
    assert pve.volume_path("local:100/vm-100-disk-0.qcow2").suffix == ".qcow2"
    vm.config.put(delete="scsi1", name="db-renamed")  # PUT: synchronous; a detached disk becomes unused0
    config = vm.config.get()
    assert "scsi1" not in config and config["unused0"] == "local:100/vm-100-disk-0.qcow2" \
        and config["name"] == "db-renamed"
    vm.config.put(scsi2="local:100/vm-100-disk-0.qcow2")  # attached again: unused0 goes
    assert "unused0" not in vm.config.get()
    status, reason, _ = pve.raw("PUT", "/nodes/pve1/qemu/100/config", {"cores": 2, "digest": "0" * 40},
                                expect_reject=True)
    assert status == 500 and reason.startswith("detected modified configuration")


def test_snapshots(pve: PveServer, tmp_path: Path) -> None:
    content = tmp_path / "content.raw"
    content.write_bytes(b"before" * 1000)
    pve.add_vm("pve1", 100, "snappy", disks=[("scsi0", "local", "qcow2", 8 << 20, content),
                                             ("scsi1", "local-lvm", "raw", 4 << 20)])
    vm = pve.proxmox().nodes("pve1").qemu(100)
    assert pve.wait_task(vm.snapshot.post(snapname="pre_migration", description="before"))["exitstatus"] == "OK"
    snaps = vm.snapshot.get()
    assert [s["name"] for s in snaps] == ["pre_migration", "current"]
    assert snaps[0]["description"] == "before" and snaps[0]["snaptime"] >= int(time.time()) - 60
    assert snaps[1]["parent"] == "pre_migration"
    qcow = pve.volume_path("local:100/vm-100-disk-0.qcow2")
    listing = subprocess.run(["qemu-img", "snapshot", "-l", str(qcow)], capture_output=True, text=True).stdout
    assert "pre_migration" in listing  # a real internal qcow2 snapshot
    assert vm.config.get(snapshot="pre_migration")["name"] == "snappy"
    status, reason, _ = pve.raw("POST", "/nodes/pve1/qemu/100/snapshot", {"snapname": "pre_migration"},
                                expect_reject=True)
    assert (status, reason) == (500, "snapshot name 'pre_migration' already used")
    assert pve.wait_task(vm.snapshot("pre_migration").delete())["exitstatus"] == "OK"
    assert [s["name"] for s in vm.snapshot.get()] == ["current"]
    listing = subprocess.run(["qemu-img", "snapshot", "-l", str(qcow)], capture_output=True, text=True).stdout
    assert "pre_migration" not in listing


def test_storage_and_network(pve: PveServer, tmp_path: Path) -> None:
    api = pve.proxmox().nodes("pve1")
    storages = {s["storage"]: s for s in api.storage.get()}
    assert storages["local"]["content"] == "images,import,iso" and storages["local-lvm"]["content"] == "images"
    assert all(s["type"] == ("lvmthin" if s["storage"] == "local-lvm" else "dir") and s["active"] == 1
               and s["enabled"] == 1 and s["avail"] > 0 for s in storages.values())
    assert [s["storage"] for s in api.storage.get(content="import")] == ["local"]
    assert api.storage("local-lvm").status.get()["total"] > 0
    volid = pve.add_import_file("local", _image(tmp_path, "x", "qcow2", b"x"))
    upid = api.storage("local").content(volid).delete()  # proxmoxer sends the volume id unencoded
    assert pve.wait_task(upid)["exitstatus"] == "OK"
    assert api.storage("local").content.get() == []
    bridges = [n["iface"] for n in api.network.get(type="bridge")]
    assert bridges == ["vmbr0", "vmbr1"]


def test_ssh_stand_ins(pve: PveServer, tmp_path: Path) -> None:
    pve.add_vm("pve1", 100, "target", disks=[("scsi0", "local-lvm", "raw", 1 << 20)])
    ssh = pve.ssh["pve1"]
    out = ssh.run("pvesm path local-lvm:vm-100-disk-0").stdout.strip()
    assert out == str(pve.volume_path("local-lvm:vm-100-disk-0")) and Path(out).exists()
    source = _image(tmp_path, "incoming", "qcow2", b"incoming disk " * 3000, size="8M")
    remote = pve.storage_path("local") / "incoming.qcow2"
    subprocess.run(["scp", "-q", "-i", str(ssh.client_key), "-P", str(ssh.port), "-o", "BatchMode=yes",
                    "-o", f"UserKnownHostsFile={ssh.known_hosts}", str(source), f"root@127.0.0.1:{remote}"],
                   check=True)
    out = ssh.run(f"qm importdisk 100 {remote} local-lvm --format raw").stdout
    assert out.splitlines()[0] == f"importing disk '{remote}' to VM 100 ..."
    assert out.splitlines()[-1] == "Successfully imported disk as 'unused0:local-lvm:vm-100-disk-1'"
    out = ssh.run(f"qm disk import 100 {remote} local").stdout
    assert out.splitlines()[-1] == "Successfully imported disk as 'unused1:local:100/vm-100-disk-0.qcow2'"
    config = pve.api("GET", "/nodes/pve1/qemu/100/config")
    assert config["unused0"] == "local-lvm:vm-100-disk-1" and config["unused1"] == "local:100/vm-100-disk-0.qcow2"
    assert _same(pve.volume_path("local-lvm:vm-100-disk-1"), source)
    listing = ssh.run("pvesm list local-lvm").stdout.splitlines()
    assert listing[0].split() == ["Volid", "Format", "Type", "Size", "VMID"]
    assert any(line.split()[:2] == ["local-lvm:vm-100-disk-1", "raw"] for line in listing)
    failed = ssh.run("qm importdisk 999 /etc/hostname local-lvm", check=False)
    assert failed.returncode == 255 and "does not exist" in failed.stderr


def test_state_survives_a_restart(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.servers.pve.server import session_request_log

    with start_pve_server(tmp_path / "pve", nodes=("pve1", "pve2"), ssh=False,
                          request_log=session_request_log(tmp_path_factory)) as server:
        server.add_vm("pve2", 200, "on-two", disks=[("sata0", "local-lvm", "raw", 1 << 20)])
        server.stop()
        server.start()
        assert [n["node"] for n in server.api("GET", "/nodes")] == ["pve1", "pve2"]
        assert [v["vmid"] for v in server.api("GET", "/nodes/pve2/qemu")] == [200]
        assert server.api("GET", "/nodes/pve1/qemu") == []
        status, reason, _ = server.raw("GET", "/nodes/pve1/qemu/200/config", expect_reject=True)
        assert status == 500 and "nodes/pve1/qemu-server/200.conf" in reason


def test_an_upload_with_its_fields_out_of_pveproxys_order_is_refused(pve, tmp_path):
    """pveproxy parses content, checksum-algorithm, checksum, then the file, in that order only."""
    import hashlib

    from proxmoxer.core import ResourceException

    image = tmp_path / "x.raw"
    image.write_bytes(b"\1" * 4096)
    node = pve.proxmox(expect_reject=True).nodes("pve1")
    with open(image, "rb") as f, pytest.raises(ResourceException, match="wrong Content-Disposition"):
        node.storage("local").upload.post(content="import", checksum=hashlib.sha256(image.read_bytes()).hexdigest(),
                                          **{"checksum-algorithm": "sha256"}, filename=f)
