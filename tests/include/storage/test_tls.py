"""include/storage/tls.py: a CA bundle from a Secret goes to a private file, never to a predictable path."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

import pytest

from include.inventory import Credentials
from include.storage import tls
from include.storage.tls import tls_verify

BUNDLE = "-----BEGIN CERTIFICATE-----\nMIIBsecretlessCAforTests\n-----END CERTIFICATE-----\n"


def _creds(**data: str) -> Credentials:
    return Credentials(data, "default/storage")


def _private(path: str) -> None:
    st = os.stat(path)
    assert st.st_uid == os.geteuid()
    assert stat.S_IMODE(st.st_mode) == 0o600
    parent = os.stat(os.path.dirname(path))
    assert parent.st_uid == os.geteuid()
    assert stat.S_IMODE(parent.st_mode) == 0o700


def test_bundle_goes_to_a_private_file():
    path = tls_verify(_creds(caBundle=BUNDLE), "https://s3.example", "S3 endpoint")
    assert isinstance(path, str)
    assert Path(path).read_text() == BUNDLE
    _private(path)


def test_same_bundle_same_file_other_bundle_other_file():
    first = tls.ca_bundle_file(BUNDLE)
    assert tls.ca_bundle_file(BUNDLE) == first
    other = tls.ca_bundle_file(BUNDLE + "\n")
    assert other != first and Path(other).read_text() == BUNDLE + "\n"
    assert os.path.dirname(other) == os.path.dirname(first)


def test_a_pre_created_predictable_file_is_never_used():
    """Regression: the bundle used to go to /tmp/vmmigration-ca-<sha256[:16]>.pem, used as is if it existed,
    so another local user could pre-create it with their own CA."""
    bundle = BUNDLE.replace("Tests", "PreCreated")
    old = Path(tempfile.gettempdir()) / f"vmmigration-ca-{hashlib.sha256(bundle.encode()).hexdigest()[:16]}.pem"
    old.write_text("-----BEGIN CERTIFICATE-----\nATTACKER\n-----END CERTIFICATE-----\n")
    try:
        if os.geteuid() == 0:
            import pwd

            nobody = pwd.getpwnam("nobody")
            os.chown(old, nobody.pw_uid, nobody.pw_gid)
        path = tls_verify(_creds(caBundle=bundle), "https://dav.example", "HTTP storage")
        assert path != str(old)
        assert Path(path).read_text() == bundle
        assert "ATTACKER" in old.read_text()  # left alone
        _private(path)
    finally:
        old.unlink()


def test_a_tampered_cached_file_is_replaced():
    bundle = BUNDLE.replace("Tests", "Tampered")
    first = tls.ca_bundle_file(bundle)
    Path(first).write_text("-----BEGIN CERTIFICATE-----\nATTACKER\n-----END CERTIFICATE-----\n")
    second = tls.ca_bundle_file(bundle)
    assert second != first and Path(second).read_text() == bundle


def test_a_removed_directory_is_made_again(monkeypatch):
    bundle = BUNDLE.replace("Tests", "Removed")
    first = tls.ca_bundle_file(bundle)
    import shutil

    shutil.rmtree(os.path.dirname(first))
    second = tls.ca_bundle_file(bundle)
    assert Path(second).read_text() == bundle
    _private(second)


@pytest.mark.parametrize(("data", "expected"), [({}, True), ({"insecureSkipVerify": "true"}, False)])
def test_no_bundle(data, expected):
    assert tls_verify(_creds(**data), "https://x", "S3 endpoint") is expected
    assert tls_verify(None, "https://x", "S3 endpoint") is True


def test_directory_belongs_to_this_process():
    tls.ca_bundle_file(BUNDLE)
    pid, directory = tls._ca_dir
    assert pid == os.getpid()
    assert os.path.basename(directory).startswith("vmmigration-ca-")
