"""Storage backends obey the address policy: up front in check(), and again on every connect."""

from __future__ import annotations

import pytest

from include.inventory import Credentials
from include.netpolicy import AddressRefused
from include.spec import ObjectRef, StorageSpec
from include.storage import backend_for
from tests.servers.s3 import start_s3_server
from tests.servers.webdav import start_webdav_server


@pytest.fixture
def s3(tmp_path):
    server = start_s3_server(tmp_path / "s3")
    server.create_bucket("policy-test")
    yield server
    server.stop()


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
        backend.delete_prefix("default/x")  # ListObjectsV2 through a paginator
