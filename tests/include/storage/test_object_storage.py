"""S3 and HTTP backends against the real servers: round trips, resume after a kill, auth, TLS."""

from __future__ import annotations

import hashlib
import logging
import os

import pytest

from include.diskio import Segment
from include.errors import StorageAuthError, StorageError
from include.inventory import Credentials
from include.spec import ObjectRef, StorageSpec
from include.storage import backend_for
from include.storage.s3 import MiB
from tests.servers.webdav import start_webdav_server


@pytest.fixture(autouse=True)
def _loopback(monkeypatch):
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")


S3_BUCKET = "objects"  # the bucket the shared ``s3`` fixture (tests/conftest.py) makes


@pytest.fixture
def dav(tmp_path):
    server = start_webdav_server(tmp_path / "dav", token="tok")
    yield server
    server.stop()


def s3_backend(server, secret=None):
    creds = Credentials({"accessKeyID": server.access_key, "secretAccessKey": secret or server.secret_key}, "d/s")
    return backend_for(StorageSpec(type="s3", bucket="objects", endpoint=server.endpoint, region="us-east-1",
                                   credentialsSecretRef=ObjectRef("s", "d")), creds)


def payload(n: int, seed: int = 7) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def write(backend, key: str, data: bytes, chunk: int = 3 * MiB) -> None:
    with backend.open_writer(key, len(data)) as writer:
        for i in range(0, len(data), chunk):
            writer.write(Segment(length=len(data[i:i + chunk]), data=data[i:i + chunk]))
        writer.commit()


def read_all(backend, key: str) -> bytes:
    return b"".join(bytes(s.data) for s in backend.read(key))


def test_s3_multipart_round_trip_in_parallel_ranges(s3):
    backend = s3_backend(s3)
    data = payload(45 * MiB + 123)
    write(backend, "a/disk.qcow2", data)
    assert backend.size("a/disk.qcow2") == len(data)
    assert read_all(backend, "a/disk.qcow2") == data
    backend.put_manifest("a/disk.qcow2", {"sha256": "x"})
    assert backend.get_manifest("a/disk.qcow2") == {"sha256": "x"}
    write(backend, "a/disk.qcow2.keep", b"another object sharing the prefix")
    assert backend.delete("a/disk.qcow2") is True
    assert not backend.exists("a/disk.qcow2") and backend.get_manifest("a/disk.qcow2") is None
    assert read_all(backend, "a/disk.qcow2.keep") == b"another object sharing the prefix"  # exactly one key


def test_s3_delete_aborts_the_unfinished_upload_of_that_key_only(s3):
    backend = s3_backend(s3)
    data = payload(24 * MiB)
    for key in ("u/disk.raw", "u/disk.raw.other"):
        writer = backend.open_writer(key, len(data))
        for i in range(0, 17 * MiB, MiB):  # two 8 MiB parts leave, then the "task" dies
            writer.write(Segment(length=MiB, data=data[i:i + MiB]))
        writer.abort()

    def uploads():
        return {u["Key"] for u in backend.client.list_multipart_uploads(Bucket=backend.bucket).get("Uploads", [])}

    assert uploads() == {"u/disk.raw", "u/disk.raw.other"}
    backend.delete("u/disk.raw")
    assert uploads() == {"u/disk.raw.other"}


def test_s3_interrupted_upload_resumes_from_stored_parts(s3):
    backend = s3_backend(s3)
    data = payload(40 * MiB)
    writer = backend.open_writer("r/disk.raw", len(data))
    for i in range(0, 24 * MiB, MiB):  # three 8 MiB parts leave, then the "task" dies
        writer.write(Segment(length=MiB, data=data[i:i + MiB]))
    writer.abort()
    uploads = s3.client().list_multipart_uploads(Bucket="objects").get("Uploads", [])
    assert len(uploads) == 1
    resumed = s3_backend(s3).open_writer("r/disk.raw", len(data))
    for i in range(0, len(data), MiB):
        resumed.write(Segment(length=MiB, data=data[i:i + MiB]))
    resumed.commit()
    assert resumed.reused >= 16 * MiB  # stored parts were kept, not sent again
    assert resumed.sent <= len(data) - resumed.reused
    assert read_all(backend, "r/disk.raw") == data


def test_s3_holes_are_sent_as_zeros_by_the_writer(s3):
    backend = s3_backend(s3)
    with backend.open_writer("h/x.raw", 10 * MiB) as writer:
        writer.write(Segment(length=4, data=b"abcd"))
        writer.write(Segment(length=10 * MiB))
        writer.commit()
    assert read_all(backend, "h/x.raw") == b"abcd" + bytes(10 * MiB)


def test_s3_wrong_secret_is_an_auth_error(s3):
    with pytest.raises(StorageAuthError, match="Storage authentication failed"):
        s3_backend(s3, secret="wrong").check()


def test_http_round_trip_is_published_atomically(dav):
    backend = backend_for(StorageSpec(type="http", endpoint=dav.url), Credentials({"token": "Bearer tok"}, "d/t"))
    data = payload(9 * MiB + 5)
    write(backend, "m/disk.qcow2", data)
    assert not backend.exists("m/disk.qcow2.part")
    assert backend.size("m/disk.qcow2") == len(data)
    assert read_all(backend, "m/disk.qcow2") == data


def test_http_download_resumes_with_range_after_the_server_is_killed(dav, caplog):
    backend = backend_for(StorageSpec(type="http", endpoint=dav.url), Credentials({"token": "tok"}, "d/t"))
    data = payload(64 * MiB)
    write(backend, "k/disk.raw", data)
    stream = backend.read("k/disk.raw")
    first = next(stream)  # the GET is under way
    dav.kill()
    dav.restart()
    with caplog.at_level(logging.WARNING):
        rest = b"".join(bytes(s.data) for s in stream)
    got = bytes(first.data) + rest
    assert got == data
    assert "resuming with Range" in caplog.text


def test_http_wrong_token_is_an_auth_error(dav):
    backend = backend_for(StorageSpec(type="http", endpoint=dav.url), Credentials({"token": "nope"}, "d/t"))
    with pytest.raises(StorageAuthError):
        backend.check()


def test_http_tls_verified_with_the_secret_ca_bundle(tmp_path, caplog):
    server = start_webdav_server(tmp_path / "tls", token="tok", tls=True)
    try:
        spec = StorageSpec(type="http", endpoint=server.url)
        with pytest.raises(StorageError, match="TLS verification failed"):
            backend_for(spec, Credentials({"token": "tok"}, "d/t")).exists("x")
        from pathlib import Path

        ca = Path(server.ca_file).read_text()
        backend = backend_for(spec, Credentials({"token": "tok", "caBundle": ca}, "d/t"))
        assert "HTTP storage" in backend.check()
        with caplog.at_level(logging.WARNING):
            insecure = backend_for(spec, Credentials({"token": "tok", "insecureSkipVerify": "true"}, "d/t"))
        assert "TLS verification is DISABLED" in caplog.text
        assert insecure.exists("nothing-here") is False
    finally:
        server.stop()
        os.environ.pop("REQUESTS_CA_BUNDLE", None)


def test_parts_in_memory_stay_within_the_budget_as_parts_grow():
    from include.storage.s3 import MEMORY_BUDGET, S3Storage, _MultipartWriter, part_size_for

    storage = S3Storage(client=None, bucket="b")
    try:
        for disk in (10 * 2**30, 300 * 2**30, 600 * 2**30, 1200 * 2**30):
            part = part_size_for(disk)
            writer = _MultipartWriter(storage, "k", part)
            assert (writer.max_inflight + 1) * part <= max(MEMORY_BUDGET, 2 * part), (disk, part)
            assert part * 10_000 >= disk
    finally:
        storage.close()


def test_an_upload_that_outgrows_its_part_count_fails_clearly(s3, monkeypatch):
    import include.storage.s3 as s3mod
    from include.errors import InvalidMigration

    monkeypatch.setattr(s3mod, "MAX_PARTS", 2)
    backend = s3_backend(s3)
    writer = backend.open_writer("big/disk.raw", 8 * MiB)  # the hint says one part; the disk needs three
    with pytest.raises(InvalidMigration, match="needs more than 2 parts"):
        for _ in range(3):
            writer.write(Segment(length=8 * MiB, data=bytes(8 * MiB)))
    writer.abort()
