"""HTTP storage: PUT and GET under the endpoint URL with ``Authorization: Bearer <token>`` (WebDAV
servers such as nginx's dav module).

An object is PUT under a temporary name and MOVEd to its final name when complete, so a reader never
sees half a disk. Downloads resume with ``Range`` after a broken connection. TLS is verified by
default (an optional CA bundle from the Secret); turning verification off logs a warning each time.

Proxies: the environment's ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``.netrc`` are ignored (the address
policy checks what a socket connects to, and through a proxy that is only the proxy). A proxy is used
only when the Secret names one (key ``proxy``, e.g. ``http://proxy.example:3128``); then the real
target of every request (redirects included) is checked against the address policy before it is
sent, and the connection to the proxy is checked on connect as usual.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from include.diskio import CHUNK, Segment
from include.errors import InvalidMigration, StorageAuthError, StorageError
from include.inventory import Credentials
from include.spec import StorageSpec
from include.storage.base import MANIFEST_SUFFIX, ObjectWriter, StorageBackend
from include.storage.tls import tls_verify

log = logging.getLogger(__name__)


def bearer_token(credentials: Credentials | None) -> str | None:
    """The Secret's ``token``; the guide's example stores it as ``Bearer_<token>``: both forms work."""
    if credentials is None:
        return None
    token = credentials.first("token")
    if not token:
        raise InvalidMigration(f"Secret {credentials.source} has no key 'token'",
                               field="spec.storage.credentialsSecretRef")
    for prefix in ("Bearer_", "Bearer ", "bearer_", "bearer "):
        if token.startswith(prefix):
            return token[len(prefix):]
    return token


class _HttpWriter(ObjectWriter):
    """Streams one PUT from a producer thread; ``commit`` finishes it and MOVEs it into place."""

    def __init__(self, storage: HttpStorage, key: str) -> None:
        import queue
        import threading

        self.s = storage
        self.key = key
        self.tmp_key = f"{key}.part"
        self.q: queue.Queue[bytes | None] = queue.Queue(maxsize=8)  # bounded memory: 8 chunks in flight
        self.error: BaseException | None = None
        self.response: Any = None
        self.length = 0
        self.thread = threading.Thread(target=self._put, name=f"http-put-{key}", daemon=True)
        self.thread.start()

    def _chunks(self) -> Iterator[bytes]:
        while True:
            item = self.q.get()
            if item is None:
                return
            yield item

    def _put(self) -> None:
        try:
            self.response = self.s.guarded(lambda: self.s.session.put(
                self.s.url(self.tmp_key), data=self._chunks(), headers={"Content-Type": "application/octet-stream"},
                timeout=(10, 300), verify=self.s.verify))
        except BaseException as err:  # noqa: BLE001 - handed to the writer's caller
            self.error = err
            # unblock a producer waiting on a full queue
            while not self.q.empty():
                self.q.get_nowait()

    def _put_item(self, item: bytes | None) -> None:
        import queue

        while True:
            if self.error is not None:
                raise self.s.translate(self.error, f"uploading {self.s.url(self.key)}") from self.error
            try:
                self.q.put(item, timeout=1)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise StorageError(f"upload of {self.s.url(self.key)} stopped") from self.error

    def write(self, segment: Segment) -> None:
        if segment.data is not None:
            self._put_item(bytes(segment.data))
        else:
            left = segment.length
            while left:
                n = min(left, CHUNK)
                self._put_item(bytes(n))
                left -= n
        self.length += segment.length

    def commit(self) -> None:
        self._put_item(None)
        self.thread.join()
        if self.error is not None:
            raise self.s.translate(self.error, f"uploading {self.s.url(self.key)}") from self.error
        self.s.check_response(self.response, f"uploading {self.s.url(self.key)}")
        self.s.move(self.tmp_key, self.key)

    def abort(self) -> None:
        try:
            self.q.put_nowait(None)
        except Exception:  # noqa: BLE001 - the queue may be full of a dead upload
            pass
        self.thread.join(timeout=5)
        try:
            self.s._call("DELETE", self.tmp_key, f"removing {self.s.url(self.tmp_key)}")
        except Exception:  # noqa: BLE001 - best effort: the server may be the reason we abort
            log.debug("could not delete %s", self.tmp_key, exc_info=True)


class HttpStorage(StorageBackend):
    type = "http"

    def __init__(self, endpoint: str, token: str | None, *, verify: bool | str = True, guard=None,
                 retries: int = 5, proxy: str | None = None, policy: Any = None) -> None:
        import requests

        refuse_userinfo(endpoint)
        self.endpoint = endpoint.rstrip("/") + "/"
        self.session = requests.Session()
        self.session.trust_env = False  # no HTTP(S)_PROXY, .netrc or REQUESTS_CA_BUNDLE from the environment
        self.proxy = proxy
        if proxy:
            from include.netpolicy import AddressPolicy

            adapter = _target_checking_adapter(policy or AddressPolicy.from_env())
            self.session.mount("http://", adapter)
            self.session.mount("https://", adapter)
            self.session.proxies = {"http": proxy, "https": proxy}
        # passed on every request: a session-level verify loses to REQUESTS_CA_BUNDLE from the environment
        self.verify = verify
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self._guard = guard
        self.retries = retries

    def guarded(self, fn):
        return self._guard(fn) if self._guard is not None else fn()

    def url(self, key: str) -> str:
        return self.endpoint + quote(key)

    def translate(self, err: BaseException, what: str) -> Exception:
        import requests

        from include.endpoints import redact_text
        from include.netpolicy import refusal_in

        if isinstance(err, (StorageError, InvalidMigration)):
            return err
        refused = refusal_in(err)
        if refused is not None:
            return refused
        if isinstance(err, requests.exceptions.SSLError):
            return StorageError(redact_text(f"{what}: TLS verification failed: {err}"))
        return StorageError(redact_text(f"{what}: {type(err).__name__}: {err}"))

    def check_response(self, resp: Any, what: str) -> None:
        if resp.status_code in (401, 403):
            raise StorageAuthError(f"Storage authentication failed: {what}: HTTP {resp.status_code}",
                                   field="spec.storage.credentialsSecretRef")
        if resp.status_code >= 400:
            raise StorageError(f"{what}: HTTP {resp.status_code} {resp.reason}")

    def _call(self, method: str, key: str, what: str, **kwargs: Any) -> Any:
        try:
            resp = self.guarded(lambda: self.session.request(method, self.url(key), timeout=(10, 120),
                                                             verify=self.verify, **kwargs))
        except Exception as err:
            raise self.translate(err, what) from err
        return resp

    def check(self) -> str:
        from include.netpolicy import AddressPolicy

        policy = AddressPolicy.from_env()
        policy.check_endpoint(self.endpoint, field="spec.storage.endpoint")
        if self.proxy:
            policy.check_endpoint(self.proxy, field="spec.storage.credentialsSecretRef", what="storage proxy")
        resp = self._call("OPTIONS", "", f"reaching {self.endpoint}")
        if resp.status_code in (401, 403):
            self.check_response(resp, f"reaching {self.endpoint}")
        probe = f".vmmigration-probe-{os.getpid()}"
        put = self._call("PUT", probe, f"writing to {self.endpoint}", data=b"ok")
        self.check_response(put, f"writing to {self.endpoint}")
        self._call("DELETE", probe, f"cleaning {self.endpoint}")
        return f"HTTP storage {self.endpoint}"

    def location(self, key: str) -> str:
        return self.url(key)

    def open_writer(self, key: str, size_hint: int) -> ObjectWriter:
        return _HttpWriter(self, key)

    def move(self, src: str, dst: str) -> None:
        resp = self._call("MOVE", src, f"publishing {self.url(dst)}",
                          headers={"Destination": self.url(dst), "Overwrite": "T"})
        self.check_response(resp, f"publishing {self.url(dst)}")

    def size(self, key: str) -> int:
        resp = self._call("HEAD", key, f"reading the size of {self.url(key)}")
        if resp.status_code == 404:
            raise StorageError(f"{self.url(key)} is missing")
        self.check_response(resp, f"reading the size of {self.url(key)}")
        return int(resp.headers["Content-Length"])

    def exists(self, key: str) -> bool:
        resp = self._call("HEAD", key, f"checking {self.url(key)}")
        if resp.status_code == 404:
            return False
        self.check_response(resp, f"checking {self.url(key)}")
        return True

    def read(self, key: str) -> Iterator[Segment]:
        """GET the object, resuming with ``Range`` where a connection breaks (up to ``retries`` times)."""
        total = self.size(key)
        done = 0
        failures = 0
        while done < total:
            headers = {"Range": f"bytes={done}-"} if done else {}
            try:
                resp = self.guarded(lambda h=headers: self.session.get(self.url(key), headers=h, stream=True,
                                                                       timeout=(10, 120), verify=self.verify))
                self.check_response(resp, f"reading {self.url(key)}")
                if done and resp.status_code != 206:
                    raise StorageError(f"{self.url(key)}: the server ignored Range (HTTP {resp.status_code})")
                for chunk in resp.iter_content(CHUNK):
                    done += len(chunk)
                    yield Segment(length=len(chunk), data=chunk)
                if done < total:
                    raise StorageError(f"{self.url(key)} ended at {done} of {total} bytes")
            except (StorageAuthError, InvalidMigration):
                raise
            except Exception as err:
                failures += 1
                if failures > self.retries:
                    raise self.translate(err, f"reading {self.url(key)}") from err
                log.warning("reading %s broke at byte %d (%s); resuming with Range", self.url(key), done, err)
                time.sleep(min(2 ** failures, 30))

    def delete(self, key: str) -> bool:
        """The object, its manifest and a partial upload of it (``<key>.part``)."""
        existed = False
        for k in (key, key + MANIFEST_SUFFIX, f"{key}.part"):
            resp = self._call("DELETE", k, f"deleting {self.url(k)}")
            existed = existed or resp.status_code in (200, 204)
        return existed

    def put_document(self, key: str, data: bytes) -> None:
        resp = self._call("PUT", key, f"writing {self.url(key)}", data=data,
                          headers={"Content-Type": "application/json"})
        self.check_response(resp, f"writing {self.url(key)}")

    def get_document(self, key: str) -> bytes | None:
        resp = self._call("GET", key, f"reading {self.url(key)}")
        if resp.status_code == 404:
            return None
        self.check_response(resp, f"reading {self.url(key)}")
        return resp.content


def refuse_userinfo(endpoint: str | None, *, field: str = "spec.storage.endpoint") -> None:
    """Refuse a storage endpoint with ``user[:password]@`` in it: credentials come from the Secret only.

    Any ``@`` counts (a password may hold ``/`` or ``?``, which URL parsers then read as the path). The
    message shows the endpoint with the userinfo replaced by ``***``.
    """
    from include.endpoints import redact

    if endpoint and "@" in endpoint:
        raise InvalidMigration(f"{redact(endpoint)!r} carries credentials (user@ or user:password@); "
                               f"put them in the Secret named by spec.storage.credentialsSecretRef", field=field)


def proxy_from(credentials: Credentials | None) -> str | None:
    """The proxy named by the Secret's key ``proxy`` (``http://host:port``; ``user:password@`` is allowed
    there, as it is a Secret), or None: proxies from the environment are never used."""
    proxy = credentials.first("proxy") if credentials is not None else None
    if not proxy:
        return None
    from urllib.parse import urlsplit

    from include.endpoints import redact

    try:
        parts = urlsplit(proxy)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port is not None
    except ValueError:
        ok = False
    if not ok:
        raise InvalidMigration(f"Secret {credentials.source} key 'proxy' ({redact(proxy)!r}) is not an "
                               f"http:// or https:// URL with a port", field="spec.storage.credentialsSecretRef")
    return proxy


def http_from(storage: StorageSpec, credentials: Credentials | None, guard=None) -> HttpStorage:
    """The HTTP backend of a spec's storage block and its Secret (``token``, ``caBundle``,
    ``insecureSkipVerify``, ``proxy``: see :func:`proxy_from`)."""
    endpoint = storage.endpoint or ""
    refuse_userinfo(endpoint)
    return HttpStorage(endpoint, bearer_token(credentials), verify=tls_verify(credentials, endpoint, "HTTP storage"),
                       guard=guard, proxy=proxy_from(credentials))


def _target_checking_adapter(policy: Any) -> Any:
    """A requests adapter that checks the real target of every request sent through a proxy against
    the address policy (the connect-time check sees only the proxy), redirects included: each one is
    sent through the adapter."""
    from requests.adapters import HTTPAdapter

    class TargetCheckingAdapter(HTTPAdapter):
        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            policy.check_endpoint(request.url, field="spec.storage.endpoint")
            return super().send(request, *args, **kwargs)

    return TargetCheckingAdapter()


def from_spec(storage, credentials=None):
    """The backend of a spec's ``storage`` block of type http, with the bearer token from its Secret."""
    from include.storage import address_guard

    return http_from(storage, credentials, guard=address_guard())
