"""A vCenter (or ESXi) session on pyvmomi: login, re-login, inventory lookups, tasks waited on with a
timeout, NFC leases and datastore file transfers.

Everything the vSphere driver does goes through :class:`VSphere`, which keeps one SOAP session for the
task that opened it: a call that meets ``NotAuthenticated`` (the session expired or was ended by an
administrator) logs in again once and is retried; wrong credentials fail at once (permanent: a retry
would only be refused again). ``pyVmomi`` is imported lazily: this module is read at DAG parse time.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from include.diskio import CHUNK, Segment
from include.errors import HypervisorAuthError, HypervisorError, InvalidMigration, NotFound

log = logging.getLogger(__name__)

T = TypeVar("T")

#: how long a vCenter task (snapshot, copy, create, destroy) may take before the phase fails on it
TASK_TIMEOUT = 1800.0
#: how long an NFC lease may take to become ready
LEASE_TIMEOUT = 300.0
#: how often a held NFC lease is told it is still in use (vCenter drops an idle lease after 5 minutes)
LEASE_KEEPALIVE = 30.0


def _vim() -> Any:
    from pyVmomi import vim

    return vim


def fault_message(err: BaseException) -> str:
    """A vSphere fault as one line: its class and message (``msg``), never a traceback."""
    if isinstance(err, str):
        return err
    msg = getattr(err, "msg", None) or str(err)
    name = type(err).__name__.rsplit(".", 1)[-1]
    return f"{name}: {msg}" if msg and name not in msg else (msg or name)


def insecure(credentials: Mapping[str, str] | None) -> bool:
    return str((credentials or {}).get("insecureSkipVerify") or "").lower() in ("true", "1", "yes")


def ssl_context(credentials: Mapping[str, str] | None, endpoint: str, *, skip_verify: bool = False) -> ssl.SSLContext:
    """Certificate verification by default (system CAs, or ``caBundle``/``ca.crt`` from the Secret);
    ``insecureSkipVerify`` (the Provider's, or ``"true"`` in its Secret) turns it off, with a warning."""
    from include.storage.tls import ca_bundle_file

    creds = credentials or {}
    if skip_verify or insecure(creds):
        log.warning("TLS verification is DISABLED for vSphere %s (its Secret sets insecureSkipVerify)", endpoint)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    bundle = creds.get("caBundle") or creds.get("ca.crt")
    return ssl.create_default_context(cafile=ca_bundle_file(bundle) if bundle else None)


def credentials_of(credentials: Mapping[str, str] | None, endpoint: str) -> tuple[str, str]:
    creds = credentials or {}
    user = creds.get("username") or creds.get("user")
    password = creds.get("password")
    if not user or not password:
        raise InvalidMigration(f"vSphere {endpoint}: the Provider's Secret needs username and password",
                               field="spec.credentialSecretRef")
    return user, password


class VSphere:
    """One session on a vCenter, opened on first use."""

    def __init__(self, endpoint: str, credentials: Mapping[str, str] | None, *,
                 connect: Callable[[], Any] | None = None) -> None:
        self.endpoint = endpoint
        parts = urlsplit(endpoint)
        self.host = parts.hostname or ""
        self.port = parts.port or 443
        self._credentials = credentials
        self._connect = connect
        self._si: Any = None
        self.skip_verify = insecure(credentials)
        self.ssl = ssl_context(credentials, endpoint)

    def insecure(self) -> None:
        """The Provider's ``spec.insecureSkipVerify``: no certificate verification (said in a warning)."""
        if not self.skip_verify:
            self.skip_verify = True
            self.ssl = ssl_context(self._credentials, self.endpoint, skip_verify=True)

    # -- the session ------------------------------------------------------------------------------------
    def _login(self) -> Any:
        if self._connect is not None:
            return self._connect()
        from pyVim.connect import SmartConnect

        from include.endpoints import ensure_provider_endpoint

        vim = _vim()
        ensure_provider_endpoint("vsphere", self.endpoint, "vSphere")
        user, password = credentials_of(self._credentials, self.endpoint)
        try:
            return SmartConnect(host=self.host, port=self.port, user=user, pwd=password, sslContext=self.ssl,
                                connectionPoolTimeout=60)
        except vim.fault.InvalidLogin as err:
            raise HypervisorAuthError(f"vSphere {self.endpoint} refused the login of {user!r} from the Provider's "
                                      f"Secret: {fault_message(err)}") from None
        except ssl.SSLError as err:
            raise HypervisorError(f"vSphere {self.endpoint}: TLS failed ({err.reason or err}); give the vCenter's "
                                  f"CA in the Secret's caBundle") from None
        except OSError as err:
            raise HypervisorError(f"cannot connect to vSphere at {self.endpoint}: {err}") from None

    @property
    def si(self) -> Any:
        if self._si is None:
            self._si = self._login()
        return self._si

    @property
    def content(self) -> Any:
        return self.call(lambda: self.si.RetrieveContent())

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` against the session (the driver's calls handle an expired session: they log in again
        and look everything up anew, as objects bound to the old session would fail again)."""
        return fn()

    def reset(self) -> None:
        """Forget the session (it expired): the next call logs in again."""
        self._si = None

    def logout(self) -> None:
        if self._si is None or self._connect is not None:
            return
        try:
            self._si.content.sessionManager.Logout()
        except Exception:  # noqa: BLE001 - an expired session needs no logout
            log.debug("vSphere logout failed", exc_info=True)
        self._si = None

    @property
    def cookie(self) -> str:
        """The session cookie, for the datastore and NFC HTTP transfers (never logged)."""
        raw = self.si._stub.cookie  # noqa: SLF001 - pyvmomi keeps it there
        return raw.split(";", 1)[0].strip()

    # -- inventory --------------------------------------------------------------------------------------
    def objects(self, kind: Any) -> list[Any]:
        def listing() -> list[Any]:
            content = self.si.RetrieveContent()
            view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
            try:
                return list(view.view)
            finally:
                view.Destroy()

        return self.call(listing)

    def named(self, kind: Any, name: str, what: str, *, field: str | None = None) -> Any:
        found = self.find_named(kind, name)
        if not found:
            raise NotFound(f"{what} {name!r} not found on vSphere {self.endpoint}", field=field)
        if len(found) > 1:
            raise InvalidMigration(f"{len(found)} {what}s are named {name!r} on vSphere {self.endpoint}; name one "
                                   f"that is unique", field=field)
        return found[0]

    def find_named(self, kind: Any, name: str) -> list[Any]:
        """The objects of ``kind`` named ``name``: every name read in one PropertyCollector call, not one round
        trip per object."""
        from pyVmomi import vmodl

        def lookup() -> list[Any]:
            content = self.si.RetrieveContent()
            view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
            try:
                pc = vmodl.query.PropertyCollector
                spec = pc.FilterSpec(
                    objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[
                        pc.TraversalSpec(name="view", path="view", skip=False, type=type(view))])],
                    propSet=[pc.PropertySpec(type=kind, all=False, pathSet=["name"])])
                found = content.propertyCollector.RetrieveContents([spec]) or []
                return [o.obj for o in found if any(p.name == "name" and p.val == name for p in (o.propSet or []))]
            finally:
                view.Destroy()

        return self.call(lookup)

    def vm_by_uuid(self, uuid: str) -> Any | None:
        return self.call(lambda: self.si.RetrieveContent().searchIndex.FindByUuid(
            None, uuid, vmSearch=True, instanceUuid=True))

    @staticmethod
    def datacenter_of(obj: Any) -> Any:
        vim = _vim()
        node = obj
        while node is not None and not isinstance(node, vim.Datacenter):
            node = getattr(node, "parent", None)
        if node is None:
            raise HypervisorError(f"{obj} is not in a datacenter")
        return node

    # -- tasks ------------------------------------------------------------------------------------------
    def wait(self, task: Any, what: str, *, timeout: float = TASK_TIMEOUT) -> Any:
        """Wait for a vCenter task; its fault, if it fails, becomes the error's message."""
        vim = _vim()
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            info = self._task_state(task)
            if info.get("info.state") == vim.TaskInfo.State.success:
                return info.get("info.result")
            if info.get("info.state") == vim.TaskInfo.State.error:
                err = info.get("info.error")
                raise TaskFault(f"{what} failed: {fault_message(err)}", fault=err)
            if time.monotonic() > deadline:
                with contextlib.suppress(Exception):
                    task.CancelTask()
                raise HypervisorError(f"{what}: the vCenter task did not finish within {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _task_state(self, task: Any) -> dict[str, Any]:
        """A task's state, error and result only (the whole ``info`` names an entity that not every server
        types as pyvmomi expects: the simulator's disk manager tasks)."""
        from pyVmomi import vmodl

        vim = _vim()
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=task, skip=False)],
                             propSet=[pc.PropertySpec(type=vim.Task, all=False,
                                                      pathSet=["info.state", "info.error", "info.result"])])
        found = self.call(lambda: self.si.RetrieveContent().propertyCollector.RetrieveContents([spec]))
        return {p.name: p.val for obj in (found or []) for p in (obj.propSet or [])}

    # -- HTTP: datastore files and NFC --------------------------------------------------------------------
    def _http(self) -> Any:
        import requests

        session = requests.Session()
        session.headers["Cookie"] = self.cookie
        session.trust_env = False  # no proxy or CA bundle from the environment: the endpoint's own CA, directly
        return session

    @property
    def _verify(self) -> bool | str:
        from include.storage.tls import ca_bundle_file

        creds = self._credentials or {}
        if self.skip_verify:
            return False
        bundle = creds.get("caBundle") or creds.get("ca.crt")
        return ca_bundle_file(bundle) if bundle else True

    def datastore_url(self, datacenter: str, datastore: str, path: str) -> str:
        return (f"https://{self._netloc}/folder/{quote(path)}?dcPath={quote(datacenter, safe='')}"
                f"&dsName={quote(datastore, safe='')}")

    @property
    def _netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def nfc_url(self, url: str) -> str:
        """A lease's device URL, with the ``*`` vCenter puts for "this host" replaced by the endpoint's host;
        a URL to any other host than the endpoint's is refused (it would leave the address policy)."""
        parts = urlsplit(url)
        if parts.hostname in (None, "*"):
            return parts._replace(netloc=self._netloc).geturl()
        if parts.hostname != self.host:
            from include.endpoints import check_provider_address

            check_provider_address(f"https://{parts.netloc}/sdk")
        return url

    def get_stream(self, url: str, what: str, *, tick: Callable[[int], None] | None = None) -> Iterator[Segment]:
        """GET ``url`` and yield its body in chunks (``tick(bytes so far)`` after each)."""
        with self._http() as http:
            try:
                resp = http.get(url, stream=True, timeout=(30, 300), verify=self._verify)
            except OSError as err:
                raise HypervisorError(f"{what}: {type(err).__name__}: {_redacted(err)}") from None
            with resp:
                if resp.status_code == 404:
                    raise NotFound(f"{what}: not found ({resp.status_code})")
                if resp.status_code >= 400:
                    raise HypervisorError(f"{what}: HTTP {resp.status_code} {resp.reason}")
                done = 0
                try:
                    for chunk in resp.iter_content(CHUNK):
                        if chunk:
                            done += len(chunk)
                            yield Segment(length=len(chunk), data=chunk)
                            if tick is not None:
                                tick(done)
                except OSError as err:
                    raise HypervisorError(f"{what}: the download broke off after {done} bytes: "
                                          f"{type(err).__name__}: {_redacted(err)}") from None

    def put_stream(self, url: str, segments: Iterator[Segment], length: int, what: str, *, method: str = "PUT",
                   content_type: str = "application/octet-stream", tick: Callable[[int], None] | None = None) -> None:
        """Send ``length`` bytes (holes as zeros: HTTP has no holes) to ``url`` with a Content-Length (vSphere's
        file access refuses chunked uploads); ``tick(bytes so far)`` as they go (an NFC lease's keep-alive)."""
        body = _SegmentReader(segments, length, what, tick)
        with self._http() as http:
            try:
                resp = http.request(method, url, data=body, headers={"Content-Type": content_type},
                                    timeout=(30, 600), verify=self._verify)
            except OSError as err:
                raise HypervisorError(f"{what}: {type(err).__name__}: {_redacted(err)}") from None
            if resp.status_code >= 400:
                raise HypervisorError(f"{what}: HTTP {resp.status_code} {resp.reason}")
            if body.sent != length:
                raise HypervisorError(f"{what}: {body.sent} bytes sent, {length} announced")


class _SegmentReader:
    """Segments as a file-like body of known length (requests sends it with a Content-Length)."""

    def __init__(self, segments: Iterator[Segment], length: int, what: str,
                 tick: Callable[[int], None] | None = None) -> None:
        self._tick = tick
        self._segments = iter(segments)
        self._length = length
        self._buf = memoryview(b"")
        self._hole = 0
        self.sent = 0
        self.what = what

    def __len__(self) -> int:
        return self._length - self.sent

    def read(self, size: int = -1) -> bytes:
        size = CHUNK if size is None or size < 0 else max(size, 1)
        while not self._buf and not self._hole:
            seg = next(self._segments, None)
            if seg is None:
                if self.sent < self._length:  # the server would wait for the rest until it times out
                    raise HypervisorError(f"{self.what}: the stream ended after {self.sent} of the {self._length} "
                                          f"bytes announced")
                return b""
            if seg.data is None:
                self._hole = seg.length
            else:
                self._buf = memoryview(seg.data)
        if self._hole:
            n = min(self._hole, size)
            self._hole -= n
            out = bytes(n)
        else:
            out = bytes(self._buf[:size])
            self._buf = self._buf[len(out):]
        self.sent += len(out)
        if self._tick is not None:
            self._tick(self.sent)
        if self.sent > self._length:
            raise HypervisorError(f"{self.what}: more than the {self._length} bytes announced")
        return out


def redact_urls(text: str) -> str:
    """``text`` without the paths of the URLs in it (an NFC URL's path is its lease's ticket)."""
    import re

    return re.sub(r"(https?://[^/\s'\"]+)/[^\s'\")]*", r"\1/...", re.sub(r"url: /\S+", "url: /...", text))


def _redacted(err: BaseException) -> str:
    return redact_urls(str(err))


class TaskFault(HypervisorError):
    """A vCenter task ended in error; ``fault`` is the vSphere fault object."""

    def __init__(self, message: str, *, fault: Any = None) -> None:
        super().__init__(message)
        self.fault = fault

    def __reduce__(self):  # the fault object does not travel between processes
        return (TaskFault, (str(self),))


class Lease:
    """An NFC lease (``ExportSnapshot``/``ImportVApp``) held for one task: waited ready, kept alive with
    progress calls while bytes move, completed on success and aborted otherwise."""

    def __init__(self, api: VSphere, lease: Any, what: str) -> None:
        self.api, self.lease, self.what = api, lease, what
        self._last = 0.0
        self.done = False
        self.calls = 0  # progress calls made

    def ready(self, timeout: float = LEASE_TIMEOUT) -> Any:
        vim = _vim()
        deadline = time.monotonic() + timeout
        while True:
            state = self.lease.state
            if state == vim.HttpNfcLease.State.ready:
                self._last = time.monotonic()
                return self.lease.info
            if state == vim.HttpNfcLease.State.error:
                raise HypervisorError(f"{self.what}: the NFC lease failed: "
                                      f"{fault_message(getattr(self.lease, 'error', None) or 'no reason given')}")
            if state == vim.HttpNfcLease.State.done:
                raise HypervisorError(f"{self.what}: the NFC lease ended before it was used")
            if time.monotonic() > deadline:
                self.abort()
                raise HypervisorError(f"{self.what}: the NFC lease was not ready within {timeout:g} s")
            time.sleep(0.2)

    def progress(self, percent: float) -> None:
        """Keep the lease alive (at most every :data:`LEASE_KEEPALIVE` seconds)."""
        now = time.monotonic()
        if now - self._last < LEASE_KEEPALIVE:
            return
        self._last = now
        try:
            self.lease.HttpNfcLeaseProgress(int(max(0, min(99, percent))))
            self.calls += 1
            log.info("%s: NFC lease told %d%% done", self.what, int(percent))
        except Exception as err:  # noqa: BLE001 - a lease that went away fails the transfer next
            log.warning("%s: NFC lease progress call failed: %s", self.what, fault_message(err))

    def complete(self) -> None:
        self.lease.HttpNfcLeaseComplete()
        self.done = True

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.lease.HttpNfcLeaseAbort()
        except Exception as err:  # noqa: BLE001 - already ended
            log.debug("%s: aborting the NFC lease: %s", self.what, fault_message(err))
