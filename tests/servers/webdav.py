"""A real HTTP(S) storage server for tests: plain Debian nginx with the WebDAV module and a bearer token.

Install: ``bash scripts/install_servers.sh`` (apt ``nginx``; Debian's build has ``--with-http_dav_module``, so
nginx-extras is not needed). Layout under ``workdir``::

    nginx.conf  nginx.pid  logs/{error,access}.log  tmp/{body,proxy,fastcgi,uwsgi,scgi}/
    webdav/disks/...        <- ``root``; URL ``http(s)://127.0.0.1:PORT/disks/<path>`` maps to ``webdav/disks/<path>``
    tls/{ca.pem,server.pem,server.key}   (tls=True only)

What the server does (see ``_CONF``):

- Every request to ``/disks/`` needs ``Authorization: Bearer <token>``; otherwise 401 with
  ``WWW-Authenticate: Bearer``. Checked with a ``map`` on ``$http_authorization`` (exact string match).
- ``dav_methods PUT DELETE MKCOL COPY MOVE``; ``create_full_put_path on`` creates missing parent directories on PUT.
  PUT of a new file -> 201, overwrite -> 204, DELETE -> 204, MKCOL -> 201. ``client_max_body_size 0`` (no limit);
  chunked PUT (``Transfer-Encoding: chunked``, e.g. requests with a generator body) works.
  The request body is buffered to ``tmp/body`` and moved into place when complete, so a PUT interrupted by
  ``kill()`` leaves no partial file under ``root`` (only a stale temp file in ``tmp/body``).
- GET/HEAD are nginx static file serving: ``Accept-Ranges: bytes``, ``ETag``, ``Last-Modified``,
  ``Range: bytes=a-b`` -> 206 with ``Content-Range``; ``autoindex on`` lists directories (HTML).
- No PROPFIND (needs libnginx-mod-http-dav-ext; plain nginx answers 405).

Quirks:

- Master runs as the invoking user. nginx's compiled-in worker user is ``nobody``; when we run as root the
  workers could not even reach a pytest ``tmp_path`` (``/tmp/pytest-of-root`` is mode 0700), so as root we set
  ``user root root;`` and the workers run as root. As non-root, ``user`` is ignored and workers run as us.
  ``root`` is additionally made mode 0777 so a worker under another uid could still write.
- ``kill()`` must SIGKILL the whole process group: killing only the master leaves the workers serving on the
  listening socket. We start nginx in its own session and signal the group.
- ``ServerStartError`` is the same class as in tests/servers/s3.py. A busy port makes nginx retry bind() for about
  2.5 s before it exits; the error-log tail then says "Address already in use".
- ``nginx -t`` runs first so a config error comes back as a readable ServerStartError.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests import secrets_registry
from tests.servers.pki import server_tls
from tests.servers.s3 import ServerStartError, _free_port, _port_refuses, _tail

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
INSTALL_HINT = "run `bash scripts/install_servers.sh` (it installs Debian nginx)"
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=-]+$")

_CONF = """\
{user_line}
worker_processes 2;
pid {workdir}/nginx.pid;
error_log {workdir}/logs/error.log warn;
daemon off;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/logs/access.log;
    client_body_temp_path {workdir}/tmp/body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    sendfile on;
    default_type application/octet-stream;
    map $http_authorization $token_ok {{
        default 0;
        "Bearer {token}" 1;
    }}
    server {{
        listen 127.0.0.1:{port}{ssl};
{tls_lines}
        location /disks/ {{
            if ($token_ok = 0) {{
                add_header WWW-Authenticate 'Bearer realm="disks"' always;
                return 401;
            }}
            root {workdir}/webdav;
            dav_methods PUT DELETE MKCOL COPY MOVE;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            client_max_body_size 0;
            client_body_buffer_size 16m;
            autoindex on;
        }}
    }}
}}
"""

_TLS = """\
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;"""


def find_nginx() -> Path:
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d and os.access(Path(d) / "nginx", os.X_OK):
            return Path(d) / "nginx"
    raise ServerStartError(f"nginx not found: {INSTALL_HINT}")


def make_tls_files(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """Write a self-signed CA and a server cert for ``host`` (+ localhost) signed by it.

    Returns ``(ca_file, cert_file, key_file)``; ``cert_file`` holds the server cert followed by the CA.
    """
    ca_file, cert_file, key_file = server_tls(directory / "ca.pem", directory / "server.pem",
                                              directory / "server.key", ca_cn="vmmigration test CA", host=host,
                                              chain=True, days=30)
    secrets_registry.register(key_file.read_text(), "WebDAV test server TLS private key")
    secrets_registry.register_input(key_file)
    return ca_file, cert_file, key_file


@dataclass
class WebDavServer:
    """An nginx process serving ``root`` at ``url`` (``.../disks/``), guarded by ``Authorization: Bearer token``."""

    url: str
    token: str
    root: Path
    port: int
    workdir: Path
    conf_file: Path
    binary: Path
    ca_file: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    startup_seconds: float | None = None

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    @property
    def error_log(self) -> Path:
        return self.workdir / "logs" / "error.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- process control -------------------------------------------------------------------------------------
    def _nginx(self, *args: str) -> list[str]:
        return [str(self.binary), "-c", str(self.conf_file), "-p", f"{self.workdir}/", "-e", str(self.error_log), *args]

    def _failure(self, what: str) -> ServerStartError:
        return ServerStartError(f"nginx {what} (port {self.port}); tail of {self.error_log}:\n{_tail(self.error_log)}")

    def start(self) -> WebDavServer:
        """Start nginx and wait (up to 15 s) until it answers HTTP; raise ServerStartError if not."""
        if self.running:
            return self
        began = time.monotonic()
        with open(self.workdir / "logs" / "nginx.out", "ab") as out:
            self.process = subprocess.Popen(
                self._nginx(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        last_error = "no answer yet"
        probe = requests.Session()
        probe.trust_env = False  # never through an http(s)_proxy from the environment
        while time.monotonic() - began < START_TIMEOUT:
            if self.process.poll() is not None:
                raise self._failure(f"exited with code {self.process.returncode} during startup")
            try:
                # No token on purpose: a 401 from /disks/ proves nginx is up with our config.
                resp = probe.get(self.url, timeout=1, verify=self.verify)
                if resp.status_code == 401:
                    self.startup_seconds = time.monotonic() - began
                    return self
                last_error = f"HTTP {resp.status_code}"
            except requests.RequestException as exc:
                last_error = str(exc)
            time.sleep(0.05)
        self._signal(signal.SIGKILL)
        raise self._failure(f"did not answer {self.url} within {START_TIMEOUT:.0f} s ({last_error})")

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)  # master + workers: our own session/process group
        except ProcessLookupError:
            pass

    def _wait_down(self) -> None:
        assert self.process is not None
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT)
        try:  # workers outlive a SIGKILLed master for a moment; they are in the same group
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while not _port_refuses(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (nginx fast shutdown), then SIGKILL after 5 s. Idempotent."""
        if self.process is None:
            return
        self._signal(signal.SIGTERM)
        self._wait_down()

    def kill(self) -> None:
        """SIGKILL master and workers at once (fault injection). Returns when the port refuses connections."""
        if self.process is None:
            return
        self._signal(signal.SIGKILL)
        self._wait_down()

    def restart(self) -> WebDavServer:
        """Stop (if running) and start again on the same port with the same data, token and certificate."""
        self.stop()
        return self.start()

    def __enter__(self) -> WebDavServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------------------------
    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def verify(self) -> str | bool:
        """The ``verify=`` value for requests: the CA file in TLS mode."""
        return str(self.ca_file) if self.ca_file else True

    def url_for(self, path: str) -> str:
        return self.url + path.lstrip("/")

    def session(self) -> requests.Session:
        """A requests session with the token and the CA configured (ignores proxy variables)."""
        s = requests.Session()
        s.trust_env = False
        s.headers.update(self.headers)
        s.verify = self.verify
        return s

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """``method`` on ``url + path`` with the token; ``headers=`` are added to it. Does not raise."""
        kwargs.setdefault("timeout", 60)
        with self.session() as s:
            return s.request(method, self.url_for(path), **kwargs)

    def put(self, path: str, data: Any, **kwargs: Any) -> requests.Response:
        """PUT ``data`` (bytes, file object or generator) to ``url + path`` with the token. Does not raise."""
        return self.request("PUT", path, data=data, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        """GET ``url + path`` with the token (pass ``headers={"Range": ...}`` etc.). Does not raise."""
        return self.request("GET", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)


def start_webdav_server(
    workdir: Path, token: str | None = None, *, tls: bool = False, port: int | None = None
) -> WebDavServer:
    """Write ``workdir/nginx.conf`` and start nginx on a free 127.0.0.1 port (https with a fresh CA if ``tls``).

    ``token`` defaults to a random one. Files live in ``workdir/webdav/disks`` (``server.root``). Raises
    ServerStartError (with the error-log tail) if nginx is missing, the config is bad, or it does not answer
    within 15 s. Call ``.stop()`` when done.
    """
    workdir = Path(workdir).resolve()
    binary = find_nginx()
    token = token or secrets.token_urlsafe(24)
    if not _TOKEN_RE.match(token):
        raise ValueError("token must be URL-safe characters only (it is embedded in nginx.conf)")
    port = port or _free_port()
    for sub in ("logs", "tmp", "webdav/disks"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    root = workdir / "webdav" / "disks"
    for d in (workdir / "webdav", root):
        d.chmod(0o777)

    ca_file = None
    tls_lines = ""
    if tls:
        ca_file, cert_file, key_file = make_tls_files(workdir / "tls")
        tls_lines = _TLS.format(cert=cert_file, key=key_file)
    conf = _CONF.format(
        user_line="user root root;" if os.geteuid() == 0 else "",
        workdir=workdir,
        token=token,
        port=port,
        ssl=" ssl" if tls else "",
        tls_lines=tls_lines,
    )
    conf_file = workdir / "nginx.conf"
    conf_file.write_text(conf)
    secrets_registry.register(token, "WebDAV test server bearer token")
    secrets_registry.register_input(conf_file)  # holds the token by design

    server = WebDavServer(
        url=f"{'https' if tls else 'http'}://127.0.0.1:{port}/disks/",
        token=token,
        root=root,
        port=port,
        workdir=workdir,
        conf_file=conf_file,
        binary=binary,
        ca_file=ca_file,
    )
    check = subprocess.run(server._nginx("-t", "-q"), capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise ServerStartError(f"nginx -t rejected {conf_file}:\n{check.stdout}{check.stderr}")
    return server.start()
