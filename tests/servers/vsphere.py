"""A vCenter simulator for tests: our own small Go main (``tests/servers/vcsim/main.go``) on the govmomi
simulator (Apache-2.0, https://github.com/vmware/govmomi, v0.56.0), spoken to with pyvmomi over TLS.

Install: ``bash scripts/install_servers.sh vcsim`` builds ``${VMMIG_CACHE:-$HOME/.cache/vmmigration}/bin/vcsim-<key>``
where ``<key>`` is the first 16 hex digits of sha256(go.mod + go.sum + main.go), so an edit of the Go sources
builds a new binary (``$VCSIM`` overrides the binary). ``find_vcsim()`` runs that step itself when the binary
for the current sources is missing (about 45 s, needs Go and the module proxy).

Command line (the password goes through ``$VCSIM_PASSWORD`` so it does not show in ``ps``)::

    vcsim -listen 127.0.0.1:0 -cert server.pem -key server.key -username U -datastore-dir DIR

It prints one line on stdout when it serves: ``VCSIM_READY https://127.0.0.1:PORT/sdk dir=DIR``; its log goes
to stderr. SIGTERM stops it and removes the simulator's own temporary folder (inside our workdir: ``TMPDIR``).

The inventory (simulator.VPX() changed by main.go):

- datacenter ``DC0``; standalone host ``DC0_H0`` (compute resource ``DC0_H0``) and cluster ``DC0_C0`` with
  hosts ``DC0_C0_H0..2``; each compute resource has a root resource pool ``Resources``; VM folder ``vm``.
- datastores ``datastore1`` and ``datastore2`` (no ``LocalDS_0``), mounted on every host, each a plain folder on
  this machine: ``<workdir>/datastores/<name>``; ``summary.url`` and ``info.url`` are that local path. Capacity
  and free space are reported as 4 TiB whatever is stored.
- networks in DC0's ``networkFolder``: standard ``vim.Network`` "VM Network" (every simulated datacenter has it)
  and "VM Network 2" (added as a vSwitch0 port group), the DVS ``DVS0`` with port groups ``DVS0-DVUplinks-8``
  and ``DC0_DVPG0``. Every host's and compute resource's ``network`` lists them all.
- no VMs (VPX()'s four default VMs are not created).

main.go also works around three simulator faults (without them pyvmomi could not read ``vm.runtime`` or the
``task.info`` of VirtualDiskManager/FileManager tasks, and a CreateVM naming an unknown datastore crashed the
process; it now raises ``vim.fault.InvalidDatastorePath``). Behaviour to know (measured with pyvmomi 9.1.1):

- ``/folder`` and ``/nfc`` URLs check no credentials at all; ``/folder`` GET supports Range, PUT creates parent
  folders and takes chunked bodies, DELETE does nothing.
- Disk capacity comes from the CreateVM spec, never from the VMDK file. VirtualDiskManager copy/move/delete need
  ``X.vmdk`` plus ``X-flat.vmdk`` (a qemu-img monolithic VMDK gives FileNotFound): use FileManager for those.
- An export lease (``snapshot.ExportSnapshot()``) serves the datastore file's bytes unchanged; ``ExportVm`` is not
  implemented; ImportVApp leases accept a PUT and drop the bytes. Completing or aborting a lease deletes it.
- Snapshots create no delta disks. Removing one of SEVERAL snapshots deleted the VM's base disk files.
- ``Destroy_Task`` deletes the VM's folder recursively. Same-named VMs in different folders are allowed.
- An unset property read as an attribute (``lease.error``, ``vm.snapshot`` without snapshots) raises
  AttributeError instead of giving None.

The ``vcsim`` fixture is session-scoped: tests share one simulator, so each test should use its own VM names
and datastore folders.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from tests import secrets_registry
from tests.servers.pki import server_tls

ROOT = Path(__file__).resolve().parent.parent.parent
SOURCES = Path(__file__).resolve().parent / "vcsim"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
DATACENTER = "DC0"
DATASTORES = ("datastore1", "datastore2")
NETWORKS = ("VM Network", "VM Network 2")
INSTALL_HINT = "run `bash scripts/install_servers.sh vcsim` (it builds vcsim into the cache) or set $VCSIM"
_READY = re.compile(r"^VCSIM_READY (https://127\.0\.0\.1:(\d+)/sdk) dir=(.*)$", re.M)


class ServerStartError(RuntimeError):
    """The simulator did not come up; the message carries the reason and the tail of its log."""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _cache_dir() -> Path:
    return Path(os.environ.get("VMMIG_CACHE") or Path.home() / ".cache" / "vmmigration")


def source_key() -> str:
    """The build key of the Go sources; the same as scripts/install_servers.sh computes."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((SOURCES / name).read_bytes())
    return digest.hexdigest()[:16]


def find_vcsim(*, build: bool = True) -> Path:
    """The simulator binary: ``$VCSIM``, else ``<cache>/bin/vcsim-<source_key()>``, built first if missing
    (``build=False``: raise ServerStartError instead)."""
    env = os.environ.get("VCSIM")
    path = Path(env) if env else _cache_dir() / "bin" / f"vcsim-{source_key()}"
    if not (path.is_file() and os.access(path, os.X_OK)) and build and not env:
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "install_servers.sh"), "vcsim"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise ServerStartError(f"building vcsim failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ServerStartError(f"vcsim binary not found at {path}: {INSTALL_HINT}")
    return path


def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (and localhost) signed by it.

    Returns (ca_file, cert_file, key_file), PEM. The CA's key is not kept.
    """
    return server_tls(folder / "ca.pem", folder / "server.pem", folder / "server.key",
                      ca_cn="vmmigration test CA (vcsim)")


@dataclass
class VcsimServer:
    """A vcsim process on 127.0.0.1 with one user; see the module docstring for its inventory."""

    workdir: Path
    binary: Path
    username: str
    password: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    log_file: Path
    port: int = 0
    url: str = ""
    datacenter: str = DATACENTER
    datastores: dict[str, Path] = field(default_factory=dict)
    networks: tuple[str, ...] = NETWORKS
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    startup_seconds: float | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def datastore_root(self) -> Path:
        return self.workdir / "datastores"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- process control -------------------------------------------------------------------------------------
    def start(self) -> VcsimServer:
        """Start the process, wait (up to 20 s) for its ready line and a pyvmomi login; ServerStartError if not."""
        if self.running:
            return self
        self.datastore_root.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        out_file = self.workdir / "vcsim.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VCSIM", "GOVC_", "GOVMOMI_"))}
        env["VCSIM_PASSWORD"] = self.password
        env["TMPDIR"] = str(tmp)  # the simulator's own govcsim-* folder
        command = [
            str(self.binary),
            "-listen", "127.0.0.1:0",
            "-cert", str(self.cert_file), "-key", str(self.key_file),
            "-username", self.username,
            "-datastore-dir", str(self.datastore_root),
            "-datastores", ",".join(DATASTORES),
            "-networks", ",".join(n for n in self.networks if n != "VM Network"),
        ]  # fmt: skip
        began = time.monotonic()
        with open(self.log_file, "ab") as log, open(out_file, "wb") as out:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} starting vcsim\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=log, env=env, start_new_session=True
            )
        last_error = "no ready line yet"
        while time.monotonic() - began < START_TIMEOUT:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"vcsim exited with code {self.process.returncode} during startup; "
                    f"tail of {self.log_file}:\n{_tail(self.log_file)}"
                )
            if not self.url:
                match = _READY.search(out_file.read_text(errors="replace"))
                if match:
                    self.url, self.port = match.group(1), int(match.group(2))
                    root = Path(match.group(3))
                    self.datastores = {name: root / name for name in DATASTORES}
            if self.url:
                try:
                    self.disconnect(self.connect())
                    self.startup_seconds = time.monotonic() - began
                    return self
                except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"; reported on timeout
                    last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        self._signal(signal.SIGKILL)
        raise ServerStartError(
            f"vcsim did not answer a login within {START_TIMEOUT:.0f} s ({last_error}); "
            f"tail of {self.log_file}:\n{_tail(self.log_file)}"
        )

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)  # our own session/process group (start_new_session=True)
        except ProcessLookupError:
            pass

    def _wait_down(self) -> None:
        assert self.process is not None
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s. Idempotent. The datastore folders are left in place."""
        if self.process is None:
            return
        self._signal(signal.SIGTERM)
        self._wait_down()

    def kill(self) -> None:
        """SIGKILL at once (fault injection: vCenter dies mid-transfer)."""
        if self.process is None:
            return
        self._signal(signal.SIGKILL)
        self._wait_down()

    def __enter__(self) -> VcsimServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the simulator's certificate with our CA (hostname 127.0.0.1)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def connect(self, username: str | None = None, password: str | None = None) -> Any:
        """A pyvmomi ServiceInstance logged in (``pyVim.connect.SmartConnect`` with our CA). Disconnect it with
        ``disconnect()``. Wrong credentials raise ``vim.fault.InvalidLogin``."""
        from pyVim.connect import SmartConnect

        return SmartConnect(
            host=self.host,
            port=self.port,
            user=self.username if username is None else username,
            pwd=self.password if password is None else password,
            sslContext=self.ssl_context(),
            connectionPoolTimeout=10,
        )

    @staticmethod
    def disconnect(si: Any) -> None:
        from pyVim.connect import Disconnect

        Disconnect(si)

    @staticmethod
    def session_cookie(si: Any) -> str:
        """The ``vmware_soap_session=...`` cookie of a pyvmomi connection, for /folder and /nfc requests."""
        return si._stub.cookie.split(";", 1)[0]

    def datastore_file_url(self, datastore: str, path: str) -> str:
        """``https://127.0.0.1:PORT/folder/<path>?dcPath=DC0&dsName=<datastore>`` (the vSphere file API)."""
        query = urlencode({"dcPath": self.datacenter, "dsName": datastore})
        return f"https://{self.host}:{self.port}/folder/{quote(path.lstrip('/'))}?{query}"

    def datastore_path(self, datastore: str, path: str = "") -> Path:
        """Where ``[datastore] path`` is on this machine."""
        return self.datastores[datastore] / path


def start_vcsim(workdir: Path) -> VcsimServer:
    """Start the simulator on a free 127.0.0.1 port with a random password, datastores under
    ``workdir/datastores``, TLS with a CA made for it (``.ca_file``), log ``workdir/vcsim.log``. Call ``.stop()``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    binary = find_vcsim()
    ca_file, cert_file, key_file = make_tls(workdir / "tls")
    secrets_registry.register_input(key_file)
    server = VcsimServer(
        workdir=workdir,
        binary=binary,
        username="administrator@vsphere.local",
        password=secrets.token_urlsafe(18),
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        log_file=workdir / "vcsim.log",
    )
    secrets_registry.register(server.password, "vcsim test server password")
    return server.start()


@pytest.fixture(scope="session")
def vcsim(tmp_path_factory: pytest.TempPathFactory):
    """A vCenter simulator (govmomi vcsim) on loopback over TLS, shared by the session; see tests/servers/vsphere.py."""
    server = start_vcsim(tmp_path_factory.mktemp("vcsim"))
    yield server
    server.stop()
