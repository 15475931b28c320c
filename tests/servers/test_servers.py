"""The test servers themselves: versitygw (S3, real SigV4 checks) and nginx WebDAV (bearer token, ranges, TLS).

A server that cannot start fails the test with the reason (ServerStartError carries the log tail); nothing skips.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from botocore.exceptions import ClientError, EndpointConnectionError

from tests.servers.s3 import S3Server, ServerStartError, start_s3_server
from tests.servers.webdav import WebDavServer, start_webdav_server

MiB = 1 << 20


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A server of its own, for tests that kill it."""
    server = start_s3_server(tmp_path_factory.mktemp("s3kill"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bucket(s3: S3Server) -> str:
    return s3.create_bucket("test-bucket")


@pytest.fixture(scope="module")
def dav(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDavServer]:
    server = start_webdav_server(tmp_path_factory.mktemp("dav"), token="s3cr3t-token")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dav_private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDavServer]:
    server = start_webdav_server(tmp_path_factory.mktemp("davkill"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dav_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDavServer]:
    server = start_webdav_server(tmp_path_factory.mktemp("davtls"), tls=True)
    try:
        yield server
    finally:
        server.stop()


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return exc.value.response["Error"]["Code"]


# -- S3 -----------------------------------------------------------------------------------------------------------
def test_s3_binds_loopback_and_starts_fast(s3: S3Server) -> None:
    assert s3.endpoint == f"http://127.0.0.1:{s3.port}"
    assert s3.region == "us-east-1"
    assert s3.startup_seconds is not None and s3.startup_seconds < 15


def test_s3_bucket_put_get(s3: S3Server, bucket: str) -> None:
    c = s3.client()
    assert bucket in [b["Name"] for b in c.list_buckets()["Buckets"]]
    c.put_object(Bucket=bucket, Key="vm1/disk0.raw", Body=b"hello world", Metadata={"sha256": "abc"})
    obj = c.get_object(Bucket=bucket, Key="vm1/disk0.raw")
    assert obj["Body"].read() == b"hello world"
    assert obj["Metadata"] == {"sha256": "abc"}
    assert (s3.root / bucket / "vm1" / "disk0.raw").read_bytes() == b"hello world"


@pytest.mark.parametrize(
    ("access_key", "secret_key", "codes"),
    [
        (None, "wrong-secret", {"SignatureDoesNotMatch"}),
        ("AKNOSUCHKEY", None, {"InvalidAccessKeyId"}),
        ("AKNOSUCHKEY", "wrong-secret", {"InvalidAccessKeyId", "SignatureDoesNotMatch"}),
    ],
)
def test_s3_wrong_credentials_rejected(
    s3: S3Server, bucket: str, access_key: str | None, secret_key: str | None, codes: set[str]
) -> None:
    bad = s3.client(access_key=access_key, secret_key=secret_key)
    with pytest.raises(ClientError) as exc:
        bad.list_objects_v2(Bucket=bucket)
    assert _code(exc) in codes
    with pytest.raises(ClientError) as exc:
        bad.put_object(Bucket=bucket, Key="intruder", Body=b"x")
    assert _code(exc) in codes
    assert not (s3.root / bucket / "intruder").exists()


def test_s3_multipart(s3: S3Server, bucket: str) -> None:
    c = s3.client()
    parts = [os.urandom(5 * MiB), os.urandom(5 * MiB)]
    up = c.create_multipart_upload(Bucket=bucket, Key="mp/disk.raw", Metadata={"vm": "vm1"})
    uid = up["UploadId"]
    etags = [
        c.upload_part(Bucket=bucket, Key="mp/disk.raw", UploadId=uid, PartNumber=n, Body=data)["ETag"]
        for n, data in enumerate(parts, start=1)
    ]
    listed = c.list_parts(Bucket=bucket, Key="mp/disk.raw", UploadId=uid)["Parts"]
    assert [(p["PartNumber"], p["Size"], p["ETag"]) for p in listed] == [
        (1, 5 * MiB, etags[0]),
        (2, 5 * MiB, etags[1]),
    ]
    done = c.complete_multipart_upload(
        Bucket=bucket,
        Key="mp/disk.raw",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, start=1)]},
    )
    assert done["ETag"].endswith('-2"')
    head = c.head_object(Bucket=bucket, Key="mp/disk.raw")
    assert head["ContentLength"] == 10 * MiB
    assert head["Metadata"] == {"vm": "vm1"}
    body = c.get_object(Bucket=bucket, Key="mp/disk.raw")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(b"".join(parts)).digest()


def test_s3_multipart_abort(s3: S3Server, bucket: str) -> None:
    c = s3.client()
    uid = c.create_multipart_upload(Bucket=bucket, Key="aborted")["UploadId"]
    c.upload_part(Bucket=bucket, Key="aborted", UploadId=uid, PartNumber=1, Body=b"x" * 1024)
    assert uid in [u["UploadId"] for u in c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    c.abort_multipart_upload(Bucket=bucket, Key="aborted", UploadId=uid)
    with pytest.raises(ClientError) as exc:
        c.list_parts(Bucket=bucket, Key="aborted", UploadId=uid)
    assert _code(exc) == "NoSuchUpload"
    assert uid not in [u["UploadId"] for u in c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    with pytest.raises(ClientError):
        c.head_object(Bucket=bucket, Key="aborted")


def test_s3_multipart_small_part_rejected(s3: S3Server, bucket: str) -> None:
    c = s3.client()
    uid = c.create_multipart_upload(Bucket=bucket, Key="small")["UploadId"]
    etags = [
        c.upload_part(Bucket=bucket, Key="small", UploadId=uid, PartNumber=n, Body=b"y" * 100)["ETag"] for n in (1, 2)
    ]
    with pytest.raises(ClientError) as exc:
        c.complete_multipart_upload(
            Bucket=bucket,
            Key="small",
            UploadId=uid,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in zip((1, 2), etags)]},
        )
    assert _code(exc) == "EntityTooSmall"
    c.abort_multipart_upload(Bucket=bucket, Key="small", UploadId=uid)


def test_s3_ranged_get(s3: S3Server, bucket: str) -> None:
    c = s3.client()
    data = bytes(range(256)) * 64
    c.put_object(Bucket=bucket, Key="ranged", Body=data)
    part = c.get_object(Bucket=bucket, Key="ranged", Range="bytes=1000-2999")
    assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert part["ContentRange"] == f"bytes 1000-2999/{len(data)}"
    assert part["Body"].read() == data[1000:3000]
    assert c.get_object(Bucket=bucket, Key="ranged", Range="bytes=-10")["Body"].read() == data[-10:]


def test_s3_kill_and_restart_keeps_data(s3_private: S3Server) -> None:
    s3 = s3_private
    name = s3.create_bucket("durable")
    data = os.urandom(MiB + 123)
    s3.client().put_object(Bucket=name, Key="k/obj", Body=data)

    s3.kill()
    assert not s3.running
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{s3.endpoint}/health", timeout=2)
    with pytest.raises(EndpointConnectionError):
        s3.client().head_object(Bucket=name, Key="k/obj")

    s3.restart()
    assert s3.endpoint == f"http://127.0.0.1:{s3.port}"
    assert s3.client().get_object(Bucket=name, Key="k/obj")["Body"].read() == data
    # the credentials did not change across the restart, and are still enforced
    with pytest.raises(ClientError):
        s3.client(secret_key="wrong").get_object(Bucket=name, Key="k/obj")


def test_s3_stop_is_graceful_and_idempotent(s3_private: S3Server) -> None:
    s3_private.stop()
    assert s3_private.process is not None and s3_private.process.returncode == 0
    s3_private.stop()


# -- WebDAV -------------------------------------------------------------------------------------------------------
def test_dav_put_get_delete(dav: WebDavServer) -> None:
    assert dav.url == f"http://127.0.0.1:{dav.port}/disks/"
    data = os.urandom(3 * MiB + 7)
    assert dav.put("vm1/disk0.raw", data).status_code == 201
    assert dav.put("vm1/disk0.raw", data).status_code == 204  # overwrite
    got = dav.get("vm1/disk0.raw")
    assert got.status_code == 200
    assert got.content == data
    assert got.headers["Accept-Ranges"] == "bytes"
    assert (dav.root / "vm1" / "disk0.raw").read_bytes() == data
    assert dav.delete("vm1/disk0.raw").status_code == 204
    assert dav.get("vm1/disk0.raw").status_code == 404


def test_dav_chunked_put(dav: WebDavServer) -> None:
    chunks = [os.urandom(256 * 1024) for _ in range(5)]
    assert dav.put("chunked/blob", iter(chunks)).status_code == 201
    assert dav.get("chunked/blob").content == b"".join(chunks)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cr3t-token"}])
def test_dav_token_required(dav: WebDavServer, headers: dict[str, str]) -> None:
    assert dav.put("vm1/secret", b"x").status_code in (201, 204)
    url = dav.url_for("vm1/secret")
    assert requests.get(url, headers=headers, timeout=10).status_code == 401
    r = requests.put(dav.url_for("vm1/intruder"), data=b"x", headers=headers, timeout=10)
    assert r.status_code == 401
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert requests.delete(url, headers=headers, timeout=10).status_code == 401
    assert not (dav.root / "vm1" / "intruder").exists()
    assert (dav.root / "vm1" / "secret").exists()


def test_dav_range(dav: WebDavServer) -> None:
    data = bytes(range(256)) * 100
    dav.put("ranged.bin", data)
    r = dav.get("ranged.bin", headers={"Range": "bytes=1000-2023"})
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes 1000-2023/{len(data)}"
    assert r.content == data[1000:2024]
    assert dav.get("ranged.bin", headers={"Range": "bytes=-16"}).content == data[-16:]


def test_dav_kill_and_restart_keeps_data(dav_private: WebDavServer) -> None:
    dav = dav_private
    data = os.urandom(MiB)
    assert dav.put("vm2/disk.qcow2", data).status_code == 201
    dav.kill()
    assert not dav.running
    with pytest.raises(requests.ConnectionError):
        dav.get("vm2/disk.qcow2", timeout=2)
    dav.restart()
    r = dav.get("vm2/disk.qcow2")
    assert r.status_code == 200
    assert r.content == data


def test_dav_tls(dav_tls: WebDavServer) -> None:
    assert dav_tls.url.startswith("https://127.0.0.1:")
    assert dav_tls.ca_file is not None and dav_tls.ca_file.is_file()
    assert dav_tls.put("tls/blob", b"over tls").status_code == 201
    r = requests.get(dav_tls.url_for("tls/blob"), headers=dav_tls.headers, verify=str(dav_tls.ca_file), timeout=10)
    assert r.status_code == 200
    assert r.content == b"over tls"
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(dav_tls.url_for("tls/blob"), headers=dav_tls.headers, verify=True, timeout=10)
    # plain http on the TLS port is refused by nginx (400), not served
    plain = requests.get(
        dav_tls.url_for("tls/blob").replace("https://", "http://"), headers=dav_tls.headers, timeout=10
    )
    assert plain.status_code == 400


# -- startup failures are reported, not skipped -------------------------------------------------------------------
@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_s3_start_failure_has_reason(tmp_path: Path, busy_port: int) -> None:
    with pytest.raises(ServerStartError, match="address already in use"):
        start_s3_server(tmp_path, port=busy_port)


def test_s3_missing_binary_points_to_install_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERSITYGW", str(tmp_path / "no-such-versitygw"))
    with pytest.raises(ServerStartError, match="install_servers.sh"):
        start_s3_server(tmp_path)


def test_dav_start_failure_has_reason(tmp_path: Path, busy_port: int) -> None:
    with pytest.raises(ServerStartError, match="Address already in use"):
        start_webdav_server(tmp_path, port=busy_port)
