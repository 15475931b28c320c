"""A Proxmox VE node (or cluster) for tests: our own API server process (tests/servers/pve/api.py) that checks
every request against the official schema of Proxmox VE 9.1 and keeps real state, plus a real OpenSSH server per
node whose sessions find ``pvesm`` and ``qm`` stand-ins (tests/servers/pve/commands.py) first in PATH.

Why our own server: Proxmox VE cannot run here (it needs its own kernel, pmxcfs and a cluster stack), and a mock
that accepts anything would let a client send requests a node refuses. This one answers as a node does: 501 for
an unknown path, 401 for missing or wrong credentials, 400 ``Parameter verification failed.`` with the errors per
parameter, 500 with the node's message, tasks with UPIDs and logs. Disk bytes are real files (``qemu-img``).

Layout of ``workdir``::

    server.json            the server's settings, with the token secret and the password (0600, never scanned)
    state.json, state.lock the cluster state (tests/servers/pve/state.py)
    storage/<id>/images/<vmid>/vm-<vmid>-disk-<n>.<fmt>, storage/<id>/import/<file>, storage/<id>/template/iso/
    tasks/<pid>.log        task logs
    pve-api.log            access log of the API server, its stderr too
    tls/                   CA and server certificate for 127.0.0.1 (``ca_file``)
    ssh/                   keys, known_hosts; ssh/<node>/ sshd_config, bin/pvesm, bin/qm, sshd.log
    requests.jsonl         the request log, unless ``request_log``/``$PVE_REQUEST_LOG`` says otherwise

Credentials: root@pam with a random password (ticket login) and the API token ``root@pam!migrate`` with a
random UUID secret; both registered with tests/secrets_registry.py.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from tests import secrets_registry
from tests.servers.pve.state import DEFAULT_BRIDGES, DEFAULT_STORAGES, Store, format_size, parse_prop, qemu_img
from tests.servers.vsphere import make_tls

ROOT = Path(__file__).resolve().parents[3]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
TOKEN_NAME = "migrate"
USER = "root@pam"


class ServerStartError(RuntimeError):
    """The server did not come up; the message carries the reason and the tail of its log."""


class PveRequestError(RuntimeError):
    """A request the server answered with an error status (``.status``, ``.reason``, ``.body``)."""

    def __init__(self, status: int, reason: str, body: Any):
        super().__init__(f"HTTP {status} {reason}: {body}")
        self.status, self.reason, self.body = status, reason, body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _kill_group(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # our own session/process group (start_new_session=True)
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)
    except ProcessLookupError:
        pass


@dataclass
class NodeSsh:
    """The OpenSSH server of one node: root by key on 127.0.0.1:``port``; ``pvesm``/``qm`` act on that node."""

    node: str
    port: int
    client_key: Path
    known_hosts: Path
    workdir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def argv(self, command: str) -> list[str]:
        """``ssh`` argv that runs ``command`` on the node (host key checked against ``known_hosts``)."""
        return ["ssh", "-i", str(self.client_key), "-p", str(self.port), "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "LogLevel=ERROR", "root@127.0.0.1", command]  # fmt: skip

    def run(self, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(command), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ssh {self.node} {command!r} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def stop(self) -> None:
        _kill_group(self.process)


@dataclass
class PveServer:
    """The API server process and one sshd per node; see the module docstring."""

    workdir: Path
    nodes: tuple[str, ...]
    storages: dict[str, dict[str, Any]]
    password: str
    token_secret: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    request_log: Path
    log_file: Path
    user: str = USER
    token_name: str = TOKEN_NAME
    port: int = 0
    ssh: dict[str, NodeSsh] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    startup_seconds: float | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}/api2/json"

    @property
    def token_id(self) -> str:
        return f"{self.user}!{self.token_name}"

    @property
    def store(self) -> Store:
        return Store(self.workdir)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"PVEAPIToken={self.token_id}={self.token_secret}"}

    # -- process control -------------------------------------------------------------------------------------
    def start(self) -> PveServer:
        """Start the API process, wait (up to 20 s) for ``GET /version`` with the token; ServerStartError if not."""
        if self.running:
            return self
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PVE_")}
        env["PYTHONPATH"] = str(ROOT)
        began = time.monotonic()
        with open(self.log_file, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} starting\n".encode())
            log.flush()
            self.process = subprocess.Popen([sys.executable, "-m", "tests.servers.pve.api", str(self.workdir)],
                                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        last_error = "no port yet"
        while time.monotonic() - began < START_TIMEOUT:
            if self.process.poll() is not None:
                raise ServerStartError(f"the PVE test API exited with code {self.process.returncode} during startup; "
                                       f"tail of {self.log_file}:\n{_tail(self.log_file)}")
            if port_file.exists():
                self.port = int(port_file.read_text())
                try:
                    self.api("GET", "/version")
                    self.startup_seconds = time.monotonic() - began
                    return self
                except (OSError, PveRequestError) as exc:
                    last_error = str(exc)
            time.sleep(0.05)
        _kill_group(self.process)
        raise ServerStartError(f"the PVE test API did not answer within {START_TIMEOUT:.0f} s ({last_error}); "
                               f"tail of {self.log_file}:\n{_tail(self.log_file)}")

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 5 s) the API process and the sshds. Idempotent; the folders are kept."""
        _kill_group(self.process)
        for ssh in self.ssh.values():
            ssh.stop()

    def kill(self) -> None:
        """SIGKILL the API process at once (fault injection: the node's API dies)."""
        if self.running:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT)

    def __enter__(self) -> PveServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def api(self, method: str, path: str, params: dict[str, Any] | None = None, *, headers: dict[str, str] | None
            = None, auth: bool = True, expect_reject: bool = False) -> Any:
        """One request with the API token (urllib, no client library): the ``data`` of the answer, or
        PveRequestError. ``expect_reject`` marks the request in the request log as provoking a rejection."""
        status, reason, body = self.raw(method, path, params, headers=headers, auth=auth, expect_reject=expect_reject)
        if status != 200:
            raise PveRequestError(status, reason, body)
        return body["data"]

    def raw(self, method: str, path: str, params: dict[str, Any] | None = None, *,
            headers: dict[str, str] | None = None, auth: bool = True, expect_reject: bool = False,
            body: bytes | None = None) -> tuple[int, str, Any]:
        """(status, reason, parsed JSON body) of one request; params go into the query string for GET/DELETE and
        into a urlencoded form body for POST/PUT."""
        query = urlencode(params or {}, doseq=True)
        url = self.url + path
        data = body
        hdrs = dict(self.auth_header() if auth else {})
        if method in ("GET", "DELETE"):
            url += f"?{query}" if query else ""
        elif data is None:
            data = query.encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        if expect_reject:
            hdrs["X-Pve-Test-Expect"] = "reject"
        hdrs.update(headers or {})
        req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=self.ssl_context()))
        try:
            with opener.open(req, timeout=60) as resp:
                return resp.status, resp.reason, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            text = err.read()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text.decode(errors="replace")
            return err.code, err.reason, parsed

    def proxmox(self, *, expect_reject: bool = False, **kwargs: Any) -> Any:
        """A proxmoxer ``ProxmoxAPI`` with the API token, verifying our CA; ``kwargs`` override its options.
        With ``expect_reject`` every request it sends is marked as provoking a rejection (see ``api``)."""
        from proxmoxer import ProxmoxAPI

        options = dict(port=self.port, user=self.user, token_name=self.token_name, token_value=self.token_secret,
                       verify_ssl=str(self.ca_file), backend="https", timeout=60)
        options.update(kwargs)
        client = ProxmoxAPI(self.host, **options)
        if expect_reject:
            client._store["session"].headers["X-Pve-Test-Expect"] = "reject"
        return client

    def wait_task(self, upid: str, timeout: float = 120) -> dict[str, Any]:
        """Poll ``/tasks/{upid}/status`` until the task stopped; its last status (check ``exitstatus``)."""
        node = upid.split(":")[1]
        deadline = time.monotonic() + timeout
        while True:
            status = self.api("GET", f"/nodes/{node}/tasks/{quote(upid, safe='')}/status")
            if status["status"] == "stopped":
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {upid} still running after {timeout} s")
            time.sleep(0.05)

    def task_log(self, upid: str) -> list[str]:
        node = upid.split(":")[1]
        return [line["t"] for line in self.api("GET", f"/nodes/{node}/tasks/{quote(upid, safe='')}/log",
                                               {"limit": 10000})]

    # -- state helpers for tests ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return self.store.read()

    def vm_config(self, vmid: int) -> dict[str, Any]:
        """A VM's config as stored (no ``digest``); KeyError if there is no such VM."""
        return self.store.read()["vms"][str(vmid)]["config"]

    def volume_path(self, volid: str) -> Path:
        """The file of a volume id, e.g. ``local-lvm:vm-100-disk-0`` -> ``.../storage/local-lvm/images/100/...``."""
        return self.store.volume_path(self.store.read(), volid)

    def storage_path(self, storage: str) -> Path:
        return self.workdir / "storage" / storage

    def add_import_file(self, storage: str, source: Path, name: str | None = None) -> str:
        """Put ``source`` into a storage's ``import/`` folder directly (no upload); its volume id."""
        target = self.storage_path(storage) / "import" / (name or source.name)
        target.write_bytes(source.read_bytes())
        return f"{storage}:import/{target.name}"

    def add_vm(self, node: str, vmid: int, name: str, *, disks: list[tuple[Any, ...]] = (),
               nets: list[str] = ("virtio=BC:24:11:00:00:01,bridge=vmbr0",), cores: int = 2, memory: int = 2048,
               ostype: str = "l26", scsihw: str = "virtio-scsi-single", running: bool = False,
               **extra: Any) -> dict[str, Any]:
        """Create a source VM directly in the state, with real disk files: ``disks`` are
        ``(key, storage, format, size_bytes[, content_file])`` (content written at the start of the disk with
        ``qemu-img convert``, then the image grown to ``size_bytes``); ``nets`` the ``net0``, ``net1``... values.
        Returns the config."""
        store = self.store
        config: dict[str, Any] = {"name": name, "cores": cores, "memory": str(memory), "ostype": ostype,
                                  "scsihw": scsihw, "smbios1": f"uuid={uuid.uuid4()}", "vmgenid": str(uuid.uuid4()),
                                  "meta": f"creation-qemu=9.2.0,ctime={int(time.time())}"}
        with store.transaction() as state:
            if str(vmid) in state["vms"]:
                raise ValueError(f"VM {vmid} already exists")
            if node not in state["nodes"]:
                raise ValueError(f"no node {node}")
            files = []
            for disk in disks:
                key, sid, fmt, size = disk[:4]
                volid, path = store.allocate(state, sid, vmid, fmt)
                files.append((key, volid, path, fmt, size, disk[4] if len(disk) > 4 else None))
            state["vms"][str(vmid)] = {"node": node, "status": "stopped", "snapshots": {}, "config": {"lock": "create"}}
        for key, volid, path, fmt, size, content in files:
            if content is not None:
                qemu_img("convert", "-f", "raw", "-O", fmt, str(content), str(path))
                qemu_img("resize", "-q", "-f", fmt, str(path), str(size))
            else:
                qemu_img("create", "-q", "-f", fmt, str(path), str(size))
            config[key] = f"{volid},size={format_size(size)}"
        for i, net in enumerate(nets):
            config[f"net{i}"] = net
        config.update({k: v for k, v in extra.items()})
        if disks:
            config.setdefault("boot", f"order={disks[0][0]}")
        with store.transaction() as state:
            vm = state["vms"][str(vmid)]
            vm["config"] = config
            if running:
                vm.update(status="running", started=int(time.time()), pid=40000 + vmid)
        return config

    def set_version(self, version: str) -> None:
        """Make the nodes answer as Proxmox VE ``version``; before 8.4 no storage has content ``import`` (it came
        with 8.4), and uploads of that content are refused."""
        with self.store.transaction() as state:
            state["version"] = version
            if tuple(int(x) for x in version.split(".")[:2]) < (8, 4):
                for spec in state["storages"].values():
                    spec["content"] = ",".join(c for c in spec["content"].split(",") if c != "import")

    def race_nextid(self, times: int = 1) -> None:
        """The next ``times`` answers of ``/cluster/nextid`` are each taken by another client right after (a VM of
        that VMID appears before the caller can create its own), as when two migrations ask at the same instant."""
        with self.store.transaction() as state:
            state["race_nextid"] = times

    def guest_writes(self, vmid: int, on: bool = True) -> None:
        """Have the running VM's guest write to its disks right after each snapshot (1 MiB of 0xee at the start
        of every snapshotted volume), so a reader that reads the volume instead of the snapshot is caught."""
        with self.store.transaction() as state:
            state["vms"][str(vmid)]["guest_writes"] = on

    def disk_files(self, vmid: int) -> dict[str, Path]:
        """config key -> file of each disk volume of a VM (unused ones included)."""
        state = self.store.read()
        out = {}
        for key, value in state["vms"][str(vmid)]["config"].items():
            file = parse_prop(str(value)).get("file", "")
            if (key.startswith(("scsi", "virtio", "sata", "ide", "unused", "efidisk", "tpmstate"))
                    and ":" in file and "media=cdrom" not in str(value)):
                out[key] = self.store.volume_path(state, file)
        return out


# -- sshd per node ------------------------------------------------------------------------------------------------
def _start_node_ssh(folder: Path, node: str, workdir: Path, host_key: Path, client_key: Path,
                    authorized: Path) -> NodeSsh:
    """An sshd for ``node`` whose sessions get ``bin/`` (with ``pvesm`` and ``qm``) first in PATH via SetEnv."""
    folder.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory; sshd refuses to start without it
    bindir = folder / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in ("pvesm", "qm", "lvchange", "lvs"):
        script = bindir / tool
        script.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m tests.servers.pve.commands "
                          f"{workdir} {node} {tool} \"$@\"\n")
        script.chmod(0o755)
    port = _free_port()
    config = folder / "sshd_config"
    path = f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {folder}/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {authorized}
StrictModes no
UsePAM no
Subsystem sftp /usr/lib/openssh/sftp-server
SetEnv PATH={path} PVE_NODE={node}
""")
    check = subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise ServerStartError(f"sshd config rejected: {check.stderr}")
    log_file = folder / "sshd.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    known = folder.parent / "known_hosts"
    ssh = NodeSsh(node=node, port=port, client_key=client_key, known_hosts=known, workdir=folder, process=proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"sshd of {node} exited: {_tail(log_file)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                if sock.recv(4).startswith(b"SSH"):
                    pub = (host_key.parent / (host_key.name + ".pub")).read_text().split()
                    with open(known, "a") as f:
                        f.write(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
                    return ssh
        except OSError:
            time.sleep(0.05)
    ssh.stop()
    raise ServerStartError(f"sshd of {node} did not answer within 10 s: {_tail(log_file)}")


def start_pve_server(workdir: Path, *, nodes: tuple[str, ...] = ("pve1",),
                     storages: dict[str, dict[str, Any]] | None = None, bridges: tuple[str, ...] = DEFAULT_BRIDGES,
                     request_log: Path | None = None, ssh: bool = True) -> PveServer:
    """Start the API server on a free 127.0.0.1 port (TLS with a CA made for it: ``.ca_file``) and, with ``ssh``,
    one sshd per node. ``storages`` maps id -> {"content": "images,import", "naming": "dir"|"lvm"} (default
    ``local`` = images,import,iso with dir naming, ``local-lvm`` = images with LVM naming). The request log is
    ``request_log``, else ``$PVE_REQUEST_LOG``, else ``workdir/requests.jsonl``. Raises ServerStartError with the
    log tail. Call ``.stop()``."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = make_tls(workdir / "tls")
    secrets_registry.register_input(key_file)
    log_path = Path(request_log or os.environ.get("PVE_REQUEST_LOG") or workdir / "requests.jsonl")
    server = PveServer(workdir=workdir, nodes=tuple(nodes), storages=dict(storages or DEFAULT_STORAGES),
                       password=secrets.token_urlsafe(18), token_secret=str(uuid.uuid4()), ca_file=ca_file,
                       cert_file=cert_file, key_file=key_file, request_log=log_path,
                       log_file=workdir / "pve-api.log")
    secrets_registry.register(server.password, "PVE test server root@pam password")
    secrets_registry.register(server.token_secret, "PVE test server API token secret")
    Store(workdir).initialise(server.nodes, server.storages, bridges)
    settings = workdir / "server.json"
    settings.touch(mode=0o600)
    settings.write_text(json.dumps({"user": USER, "password": server.password, "token_name": TOKEN_NAME,
                                    "token_secret": server.token_secret, "cert_file": str(cert_file),
                                    "key_file": str(key_file), "request_log": str(log_path)}))
    secrets_registry.register_input(settings)
    server.start()
    if ssh:
        try:
            folder = workdir / "ssh"
            folder.mkdir(exist_ok=True)
            host_key, client_key = folder / "hostkey", folder / "clientkey"
            for key in (host_key, client_key):
                if not key.exists():
                    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
            for key, what in ((host_key, "PVE test sshd host key"), (client_key, "PVE test SSH client key")):
                secrets_registry.register(key.read_text(), what)
                secrets_registry.register_input(key)
            authorized = folder / "authorized_keys"
            authorized.write_text((folder / "clientkey.pub").read_text())
            for node in server.nodes:
                server.ssh[node] = _start_node_ssh(folder / node, node, workdir, host_key, client_key, authorized)
        except Exception:
            server.stop()
            raise
    return server


def session_request_log(factory: pytest.TempPathFactory) -> Path:
    """The request log shared by every ``pve`` server of a test session: ``$PVE_REQUEST_LOG``, else
    ``<pytest base temp>/pve-requests.jsonl`` (read by tests/servers/pve/test_schema_replay.py)."""
    env = os.environ.get("PVE_REQUEST_LOG")
    return Path(env) if env else factory.getbasetemp() / "pve-requests.jsonl"


@pytest.fixture
def pve(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """A fresh Proxmox VE test server for one test (node ``pve1``, storages ``local`` and ``local-lvm``, bridges
    vmbr0/vmbr1, SSH with ``pvesm``/``qm``); its requests go to the session's request log. Stopped after."""
    server = start_pve_server(tmp_path / "pve", request_log=session_request_log(tmp_path_factory))
    yield server
    server.stop()
