"""A Proxmox VE connection: the REST API through proxmoxer (API token, or ticket login as the fallback), tasks
waited on by UPID, a streamed upload, and SSH (paramiko) for the disk bytes the API does not serve.

The Provider's Secret: ``tokenId`` (``user@realm!name``) and ``tokenSecret``, or ``username`` and ``password``;
``caBundle`` for a node certificate this machine does not trust (``insecureSkipVerify: "true"`` turns checking off,
with a warning); ``sshPrivateKey`` and ``sshKnownHosts`` (the node's host keys, checked; required), ``sshUser``
(default ``root``) and ``sshPort`` (default 22) for the disk bytes. ``proxmoxer`` and ``paramiko`` are imported
lazily: this module is read at DAG parse time.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from typing import Any
from urllib.parse import quote, urlsplit

from include.diskio import CHUNK, Segment
from include.errors import ConfigurationError, HypervisorAuthError, HypervisorError, InvalidMigration

log = logging.getLogger(__name__)

#: how long a PVE task (create, snapshot, delete...) may run before the phase fails on it
TASK_TIMEOUT = 1800.0


def _insecure(creds: Mapping[str, str]) -> bool:
    return str(creds.get("insecureSkipVerify") or "").lower() in ("true", "1", "yes")


class TaskFailed(HypervisorError):
    """A PVE task ended with an exit status other than OK; the message carries its last log lines."""


class Proxmox:
    """One Proxmox VE endpoint (a node or any node of a cluster) for one task."""

    def __init__(self, endpoint: str, credentials: Mapping[str, str] | None, *, insecure: bool = False,
                 ssh_connect: SshConnect | None = None) -> None:
        self.endpoint = endpoint
        parts = urlsplit(endpoint)
        self.host = parts.hostname or ""
        self.port = parts.port or 8006
        self.creds = dict(credentials or {})
        self.insecure = insecure or _insecure(self.creds)
        #: how an SSH client is made (the Airflow hook passes one on the SSH provider's SSHHook)
        self.ssh_connect = ssh_connect or connect_paramiko

    # -- the API ------------------------------------------------------------------------------------------
    @property
    def verify(self) -> bool | str:
        from include.storage.tls import ca_bundle_file

        if self.insecure:
            return False
        bundle = self.creds.get("caBundle") or self.creds.get("ca.crt")
        return ca_bundle_file(bundle) if bundle else True

    @cached_property
    def api(self) -> Any:
        """The proxmoxer client (checked endpoint and address; token first, ticket login otherwise)."""
        from proxmoxer import ProxmoxAPI

        from include.endpoints import ensure_provider_endpoint

        ensure_provider_endpoint("proxmox", self.endpoint, "Proxmox VE")
        if self.insecure:
            log.warning("TLS verification is DISABLED for Proxmox VE %s", self.endpoint)
        common = {"host": self.host, "port": self.port, "verify_ssl": self.verify, "backend": "https",
                  "service": "PVE", "timeout": 60}
        token_id, secret = self.creds.get("tokenId"), self.creds.get("tokenSecret")
        if token_id and secret:
            user, _, name = token_id.partition("!")
            if not name:
                raise InvalidMigration("the Provider's Secret key tokenId must be user@realm!tokenname",
                                       field="spec.credentialSecretRef")
            return ProxmoxAPI(user=user, token_name=name, token_value=secret, **common)
        if self.creds.get("username") and self.creds.get("password"):
            try:
                return ProxmoxAPI(user=self.creds["username"], password=self.creds["password"], **common)
            except Exception as err:  # noqa: BLE001 - proxmoxer's AuthenticationError, or a connection error
                raise self.translate(err, "logging in") from None
        raise InvalidMigration("the Provider's Secret needs tokenId and tokenSecret (or username and password)",
                               field="spec.credentialSecretRef")

    def translate(self, err: BaseException, what: str) -> Exception:
        """proxmoxer's and requests' errors as engine errors: 401 permanent, 400 invalid, the rest transient."""
        from proxmoxer.core import AuthenticationError, ResourceException

        if isinstance(err, AuthenticationError):
            return HypervisorAuthError(f"Proxmox VE {self.endpoint} refused the login: {err}")
        if isinstance(err, ResourceException):
            status = getattr(err, "status_code", None)
            # a node's message is its status line's reason (proxmoxer keeps it as ``content``); the generic phrase
            # of the status code only where the reason is empty
            reason = str(getattr(err, "content", "") or "").strip()
            generic = str(err.status_message or "")
            detail = (reason if reason and reason != generic else generic) + \
                (f" {err.errors}" if getattr(err, "errors", None) else "")
            if status == 401:
                return HypervisorAuthError(f"Proxmox VE {self.endpoint} refused the Provider's credentials "
                                           f"while {what}: {detail}")
            if status == 403:
                return HypervisorAuthError(f"Proxmox VE {self.endpoint}: permission denied while {what}: {detail}")
            if status == 400:
                return InvalidMigration(f"Proxmox VE {self.endpoint} refused {what}: {detail}")
            return HypervisorError(f"Proxmox VE {self.endpoint}: {what} failed: HTTP {status} {detail}")
        if isinstance(err, OSError):
            return HypervisorError(f"Proxmox VE {self.endpoint}: {what}: {type(err).__name__}: {err}")
        return HypervisorError(f"Proxmox VE {self.endpoint}: {what}: {err}")

    def call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(api)`` with its errors translated."""
        try:
            return fn(self.api)
        except (HypervisorError, InvalidMigration):
            raise
        except Exception as err:  # noqa: BLE001 - translated into the engine's errors
            raise self.translate(err, what) from None

    def wait(self, node: str, upid: str, what: str, *, timeout: float = TASK_TIMEOUT) -> None:
        """Wait for a task; a failed one raises TaskFailed with its last log lines."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        task = quote(upid, safe="")  # a UPID holds ':' and may hold '/' (an image delete's volid)
        node = upid.split(":")[1] if upid.startswith("UPID:") else node  # the task runs where it was started
        while True:
            status = self.call(what, lambda api: api.nodes(node).tasks(task).status.get())
            if status.get("status") == "stopped":
                exit_status = str(status.get("exitstatus"))
                if exit_status == "OK":
                    return
                if exit_status.startswith("WARNINGS"):  # done, with warnings in its log
                    log.warning("%s: the task ended with %s", what, exit_status)
                    return
                lines = self.call(what, lambda api: api.nodes(node).tasks(task).log.get(limit=500)) or []
                tail = "; ".join(str(x.get("t", "")) for x in lines[-5:] if x.get("t"))
                raise TaskFailed(f"{what} failed: {status.get('exitstatus')}"
                                 + (f" (task log: {tail})" if tail else ""))
            if time.monotonic() > deadline:
                raise HypervisorError(f"{what}: task {upid} did not finish within {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    # -- upload ---------------------------------------------------------------------------------------------
    def upload(self, node: str, storage: str, filename: str, segments: Iterator[Segment], length: int, *,
               sha256: str | None = None) -> str:
        """POST a file into ``storage`` as content ``import`` (PVE 8.4 and later), streamed with its length
        announced (holes sent as zeros: HTTP has no holes), with its ``sha256`` for the node to check; returns the
        task's UPID."""
        import requests

        boundary = uuid.uuid4().hex
        fields = [("content", "import")]
        if sha256:
            # in pveproxy's order: it parses content, checksum-algorithm, checksum, then the file, and no other
            fields += [("checksum-algorithm", "sha256"), ("checksum", sha256)]
        head = ("".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                        for k, v in fields) +
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"filename\"; filename=\"{filename}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        body = _Body(head, segments, length, tail)
        url = f"https://{self.host}:{self.port}/api2/json/nodes/{quote(node)}/storage/{quote(storage)}/upload"
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        token_id, secret = self.creds.get("tokenId"), self.creds.get("tokenSecret")
        cookies = None
        if token_id and secret:
            headers["Authorization"] = f"PVEAPIToken={token_id}={secret}"
        else:  # the ticket of the proxmoxer session
            auth = self.api._store["session"].auth  # noqa: SLF001 - proxmoxer keeps its ticket there
            cookies = {"PVEAuthCookie": auth.pve_auth_ticket}
            headers["CSRFPreventionToken"] = auth.csrf_prevention_token
        with requests.Session() as http:
            http.trust_env = False
            try:
                resp = http.post(url, data=body, headers=headers, cookies=cookies, verify=self.verify,
                                 timeout=(30, 3600))
            except OSError as err:
                raise HypervisorError(f"uploading {filename} to {storage}: {type(err).__name__}") from None
        if resp.status_code == 401:
            raise HypervisorAuthError(f"Proxmox VE {self.endpoint} refused the upload's credentials")
        if resp.status_code >= 400:
            raise HypervisorError(f"uploading {filename} to {storage}: HTTP {resp.status_code} {resp.reason}: "
                                  f"{resp.text[:300]}")
        return str(resp.json()["data"])

    # -- SSH ------------------------------------------------------------------------------------------------
    def ssh(self, host: str | None = None) -> Any:
        """A paramiko client to the node: its host key must be the one ``sshKnownHosts`` lists for it (only that
        key's type is negotiated), the Secret's ``sshPrivateKey`` authenticates."""
        import paramiko

        key_text = self.creds.get("sshPrivateKey") or self.creds.get("ssh-privatekey")
        known = self.creds.get("sshKnownHosts")
        if not key_text:
            raise ConfigurationError("the Provider's Secret has no sshPrivateKey: disk bytes of a Proxmox VE node are "
                                     "only reachable over SSH", field="spec.credentialSecretRef")
        if not known:
            raise ConfigurationError("the Provider's Secret has no sshKnownHosts: the node's SSH host key must be "
                                     "known", field="spec.credentialSecretRef")
        key = _private_key(key_text)
        target, port = host or self.host, int(self.creds.get("sshPort") or 22)
        host_key = trusted_host_key(known, target, port)
        user = self.creds.get("sshUser") or "root"
        try:
            return self.ssh_connect(target, port, user, key, host_key)
        except paramiko.AuthenticationException:
            raise HypervisorAuthError(f"the Proxmox VE node {target} refused the SSH key") from None
        except paramiko.BadHostKeyException:
            raise ConfigurationError(f"the SSH host key of {target} is not the one in the Provider's sshKnownHosts",
                                     field="spec.credentialSecretRef") from None
        except paramiko.SSHException as err:
            if "not found in known_hosts" in str(err):
                raise ConfigurationError(f"the SSH host key of {target}:{port} is not the one in the Provider's "
                                         f"sshKnownHosts", field="spec.credentialSecretRef") from None
            raise HypervisorError(f"SSH to {target}:{port}: {err}") from None
        except OSError as err:
            raise HypervisorError(f"SSH to {target}:{port}: {err}") from None

    def run(self, client: Any, command: list[str], what: str, *, timeout: float = 600) -> str:
        """Run a command (every argument quoted) and return its output; a failure raises with its stderr, a
        command silent for ``timeout`` seconds raises TimeoutError."""
        import shlex

        _in, out, err = client.exec_command(" ".join(shlex.quote(a) for a in command), timeout=timeout)
        text, problem = out.read().decode(), err.read().decode()
        status = out.channel.recv_exit_status()
        if status != 0:
            raise HypervisorError(f"{what}: `{command[0]} {command[1] if len(command) > 1 else ''}` exited "
                                  f"{status}: {problem.strip()[-300:]}")
        return text


#: (host, port, user, private key, the host's one trusted key) -> a connected paramiko SSHClient
SshConnect = Callable[[str, int, str, Any, Any], Any]
_HOST_KEY_ALGORITHMS = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                        "rsa-sha2-512", "rsa-sha2-256", "ssh-rsa", "ssh-dss")


def trusted_host_key(known: str, host: str, port: int) -> Any:
    """The one key ``known`` (known_hosts lines, hashed ones too) lists for ``host`` on ``port`` (``[host]:port``
    unless 22), the first where it lists several; ConfigurationError when it lists none or cannot be read."""
    import tempfile

    import paramiko

    with tempfile.NamedTemporaryFile("w", suffix=".known_hosts") as fh:
        fh.write(known)
        fh.flush()
        try:
            keys = paramiko.HostKeys(fh.name)
        except Exception:  # noqa: BLE001 - paramiko's InvalidHostKey and friends
            raise ConfigurationError("the Provider's sshKnownHosts has a line paramiko cannot read",
                                     field="spec.credentialSecretRef") from None
    found = keys.lookup(host if port == 22 else f"[{host}]:{port}")
    if not found:
        raise ConfigurationError(f"{host}:{port} is not in the Provider's sshKnownHosts",
                                 field="spec.credentialSecretRef")
    return next(iter(found.values()))


def check_host_key(client: Any, host_key: Any, host: str) -> Any:
    """Close and refuse a connection whose server showed another key than ``host_key`` (whatever else the client
    trusted, such as the worker's own ~/.ssh/known_hosts)."""
    import paramiko

    shown = client.get_transport().get_remote_server_key()
    if shown.asbytes() != host_key.asbytes():
        client.close()
        raise paramiko.BadHostKeyException(host, shown, host_key)
    return client


def other_host_key_algorithms(host_key: Any) -> list[str]:
    """The host key algorithms to refuse so that the server shows the key we trust (and no other type)."""
    name = host_key.get_name()
    allowed = {name, "rsa-sha2-512", "rsa-sha2-256"} if name == "ssh-rsa" else {name}
    return [a for a in _HOST_KEY_ALGORITHMS if a not in allowed]


def connect_paramiko(host: str, port: int, user: str, key: Any, host_key: Any) -> Any:
    """A paramiko client trusting ``host_key`` only (any other key is refused)."""
    import paramiko

    client = paramiko.SSHClient()
    client.get_host_keys().add(host if port == 22 else f"[{host}]:{port}", host_key.get_name(), host_key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(host, port=port, username=user, pkey=key, allow_agent=False, look_for_keys=False, timeout=30,
                       disabled_algorithms={"keys": other_host_key_algorithms(host_key)})
    except BaseException:
        client.close()
        raise
    return check_host_key(client, host_key, host)


def _private_key(text: str) -> Any:
    import paramiko

    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError):
            continue
    raise ConfigurationError("the Provider's sshPrivateKey is not an OpenSSH private key paramiko reads",
                             field="spec.credentialSecretRef")


class _Body:
    """A multipart body of known length: a head, the segments (holes as zeros), a tail."""

    def __init__(self, head: bytes, segments: Iterator[Segment], length: int, tail: bytes) -> None:
        self._parts = iter([head])
        self._segments = iter(segments)
        self._tail = tail
        self._length = len(head) + length + len(tail)
        self._buf = memoryview(b"")
        self._hole = 0
        self._state = "head"
        self.sent = 0

    def __len__(self) -> int:
        return self._length - self.sent

    def read(self, size: int = -1) -> bytes:
        size = CHUNK if size is None or size < 0 else max(size, 1)
        while not self._buf and not self._hole:
            if self._state == "head":
                self._buf, self._state = memoryview(next(self._parts)), "data"
            elif self._state == "data":
                seg = next(self._segments, None)
                if seg is None:
                    if self.sent < self._length - len(self._tail):
                        raise HypervisorError(f"the upload's stream ended after {self.sent} of "
                                              f"{self._length - len(self._tail)} bytes")
                    self._buf, self._state = memoryview(self._tail), "done"
                elif seg.data is None:
                    self._hole = seg.length
                else:
                    self._buf = memoryview(seg.data)
            else:
                return b""
        if self._hole:
            n = min(self._hole, size)
            self._hole -= n
            out = bytes(n)
        else:
            out = bytes(self._buf[:size])  # a view moves on, nothing behind it is copied again
            self._buf = self._buf[len(out):]
        self.sent += len(out)
        return out


def stream_file(client: Any, path: str, what: str) -> Iterator[Segment]:
    """A file on the node over SFTP, in chunks; all-zero chunks come as holes (never sent on)."""
    sftp = client.open_sftp()
    try:
        try:
            handle = sftp.open(path, "rb")
        except OSError as err:
            raise HypervisorError(f"{what}: cannot open {path} on the node: {err}") from None
        with handle as fh:
            fh.prefetch()
            done = 0
            while True:
                try:
                    chunk = fh.read(CHUNK)
                except OSError as err:
                    raise HypervisorError(f"{what}: reading {path} broke off after {done} bytes: {err}") from None
                if not chunk:
                    return
                done += len(chunk)
                if chunk.count(0) == len(chunk):
                    yield Segment(length=len(chunk))
                else:
                    yield Segment(length=len(chunk), data=chunk)
    finally:
        sftp.close()


class RandomReader:
    """An SFTP file read at offsets: reads above 64 KiB are pipelined (``readv``), not one round trip per 32 KiB."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.pos = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset
        return offset

    def read(self, size: int = -1) -> bytes:
        if 0 <= size <= 65536:
            self.fh.seek(self.pos)
            data = self.fh.read(size)
        else:
            data = b"".join(self.fh.readv([(self.pos, size)]))
        self.pos += len(data)
        return data
