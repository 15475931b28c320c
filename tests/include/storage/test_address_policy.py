"""Storage backends obey the address policy: up front in check(), and again on every connect."""

from __future__ import annotations

import pytest

from include.inventory import Credentials
from include.netpolicy import AddressRefused
from include.spec import ObjectRef, StorageSpec
from include.storage import backend_for
from tests.servers.webdav import start_webdav_server

S3_BUCKET = "policy-test"  # the bucket the shared ``s3`` fixture (tests/conftest.py) makes


def _s3_backend(server, endpoint=None):
    creds = Credentials({"accessKey": server.access_key, "secretKey": server.secret_key}, "default/s3")
    spec = StorageSpec(type="s3", bucket="policy-test", endpoint=endpoint or server.endpoint, region="us-east-1",
                       credentialsSecretRef=ObjectRef("s3", "default"))
    return backend_for(spec, creds)


def test_loopback_s3_refused_unless_allowed(s3, monkeypatch):
    monkeypatch.delenv("VMMIGRATION_ALLOW_LOOPBACK", raising=False)
    with pytest.raises(AddressRefused) as err:
        _s3_backend(s3).check()
    assert err.value.field == "spec.storage.endpoint"
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    assert "policy-test" in _s3_backend(s3).check()


def test_connect_time_check_catches_what_validation_did_not_see(s3, monkeypatch):
    """Validated while loopback was allowed; the policy then says no: every later connect is refused."""
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    backend = _s3_backend(s3)
    backend.check()
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "false")
    refused = _s3_backend(s3)  # a new backend (a retried task) built under the stricter policy
    with pytest.raises(AddressRefused):
        refused.exists("anything")


def test_metadata_address_is_always_refused(monkeypatch):
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    spec = StorageSpec(type="http", endpoint="http://169.254.169.254/latest")
    with pytest.raises(AddressRefused):
        backend_for(spec, Credentials({"token": "t"}, "default/t")).check()


def test_http_backend_checks_on_connect(tmp_path, monkeypatch):
    server = start_webdav_server(tmp_path / "dav", token="tok")
    try:
        monkeypatch.setenv("VMMIGRATION_STORAGE_ALLOWLIST", "10.0.0.0/8")
        monkeypatch.delenv("VMMIGRATION_ALLOW_LOOPBACK", raising=False)
        backend = backend_for(StorageSpec(type="http", endpoint=server.url), Credentials({"token": "tok"}, "x/t"))
        with pytest.raises(AddressRefused):
            backend.exists("x")
    finally:
        server.stop()


def test_paginated_listings_are_guarded_too(s3, monkeypatch):
    monkeypatch.delenv("VMMIGRATION_ALLOW_LOOPBACK", raising=False)
    backend = _s3_backend(s3)
    with pytest.raises(AddressRefused):
        backend.delete("default/x")  # HEAD, DeleteObjects, ListMultipartUploads through a paginator


# --- credentials never in a storage endpoint ---------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ["http://user:hunter2secret@dav.example/disks/",
                                      "https://user:hunter2/secret@dav.example/disks/",
                                      "https://token@dav.example/disks/"])
def test_http_endpoint_with_userinfo_is_refused_and_redacted(endpoint):
    from include.errors import InvalidMigration

    with pytest.raises(InvalidMigration) as err:
        backend_for(StorageSpec(type="http", endpoint=endpoint), Credentials({"token": "t"}, "default/t"))
    assert err.value.field == "spec.storage.endpoint"
    assert "hunter2" not in str(err.value) and "user" not in str(err.value).split("carries")[0]
    assert "***@dav.example" in str(err.value)


def test_s3_endpoint_with_userinfo_is_refused_in_the_spec_and_in_the_secret():
    from include.errors import InvalidMigration
    from include.storage.s3 import settings_from

    creds = Credentials({"accessKey": "AKIA", "secretKey": "s"}, "default/s3")
    spec = StorageSpec(type="s3", bucket="b", endpoint="http://AKIA:hunter2secret@s3.example:9000", region="r",
                       credentialsSecretRef=ObjectRef("s3", "default"))
    with pytest.raises(InvalidMigration) as err:
        settings_from(spec, creds)
    assert err.value.field == "spec.storage.endpoint" and "hunter2secret" not in str(err.value)
    in_secret = Credentials({"accessKey": "AKIA", "secretKey": "s", "endpoint": "https://a:hunter2secret@s3.example"},
                            "default/s3")
    with pytest.raises(InvalidMigration) as err:
        settings_from(StorageSpec(type="s3", bucket="b", region="r"), in_secret)
    assert err.value.field == "spec.storage.credentialsSecretRef" and "hunter2secret" not in str(err.value)


def test_urls_in_client_errors_are_redacted():
    from include.storage.http import HttpStorage
    from include.storage.s3 import translate

    err = ConnectionError("Max retries exceeded with url: http://u:hunter2secret@h:1/x")
    assert "hunter2secret" not in str(translate(err, "reaching"))
    assert "hunter2secret" not in str(HttpStorage("http://h/", None).translate(err, "reaching"))


# --- proxies: none from the environment; an explicit one never hides the real target ---------------------

class _Proxy:
    """A tiny HTTP proxy that records what it is asked for; forwards plain-HTTP requests if ``forward``."""

    def __init__(self, forward: bool) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                proxy.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if not forward or not self.path.startswith("http://"):
                    self.send_response(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                import http.client
                from urllib.parse import urlsplit

                target = urlsplit(self.path)
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "host")}
                conn.request(self.command, target.path + (f"?{target.query}" if target.query else ""), body=body,
                             headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_DELETE = do_OPTIONS = do_MOVE = do_POST = do_CONNECT = _any

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def env_proxy(monkeypatch):
    proxy = _Proxy(forward=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    yield proxy
    proxy.stop()


def test_http_storage_ignores_environment_proxies(tmp_path, env_proxy):
    server = start_webdav_server(tmp_path / "dav", token="tok")
    try:
        backend = backend_for(StorageSpec(type="http", endpoint=server.url), Credentials({"token": "tok"}, "x/t"))
        assert "HTTP storage" in backend.check()
        assert backend.exists("nothing-here") is False
    finally:
        server.stop()
    assert env_proxy.requests == []


def test_s3_storage_ignores_environment_proxies(s3, env_proxy):
    assert "policy-test" in _s3_backend(s3).check()
    assert env_proxy.requests == []


def test_hook_built_s3_client_ignores_environment_proxies(s3, env_proxy):
    from hooks.s3_storage_hook import MigrationS3Hook
    from include.storage.s3 import S3Storage, settings_from

    creds = Credentials({"accessKey": s3.access_key, "secretKey": s3.secret_key}, "default/s3")
    spec = StorageSpec(type="s3", bucket="policy-test", endpoint=s3.endpoint, region="us-east-1",
                       credentialsSecretRef=ObjectRef("s3", "default"))
    settings = settings_from(spec, creds)
    assert "policy-test" in S3Storage(MigrationS3Hook(settings=settings).get_conn(), settings.bucket,
                                      endpoint=settings.endpoint_url).check()
    assert env_proxy.requests == []


def test_explicit_http_proxy_is_used_and_the_real_target_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    proxy = _Proxy(forward=True)
    server = start_webdav_server(tmp_path / "dav", token="tok")
    try:
        creds = Credentials({"token": "tok", "proxy": proxy.url}, "x/t")
        backend = backend_for(StorageSpec(type="http", endpoint=server.url), creds)
        assert backend.exists("nothing-here") is False
        assert proxy.requests and proxy.requests[0][1].startswith(server.url)  # went through the proxy
        proxy.requests.clear()
        # the proxy is allowed (loopback), the target is not: refused before anything reaches the proxy
        refused = backend_for(StorageSpec(type="http", endpoint="http://169.254.169.254/latest/"), creds)
        with pytest.raises(AddressRefused):
            refused.exists("meta-data")
        assert proxy.requests == []
    finally:
        server.stop()
        proxy.stop()


def test_explicit_s3_proxy_never_hides_a_refused_target(monkeypatch):
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    proxy = _Proxy(forward=False)
    try:
        creds = Credentials({"accessKey": "AKIA", "secretKey": "s", "proxy": proxy.url}, "default/s3")
        spec = StorageSpec(type="s3", bucket="b", endpoint="http://169.254.169.254", region="us-east-1",
                           credentialsSecretRef=ObjectRef("s3", "default"))
        with pytest.raises(AddressRefused):
            backend_for(spec, creds).exists("x")
        assert proxy.requests == []
    finally:
        proxy.stop()


def test_explicit_s3_proxy_is_used(s3, monkeypatch):
    from include.errors import StorageError

    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    proxy = _Proxy(forward=False)  # answers 502: enough to see the request went to it
    try:
        creds = Credentials({"accessKey": s3.access_key, "secretKey": s3.secret_key, "proxy": proxy.url}, "d/s3")
        spec = StorageSpec(type="s3", bucket="policy-test", endpoint=s3.endpoint, region="us-east-1",
                           credentialsSecretRef=ObjectRef("s3", "default"))
        with pytest.raises(StorageError):
            backend_for(spec, creds).exists("x")
        assert proxy.requests and proxy.requests[0][1].startswith(s3.endpoint)
    finally:
        proxy.stop()


def test_bad_proxy_value_is_refused_without_echoing_credentials():
    from include.errors import InvalidMigration

    creds = Credentials({"token": "t", "proxy": "socks5://u:hunter2secret@p:1080"}, "x/t")
    with pytest.raises(InvalidMigration) as err:
        backend_for(StorageSpec(type="http", endpoint="http://dav.example/"), creds)
    assert "hunter2secret" not in str(err.value)
