"""A real Kubernetes API server for tests: kube-apiserver v1.36.3 on etcd v3.6.16, both built from the Go module
proxy by our own wrapper modules (``tests/servers/kube/kas`` and ``tests/servers/kube/etcd``), spoken to with the
official ``kubernetes`` Python client over TLS, with bearer tokens and RBAC, and the project's CRDs applied.

Install: ``bash scripts/install_servers.sh kube`` builds ``${VMMIG_CACHE:-$HOME/.cache/vmmigration}/bin/
kube-apiserver-<key>`` and ``.../etcd-<key>``, each ``<key>`` the first 16 hex digits of sha256(go.mod + go.sum +
main.go) of its module (``$KUBE_APISERVER`` and ``$ETCD`` override the binaries). ``find_binaries()`` runs that step
itself when a binary for the current sources is missing (about 6 minutes cold on 2 cores, needs Go and the proxy).

What runs (in the fixture's tmp folder, every port a free one on 127.0.0.1, nothing else)::

    etcd --data-dir etcd-data/ --listen-client-urls http://127.0.0.1:E --listen-peer-urls http://127.0.0.1:P \
         --unsafe-no-fsync ...
    kube-apiserver --etcd-servers=http://127.0.0.1:E --bind-address=127.0.0.1 --secure-port=S \
         --tls-cert-file --token-auth-file --service-account-* --authorization-mode=RBAC ...

- TLS: a CA made for this server (``ca_path``; its key is not kept) signs the serving certificate for
  127.0.0.1/localhost. No client certificates: identities are bearer tokens.
- Identities (``identities``; ``token(name)``): ``admin`` (user ``admin``, group ``system:masters``: may do
  anything), ``engine`` (user ``vmmigration-engine``) and ``viewer`` (user ``vmmigration-viewer``), both without
  groups, so RBAC gives them nothing beyond discovery until a test binds a Role. More identities:
  ``add_service_account(name, namespace)`` makes a ServiceAccount and a token for it (TokenRequest; instant,
  the user is ``system:serviceaccount:<ns>:<name>``); ``add_user(name, user, groups)`` adds a static token and
  restarts the API server (the token file is read at start only; 3-5 s).
- Only kube-apiserver runs: no controller manager, no scheduler, no kubelet. Namespaces are created but never
  emptied on delete (the namespace controller is missing: a deleted namespace stays ``Terminating``); a new
  namespace gets no ``default`` ServiceAccount; owner-reference garbage collection does not happen. Use a fresh
  namespace per test instead of deleting.
- Timings here (2 cores): start 4-5 s (etcd ~1 s, kube-apiserver ~3 s, CRDs ~0.3 s); the FIRST write of a
  custom resource type (also a dry run) takes 2 s once, later ones a few ms.
- The CRDs in ``deploy/crds/*.yaml`` are applied (server-side apply, as admin) at start and are Established
  before the fixture yields. ``VMMigration`` (``infra.virtrigaud.io/v1beta1``, plural ``vmmigrations``) has a
  ``/status`` subresource: a spec write leaves status alone, status is written only through ``.../status``.
- ``restart_apiserver()`` stops the API server (SIGTERM; it drains in about 1 s here, SIGKILL after 15 s) and
  starts it again on the same port (3-5 s in all); etcd keeps running, so every object survives. Clients made
  before keep working (they reconnect).
- Logs: ``apiserver_log`` and ``etcd_log`` (appended to on a restart, with a ``=== HH:MM:SS starting`` line).
- The processes are in their own process group and get SIGKILL if the thread that started them exits (Linux
  ``PR_SET_PDEATHSIG``), so a killed pytest leaves nothing behind. Start, restart and ``add_user`` from the main
  thread. ``start_kube_api(..., detached=True)`` (the demo's) leaves that out: the servers outlive the process
  that started them, and ``pids`` says whom to stop.
- HTTP clients here never use proxies or CA bundles from the environment (``REQUESTS_CA_BUNDLE`` is set on this
  machine): ``configuration()`` sets ``ssl_ca_cert`` and clears ``proxy``/``no_proxy``, which the client's
  ``Configuration()`` would otherwise read from ``HTTPS_PROXY`` and friends. The server processes get no proxy
  variables either.

Secrets: every token is registered with tests/secrets_registry.py; the files that hold them by design (token
file, kubeconfigs, private keys) are under ``<workdir>/secrets/``, which the end-of-session scan leaves out.

The ``kube_api`` fixture is session-scoped: tests share one API server, so each test should use its own
namespace (and RBAC names); a restart (``restart_apiserver``, ``add_user``) is seen by every test's clients.
"""

from __future__ import annotations

import base64
import concurrent.futures
import ctypes
import hashlib
import os
import secrets
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests import secrets_registry
from tests.servers.pki import server_tls

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, Configuration

ROOT = Path(__file__).resolve().parent.parent.parent
SOURCES = Path(__file__).resolve().parent / "kube"
CRD_DIR = ROOT / "deploy" / "crds"
MODULES = {"kube-apiserver": SOURCES / "kas", "etcd": SOURCES / "etcd"}
ETCD_START_TIMEOUT = 20.0
APISERVER_START_TIMEOUT = 60.0
APISERVER_STOP_TIMEOUT = 15.0  # kube-apiserver drains after SIGTERM (about 1 s here; longer with open watches)
ETCD_STOP_TIMEOUT = 10.0
CRD_TIMEOUT = 30.0
SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
FIELD_MANAGER = "vmmigration-tests"
STATIC_IDENTITIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "admin": ("admin", ("system:masters",)),
    "engine": ("vmmigration-engine", ()),
    "viewer": ("vmmigration-viewer", ()),
}
INSTALL_HINT = (
    "run `bash scripts/install_servers.sh kube` (it builds kube-apiserver and etcd into the cache) "
    "or set $KUBE_APISERVER and $ETCD"
)
_PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """etcd or kube-apiserver did not come up; the message carries the reason and the tail of its log."""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _cache_dir() -> Path:
    return Path(os.environ.get("VMMIG_CACHE") or Path.home() / ".cache" / "vmmigration")


def source_key(name: str) -> str:
    """The build key of ``name``'s Go module ("kube-apiserver" or "etcd"); the same as
    scripts/install_servers.sh computes."""
    digest = hashlib.sha256()
    for part in ("go.mod", "go.sum", "main.go"):
        digest.update((MODULES[name] / part).read_bytes())
    return digest.hexdigest()[:16]


def find_binaries(*, build: bool = True) -> tuple[Path, Path]:
    """(kube-apiserver, etcd): ``$KUBE_APISERVER``/``$ETCD``, else ``<cache>/bin/<name>-<source_key(name)>``, built
    first by ``install_servers.sh kube`` if one is missing (``build=False``: raise ServerStartError instead)."""
    paths = {}
    for name, env_var in (("kube-apiserver", "KUBE_APISERVER"), ("etcd", "ETCD")):
        env = os.environ.get(env_var)
        paths[name] = (Path(env) if env else _cache_dir() / "bin" / f"{name}-{source_key(name)}", bool(env))
    missing = [name for name, (path, _) in paths.items() if not (path.is_file() and os.access(path, os.X_OK))]
    if missing and build and not any(paths[name][1] for name in missing):
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "install_servers.sh"), "kube"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise ServerStartError(f"building kube-apiserver/etcd failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    for name, (path, _) in paths.items():
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ServerStartError(f"{name} binary not found at {path}: {INSTALL_HINT}")
    return paths["kube-apiserver"][0], paths["etcd"][0]


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 (held open together while picking, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def make_pki(folder: Path, secret_folder: Path) -> dict[str, Path]:
    """A throw-away CA, a serving certificate for 127.0.0.1/localhost (and the in-cluster names) signed by it,
    and a service-account signing key pair. Public files go to ``folder``, private keys to ``secret_folder``.

    Returns paths under the keys ``ca``, ``cert``, ``key``, ``sa_key``, ``sa_pub`` (PEM). The CA's key is not kept.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    names = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local"]  # fmt: skip
    secret_folder.mkdir(parents=True, exist_ok=True)
    server_tls(folder / "ca.crt", folder / "apiserver.crt", secret_folder / "apiserver.key",
               ca_cn="vmmigration test CA (kube-apiserver)", dns=names, cn="kube-apiserver")
    sa_key = ec.generate_private_key(ec.SECP256R1())
    paths = {"ca": folder / "ca.crt", "cert": folder / "apiserver.crt", "key": secret_folder / "apiserver.key",
             "sa_key": secret_folder / "sa.key", "sa_pub": folder / "sa.pub"}  # fmt: skip
    paths["sa_key"].write_bytes(
        sa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    )
    paths["sa_key"].chmod(0o600)
    paths["sa_pub"].write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return paths


_prctl: Any = None
_LAUNCHER: list[concurrent.futures.ThreadPoolExecutor] = []


def _launcher() -> concurrent.futures.ThreadPoolExecutor:
    """One thread, kept for the life of the process, that starts server processes for other threads."""
    if not _LAUNCHER:
        _LAUNCHER.append(concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kube-launcher"))
    return _LAUNCHER[0]


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the thread that started it exits (a killed pytest leaves nothing)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _server_env(workdir: Path) -> dict[str, str]:
    """A small environment for the server processes: no proxies, nothing of the developer's Kubernetes/etcd setup."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ")}
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp)
    return env


@dataclass(frozen=True)
class Identity:
    """Who a token authenticates as."""

    name: str
    user: str
    groups: tuple[str, ...]
    token: str = field(repr=False)
    service_account: bool = False  # a TokenRequest token, not a line of the static token file


@dataclass
class _Process:
    """One server process with its command line and log; start/stop by process group."""

    name: str
    command: list[str]
    log_file: Path
    env: dict[str, str]
    detached: bool = False  # True: outlives the thread (and process) that started it
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        global _prctl
        if _prctl is None:
            try:
                _prctl = ctypes.CDLL(None, use_errno=True).prctl
            except (OSError, AttributeError):
                _prctl = False  # not Linux: the fixture's teardown still stops the process
        if self.detached or threading.current_thread() is threading.main_thread():
            self.process = self._popen()
        else:
            # PR_SET_PDEATHSIG fires when the starting *thread* ends: a restart asked for from a short-lived
            # thread (a test acting mid-run) is started from a thread that lives as long as the process
            self.process = _launcher().submit(self._popen).result()

    def _popen(self) -> subprocess.Popen[bytes]:
        with open(self.log_file, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} starting {self.name}\n".encode())
            log.flush()
            return subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=None if self.detached else _die_with_parent,
            )

    def exited(self) -> str | None:
        """None while running, else why not (with the log's tail)."""
        if self.process is None or self.process.poll() is None:
            return None
        code = self.process.returncode
        return f"{self.name} exited with code {code}; tail of {self.log_file}:\n{_tail(self.log_file)}"

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)  # its own process group (start_new_session=True)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float) -> float:
        """SIGTERM, then SIGKILL after ``timeout`` s; returns the seconds it took. Idempotent."""
        began = time.monotonic()
        if self.process is None:
            return 0.0
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._signal(signal.SIGKILL)  # anything left in its group
        return time.monotonic() - began


@dataclass
class KubeApiServer:
    """etcd + kube-apiserver on 127.0.0.1 with token auth and RBAC; see the module docstring."""

    workdir: Path
    apiserver_binary: Path
    etcd_binary: Path
    port: int
    etcd_port: int
    etcd_peer_port: int
    pki: dict[str, Path]
    detached: bool = False  # the servers outlive this process (see the module docstring)
    identities: dict[str, Identity] = field(default_factory=dict, repr=False)
    startup_seconds: float | None = None
    last_restart_seconds: float | None = None
    _etcd: _Process | None = field(default=None, repr=False)
    _apiserver: _Process | None = field(default=None, repr=False)
    _discovery: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- where things are ------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def ca_path(self) -> Path:
        return self.pki["ca"]

    @property
    def secrets_dir(self) -> Path:
        return self.workdir / "secrets"

    @property
    def token_file(self) -> Path:
        return self.secrets_dir / "tokens.csv"

    @property
    def apiserver_log(self) -> Path:
        return self.workdir / "kube-apiserver.log"

    @property
    def etcd_log(self) -> Path:
        return self.workdir / "etcd.log"

    @property
    def running(self) -> bool:
        return bool(self._apiserver and self._apiserver.running and self._etcd and self._etcd.running)

    @property
    def pids(self) -> dict[str, int]:
        """The process (and process group) id of each running server, by name (``etcd``, ``kube-apiserver``)."""
        return {proc.name: proc.process.pid for proc in (self._etcd, self._apiserver)
                if proc is not None and proc.process is not None and proc.running}

    # -- identities -------------------------------------------------------------------------------------------
    def token(self, identity: str = "admin") -> str:
        """The bearer token of ``identity`` (a name in ``identities``); KeyError naming the known ones if unknown."""
        try:
            return self.identities[identity].token
        except KeyError:
            raise KeyError(f"unknown identity {identity!r}; known: {sorted(self.identities)}") from None

    def _remember(self, identity: Identity) -> Identity:
        secrets_registry.register(identity.token, f"kube-apiserver test token ({identity.name})")
        self.identities[identity.name] = identity
        return identity

    def _write_token_file(self) -> None:
        lines = []
        for ident in self.identities.values():
            if ident.service_account:
                continue  # service-account tokens are JWTs the server checks with sa.pub
            row = [ident.token, ident.user, ident.user]
            if ident.groups:
                row.append('"' + ",".join(ident.groups) + '"')
            lines.append(",".join(row))
        self.token_file.write_text("\n".join(lines) + "\n")
        self.token_file.chmod(0o600)

    def add_user(self, name: str, user: str | None = None, groups: Iterable[str] = ()) -> Identity:
        """A static token for ``user`` (default: ``name``) in ``groups``, known as identity ``name``. The API server
        reads its token file only at start, so this restarts it (3-5 s here); prefer ``add_service_account``."""
        if name in self.identities:
            raise ValueError(f"identity {name!r} exists already")
        ident = self._remember(Identity(name, user or name, tuple(groups), secrets.token_urlsafe(32)))
        self._write_token_file()
        self.restart_apiserver()
        return ident

    def add_service_account(
        self, name: str, namespace: str = "default", *, identity: str | None = None, expiration_seconds: int = 86400
    ) -> Identity:
        """A ServiceAccount ``namespace/name`` (created if missing, as admin) and a token for it (TokenRequest),
        known as ``identity`` (default ``system:serviceaccount:<namespace>:<name>``, the user it authenticates as;
        groups ``system:serviceaccounts`` and ``system:serviceaccounts:<namespace>``). Takes effect at once."""
        from kubernetes import client as k8s
        from kubernetes.client.exceptions import ApiException

        user = f"system:serviceaccount:{namespace}:{name}"
        identity = identity or user
        if identity in self.identities:
            raise ValueError(f"identity {identity!r} exists already")
        with self.client() as api_client:
            core = k8s.CoreV1Api(api_client)
            try:
                core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
            except ApiException as exc:
                if exc.status != 409:
                    raise
            request = {"spec": {"audiences": [SA_ISSUER], "expirationSeconds": expiration_seconds}}
            answer = core.create_namespaced_service_account_token(name, namespace, request)
        groups = ("system:serviceaccounts", f"system:serviceaccounts:{namespace}")
        return self._remember(Identity(identity, user, groups, answer.status.token, service_account=True))

    # -- clients ------------------------------------------------------------------------------------------------
    def configuration(self, identity: str = "admin") -> Configuration:
        """A ``kubernetes.client.Configuration`` for ``identity``: our CA only, no proxy from the environment."""
        from kubernetes.client import Configuration

        config = Configuration(host=self.url)
        config.ssl_ca_cert = str(self.ca_path)
        config.verify_ssl = True
        config.api_key = {"BearerToken": self.token(identity)}
        config.api_key_prefix = {"BearerToken": "Bearer"}
        config.proxy = None  # Configuration() reads HTTPS_PROXY & co. from the environment
        config.no_proxy = None
        return config

    def client(self, identity: str = "admin") -> ApiClient:
        """A new ``kubernetes.client.ApiClient`` authenticated as ``identity``; close it (or use ``with``)."""
        from kubernetes.client import ApiClient

        return ApiClient(self.configuration(identity))

    def kubeconfig(self, identity: str = "admin", namespace: str = "default") -> Path:
        """A kubeconfig file (CA embedded, bearer token of ``identity``, default namespace ``namespace``) under
        ``secrets/``; rewritten on each call. Loadable with ``kubernetes.config.load_kube_config``."""
        cluster, context = "vmmigration-test", f"{identity}@vmmigration-test"
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": cluster,
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_path.read_bytes()).decode(),
                    },
                }
            ],
            "users": [{"name": identity, "user": {"token": self.token(identity)}}],
            "contexts": [{"name": context, "context": {"cluster": cluster, "user": identity, "namespace": namespace}}],
            "current-context": context,
        }
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in identity)
        path = self.secrets_dir / f"kubeconfig-{safe}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        path.chmod(0o600)
        return path

    def request(
        self,
        method: str,
        path: str,
        *,
        identity: str = "admin",
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        query: Iterable[tuple[str, str]] = (),
    ) -> tuple[int, Any]:
        """A raw API call (``path`` such as ``/apis/infra.virtrigaud.io/v1beta1/namespaces/ns/vmmigrations``)
        with the kubernetes client; returns (status, decoded JSON body). Non-2xx answers raise ApiException."""
        with self.client(identity) as api_client:
            data, status, _ = api_client.call_api(
                path,
                method,
                query_params=list(query),
                header_params={"Accept": "application/json", **(headers or {})},
                body=body,
                response_types_map={200: "object", 201: "object"},
                auth_settings=["BearerToken"],
                _return_http_data_only=False,
            )
        return status, data

    # -- objects ---------------------------------------------------------------------------------------------------
    def _resource_for(self, api_version: str, kind: str, identity: str) -> dict[str, Any]:
        """The discovery entry (``name``, ``namespaced``) of ``kind`` in ``api_version``; a group version that is
        not served yet (a CRD just made) is retried for up to 10 s."""
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        deadline = time.monotonic() + 10.0
        while True:
            listing = self._discovery.get(api_version)
            if listing is None:
                from kubernetes.client.exceptions import ApiException

                try:
                    _, listing = self.request("GET", base, identity=identity)
                except ApiException as exc:
                    if exc.status != 404 or time.monotonic() > deadline:
                        raise
                    listing = None
            for resource in (listing or {}).get("resources", []):
                if resource.get("kind") == kind and "/" not in resource["name"]:
                    self._discovery[api_version] = listing
                    return {"path": base, **resource}
            self._discovery.pop(api_version, None)
            if time.monotonic() > deadline:
                raise LookupError(f"{kind} is not served in {api_version} by {self.url}")
            time.sleep(0.2)

    def apply_object(
        self,
        obj: Mapping[str, Any],
        identity: str = "admin",
        *,
        namespace: str | None = None,
        field_manager: str = FIELD_MANAGER,
    ) -> dict[str, Any]:
        """Server-side apply of one object (``force=true``) as ``identity``; returns the object as stored. A
        namespaced object without ``metadata.namespace`` goes to ``namespace`` (default ``default``). Status of a
        resource with a ``/status`` subresource is ignored here (write it with a status patch)."""
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        name = (obj.get("metadata") or {}).get("name")
        if not (api_version and kind and name):
            raise ValueError(f"an object needs apiVersion, kind and metadata.name: {dict(obj)!r:.200}")
        resource = self._resource_for(api_version, kind, identity)
        path = resource["path"]
        if resource.get("namespaced"):
            ns = (obj.get("metadata") or {}).get("namespace") or namespace or "default"
            path += f"/namespaces/{ns}"
        path += f"/{resource['name']}/{name}"
        _, stored = self.request(
            "PATCH",
            path,
            identity=identity,
            body=dict(obj),
            headers={"Content-Type": "application/apply-patch+yaml"},
            query=[("fieldManager", field_manager), ("force", "true")],
        )
        return stored

    def apply_yaml(
        self,
        source: str | Path | Mapping[str, Any] | Iterable[Mapping[str, Any]],
        identity: str = "admin",
        *,
        namespace: str | None = None,
    ) -> list[dict[str, Any]]:
        """Apply (server-side, in order) every object in ``source``: a YAML file's path, YAML text (several
        documents and ``kind: List`` allowed), an object or a list of objects; as ``identity``. Returns the stored
        objects. Failures raise ``kubernetes.client.exceptions.ApiException`` (403, 422, ...)."""
        if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and Path(source).is_file()):
            documents = list(yaml.safe_load_all(Path(source).read_text()))
        elif isinstance(source, str):
            documents = list(yaml.safe_load_all(source))
        elif isinstance(source, Mapping):
            documents = [source]
        else:
            documents = list(source)
        objects: list[Mapping[str, Any]] = []
        for doc in documents:
            if not doc:
                continue
            if doc.get("kind", "").endswith("List") and "items" in doc:
                objects.extend(doc["items"])
            else:
                objects.append(doc)
        return [self.apply_object(obj, identity, namespace=namespace) for obj in objects]

    def wait_established(self, crd_names: Iterable[str], timeout: float = CRD_TIMEOUT) -> None:
        """Wait until every CRD named is Established (and its names accepted); TimeoutError naming the others."""
        from kubernetes import client as k8s

        pending = set(crd_names)
        deadline = time.monotonic() + timeout
        conditions: dict[str, Any] = {}
        with self.client() as api_client:
            api = k8s.ApiextensionsV1Api(api_client)
            while pending:
                for name in sorted(pending):
                    crd = api.read_custom_resource_definition(name)
                    conditions[name] = {c.type: c.status for c in (crd.status.conditions or [])}
                    if conditions[name].get("Established") == "True":
                        pending.discard(name)
                if pending and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"CRDs not Established after {timeout:.0f} s: "
                        f"{ {n: conditions.get(n) for n in sorted(pending)} }"
                    )
                if pending:
                    time.sleep(0.1)

    def apply_crds(self, folder: Path = CRD_DIR) -> list[str]:
        """Apply every ``*.yaml`` CRD in ``folder`` and wait until each is Established; returns their names."""
        names = []
        for path in sorted(folder.glob("*.yaml")):
            names += [obj["metadata"]["name"] for obj in self.apply_yaml(path)]
        self.wait_established(names)
        return names

    # -- process control ----------------------------------------------------------------------------------------
    def _opener(self, https: bool) -> urllib.request.OpenerDirector:
        handlers: list[Any] = [urllib.request.ProxyHandler({})]  # never a proxy from the environment
        if https:
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(self.ca_path))))
        return urllib.request.build_opener(*handlers)

    def _wait(self, proc: _Process, url: str, expect: str, timeout: float, headers: Mapping[str, str]) -> None:
        opener = self._opener(url.startswith("https:"))
        began, last_error = time.monotonic(), "no answer yet"
        while time.monotonic() - began < timeout:
            reason = proc.exited()
            if reason:
                raise ServerStartError(reason)
            try:
                with opener.open(urllib.request.Request(url, headers=dict(headers)), timeout=2) as answer:
                    text = answer.read().decode(errors="replace")
                if expect in text:
                    return
                last_error = f"answer {text[:200]!r}"
            except (OSError, urllib.error.URLError) as exc:  # refused, 500 while post-start hooks run, TLS ...
                last_error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, urllib.error.HTTPError):
                    last_error += " " + exc.read().decode(errors="replace")[-500:]
            time.sleep(0.1)
        raise ServerStartError(
            f"{proc.name} did not answer {url} within {timeout:.0f} s ({last_error}); "
            f"tail of {proc.log_file}:\n{_tail(proc.log_file)}"
        )

    def _etcd_process(self) -> _Process:
        data = self.workdir / "etcd-data"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        command = [
            str(self.etcd_binary),
            "--name", "vmmigration-test",
            "--data-dir", str(data),
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"vmmigration-test={peer}",
            "--unsafe-no-fsync",  # a test server: speed over durability across power loss
            "--log-level", "warn",
        ]  # fmt: skip
        return _Process("etcd", command, self.etcd_log, _server_env(self.workdir), self.detached)

    def _apiserver_process(self) -> _Process:
        command = [
            str(self.apiserver_binary),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--tls-cert-file={self.pki['cert']}", f"--tls-private-key-file={self.pki['key']}",
            f"--cert-dir={self.workdir / 'certs'}",
            f"--token-auth-file={self.token_file}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={self.pki['sa_pub']}",
            f"--service-account-signing-key-file={self.pki['sa_key']}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=none",  # 127.0.0.1 is no valid Endpoints address; nothing needs it
            "--profiling=false",
        ]  # fmt: skip
        return _Process("kube-apiserver", command, self.apiserver_log, _server_env(self.workdir), self.detached)

    def _start_apiserver(self) -> None:
        self._apiserver = self._apiserver_process()
        self._apiserver.start()
        self._wait(
            self._apiserver,
            f"{self.url}/readyz",
            "ok",
            APISERVER_START_TIMEOUT,
            {"Authorization": f"Bearer {self.token('admin')}"},
        )

    def start(self) -> KubeApiServer:
        """Start etcd, then kube-apiserver (wait for /readyz), then apply the CRDs. ServerStartError (with the log
        tail) if a process does not come up; whatever was started is stopped again then."""
        if self.running:
            return self
        began = time.monotonic()
        for folder in (self.workdir / "certs", self.secrets_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._write_token_file()
        try:
            self._etcd = self._etcd_process()
            self._etcd.start()
            self._wait(self._etcd, f"{self.etcd_url}/health", '"health":"true"', ETCD_START_TIMEOUT, {})
            self._start_apiserver()
            self.apply_crds()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop_apiserver(self) -> float:
        """SIGTERM to kube-apiserver, SIGKILL after 15 s; returns the seconds it took."""
        return self._apiserver.stop(APISERVER_STOP_TIMEOUT) if self._apiserver else 0.0

    def restart_apiserver(self) -> float:
        """Stop kube-apiserver and start it again on the same port, waiting for /readyz; etcd (all objects) stays.
        Returns the seconds the whole restart took (also in ``last_restart_seconds``)."""
        with self._lock:
            began = time.monotonic()
            self.stop_apiserver()
            self._discovery.clear()
            try:
                self._start_apiserver()
            except BaseException:
                self.stop()
                raise
            self.last_restart_seconds = time.monotonic() - began
            return self.last_restart_seconds

    def stop(self) -> None:
        """kube-apiserver, then etcd: each SIGTERM, then SIGKILL. Idempotent. The data folder is left in place."""
        if self._apiserver:
            self._apiserver.stop(APISERVER_STOP_TIMEOUT)
        if self._etcd:
            self._etcd.stop(ETCD_STOP_TIMEOUT)

    def __enter__(self) -> KubeApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_kube_api(workdir: Path, *, port: int | None = None, detached: bool = False) -> KubeApiServer:
    """Start etcd and kube-apiserver on free 127.0.0.1 ports (the API server on ``port`` if given) with a CA made
    for them, the static identities ``admin``/``engine``/``viewer`` and the CRDs of deploy/crds applied; everything
    under ``workdir``. Call ``.stop()``. ServerStartError (with the log's tail) if it does not come up.
    ``detached``: the servers keep running after this process exits (stop them by ``pids``)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    apiserver, etcd = find_binaries()
    secret_dir = workdir / "secrets"
    secret_dir.mkdir(exist_ok=True)
    secret_dir.chmod(0o700)
    secrets_registry.register_input(secret_dir)
    free_port, etcd_port, etcd_peer_port = _free_ports(3)
    server = KubeApiServer(
        workdir=workdir,
        apiserver_binary=apiserver,
        etcd_binary=etcd,
        port=port or free_port,
        etcd_port=etcd_port,
        etcd_peer_port=etcd_peer_port,
        pki=make_pki(workdir / "pki", secret_dir),
        detached=detached,
    )
    for name, (user, groups) in STATIC_IDENTITIES.items():
        server._remember(Identity(name, user, groups, secrets.token_urlsafe(32)))
    return server.start()


@pytest.fixture(scope="session")
def kube_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeApiServer]:
    """A Kubernetes API server (kube-apiserver 1.36 on etcd, RBAC, the project's CRDs) on loopback over TLS,
    shared by the session; see tests/servers/kube_api.py."""
    server = start_kube_api(tmp_path_factory.mktemp("kube"))
    try:
        yield server
    finally:
        server.stop()
