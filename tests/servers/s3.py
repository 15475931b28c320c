"""A real S3 server for tests: versitygw (Apache-2.0, https://github.com/versity/versitygw) with its POSIX backend.

Why versitygw and not moto: it checks SigV4 signatures. A wrong secret gets ``SignatureDoesNotMatch`` (403) and
an unknown access key gets ``InvalidAccessKeyId`` (403), so credential handling in our hooks is really tested.

Install: ``bash scripts/install_servers.sh`` builds v1.8.0 into ``${VMMIG_CACHE:-$HOME/.cache/vmmigration}/bin``
(``$VERSITYGW`` overrides the binary). ``versitygw --version`` prints "Version git" for a ``go install`` build;
``go version -m <binary>`` shows the real module version.

Command line (global flags go BEFORE the backend sub-command, the backend root is its positional argument)::

    versitygw --access AK --secret SK --region us-east-1 --port 127.0.0.1:PORT \
              --iam-dir WORKDIR/iam --health /health --keep-alive  posix WORKDIR/data

(we pass the keys as ``ROOT_ACCESS_KEY_ID``/``ROOT_SECRET_ACCESS_KEY`` in the environment instead of
``--access/--secret``, which is equivalent and keeps them out of ``ps``).

- ``--port`` takes ``<ip>:<port>``; ``127.0.0.1:PORT`` binds loopback only.
- ``--iam-dir`` matters: without any IAM service versitygw runs in "single account mode" and answers an unknown
  access key with ``XAdminUserNotFound`` (404) instead of ``InvalidAccessKeyId`` (403). With an (empty) internal
  IAM directory the root account from ``--access/--secret`` is the only user and errors look like AWS.
- ``--health /health`` adds an unauthenticated ``GET /health`` -> 200 "OK", used to wait for startup.
- ``--keep-alive``: without it every response carries ``Connection: close`` and boto3 reconnects per request.
- Environment variables ``ROOT_ACCESS_KEY*``, ``ROOT_SECRET_*`` and ``VGW_*`` configure it too; inherited ones
  are dropped from the child's environment so a developer's shell cannot change the test server.
- The region is NOT enforced: a request signed for eu-west-1 is accepted by a server started with us-east-1.
- Bucket names are validated strictly (3-63 chars, S3 rules): ``create_bucket("b1")`` -> ``InvalidBucketName``.
- Request log lines go to stdout (our log file); errors at startup also land there.

Behaviour checked against v1.8.0 (tests/servers/test_servers.py covers most of it):

- PUT/GET/HEAD/DELETE, ``list_objects_v2``; keys with ``/`` become sub-directories of ``<root>/<bucket>/``.
- Ranged GET: ``bytes=2-5`` -> 206 with ``Content-Range: bytes 2-5/11``; suffix ranges (``bytes=-3``) work.
- User metadata (``x-amz-meta-*``) round-trips through PUT, multipart create and HEAD/GET; keys come back
  lower-cased (as on AWS). Content-Type round-trips.
- Multipart: create / upload_part / list_parts / list_multipart_uploads / complete / abort all work.
  Every part except the last must be >= 5 MiB, else ``complete`` fails with ``EntityTooSmall``.
  Part numbers are 1..10000 (10001 -> ``InvalidArgument``; ``--mp-max-parts`` changes the count).
  After ``abort`` ``list_parts`` gives ``NoSuchUpload``. The completed ETag is AWS-style ``"<md5-of-md5s>-N"``.
  ``CopyObject`` refuses sources above 5 GiB (``--copy-object-threshold``).
  Pending uploads live in ``<root>/<bucket>/.sgwtmp/multipart/``; a lock directory ``<root>/.vgwlocks`` appears too.
- A single PUT is written through ``O_TMPFILE`` and linked at the end, so a server killed mid-PUT leaves no
  partial object behind.
- Data survives a restart on the same root (all state is files + xattrs; IAM state is ``iam/users.json``).

POSIX backend requirements: the root directory must support ``user.*`` extended attributes. Object metadata
(ETag, Content-Type, user metadata, checksums, bucket ACL/ownership) is stored in xattrs such as ``user.etag``,
``user.metadata``, ``user.acl``. ext4 (the / and /tmp here) and tmpfs (/dev/shm, kernel >= 6.6) both work.
On a filesystem without user xattrs use ``posix --nometa`` (loses metadata) or ``posix --sidecar DIR``.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import secrets_registry

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
INSTALL_HINT = "run `bash scripts/install_servers.sh` (it builds versitygw into the cache) or set $VERSITYGW"


class ServerStartError(RuntimeError):
    """The server did not come up; the message carries the reason and the tail of its log."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _port_refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def find_versitygw() -> Path:
    """The versitygw binary: ``$VERSITYGW`` or ``${VMMIG_CACHE:-$HOME/.cache/vmmigration}/bin/versitygw``."""
    env = os.environ.get("VERSITYGW")
    if env:
        path = Path(env)
    else:
        cache = Path(os.environ.get("VMMIG_CACHE") or Path.home() / ".cache" / "vmmigration")
        path = cache / "bin" / "versitygw"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ServerStartError(f"versitygw binary not found at {path}: {INSTALL_HINT}")
    return path


@dataclass
class S3Server:
    """A versitygw process serving ``root`` on ``endpoint`` with a single root account."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    root: Path
    port: int
    workdir: Path
    binary: Path
    log_file: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    startup_seconds: float | None = None

    # -- process control -------------------------------------------------------------------------------------
    def _command(self) -> list[str]:
        return [
            str(self.binary),
            "--region", self.region,
            "--port", f"127.0.0.1:{self.port}",
            "--iam-dir", str(self.workdir / "iam"),
            "--health", "/health",
            "--keep-alive",
            "posix", str(self.root),
        ]  # fmt: skip

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> S3Server:
        """Start the process and wait (up to 15 s) until ``GET /health`` answers; raise ServerStartError if not."""
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        (self.workdir / "iam").mkdir(parents=True, exist_ok=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if not (k.startswith(("VGW_", "ROOT_ACCESS_KEY", "ROOT_SECRET_")) or k in ("LOGFILE", "WEBHOOK"))
        }
        # Credentials through the environment (same as --access/--secret) so they do not show up in `ps`.
        env["ROOT_ACCESS_KEY_ID"] = self.access_key
        env["ROOT_SECRET_ACCESS_KEY"] = self.secret_key
        began = time.monotonic()
        with open(self.log_file, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} starting on port {self.port}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        health = f"{self.endpoint}/health"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore http_proxy for loopback
        last_error = "no answer yet"
        while time.monotonic() - began < START_TIMEOUT:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"versitygw exited with code {self.process.returncode} during startup "
                    f"(port {self.port}); tail of {self.log_file}:\n{_tail(self.log_file)}"
                )
            try:
                with opener.open(health, timeout=1) as resp:
                    if resp.status == 200:
                        self.startup_seconds = time.monotonic() - began
                        return self
                    last_error = f"HTTP {resp.status}"
            except (OSError, urllib.error.URLError) as exc:
                last_error = str(exc)
            time.sleep(0.05)
        self._signal(signal.SIGKILL)
        raise ServerStartError(
            f"versitygw did not answer {health} within {START_TIMEOUT:.0f} s ({last_error}); "
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
        deadline = time.monotonic() + STOP_TIMEOUT
        while not _port_refuses(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s. Idempotent."""
        if self.process is None:
            return
        self._signal(signal.SIGTERM)
        self._wait_down()

    def kill(self) -> None:
        """SIGKILL at once (fault injection: the server dies mid-transfer). Returns when the port refuses."""
        if self.process is None:
            return
        self._signal(signal.SIGKILL)
        self._wait_down()

    def restart(self) -> S3Server:
        """Stop (if running) and start again on the same port with the same data and credentials."""
        self.stop()
        return self.start()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------------------------
    def client(
        self,
        access_key: str | None = None,
        secret_key: str | None = None,
        config: Any | None = None,
    ) -> Any:
        """A boto3 S3 client for this server (path-style addressing, 2 attempts, short connect timeout).

        ``access_key``/``secret_key`` override the server's credentials (to test rejection);
        ``config`` (a ``botocore.config.Config``) is merged over the defaults.
        """
        import boto3
        from botocore.config import Config

        cfg = Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        )
        if config is not None:
            cfg = cfg.merge(config)
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key if access_key is None else access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            region_name=self.region,
            config=cfg,
        )

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (3-63 chars, S3 naming rules) and return it."""
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """AWS_* variables pointing boto3/the AWS CLI at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }


def start_s3_server(workdir: Path, *, region: str = "us-east-1", port: int | None = None) -> S3Server:
    """Start versitygw on a free 127.0.0.1 port with random root credentials; data in ``workdir/data``.

    Logs go to ``workdir/versitygw.log``. Raises ServerStartError (with the log tail) if it does not answer
    within 15 s, or if the binary is missing. Call ``.stop()`` when done.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    binary = find_versitygw()
    port = port or _free_port()
    server = S3Server(
        endpoint=f"http://127.0.0.1:{port}",
        access_key="AK" + secrets.token_hex(9).upper(),
        secret_key=secrets.token_urlsafe(30),
        region=region,
        root=workdir / "data",
        port=port,
        workdir=workdir,
        binary=binary,
        log_file=workdir / "versitygw.log",
    )
    secrets_registry.register(server.access_key, "S3 test server access key")
    secrets_registry.register(server.secret_key, "S3 test server secret key")
    return server.start()
