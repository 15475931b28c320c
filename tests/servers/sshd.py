"""A real OpenSSH server (Debian's openssh-server) on 127.0.0.1 with generated keys, so that libvirt's
``qemu+ssh://`` transport can be tested against this host's libvirtd as if it were a remote one.

libvirt runs ``virt-ssh-helper`` (from libvirt-clients) on the far side; root logs in with a key only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests import secrets_registry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SshServer:
    workdir: Path
    port: int
    client_key: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def private_key(self) -> str:
        return self.client_key.read_text()

    def libvirt_uri(self, *, with_keyfile: bool = True) -> str:
        uri = f"qemu+ssh://root@127.0.0.1:{self.port}/system?no_verify=1"
        return uri + (f"&keyfile={self.client_key}" if with_keyfile else "")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(10)


def start_ssh_server(workdir: Path) -> SshServer:
    workdir.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory; sshd refuses to start without it
    host_key, client_key = workdir / "hostkey", workdir / "clientkey"
    for key in (host_key, client_key):
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    for key, what in ((host_key, "sshd test server host key"), (client_key, "SSH test client private key")):
        secrets_registry.register(key.read_text(), what)
        secrets_registry.register_input(key)
    (workdir / "authorized_keys").write_text((workdir / "clientkey.pub").read_text())
    port = _free_port()
    config = workdir / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {workdir}/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {workdir}/authorized_keys
StrictModes no
UsePAM no
""")
    check = subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"sshd config rejected: {check.stderr}")
    log = open(workdir / "sshd.log", "wb")  # noqa: SIM115 - kept for the server's life
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = SshServer(workdir=workdir, port=port, client_key=client_key, process=proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {(workdir / 'sshd.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                if sock.recv(4).startswith(b"SSH"):
                    return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError("sshd did not answer within 10 s")
