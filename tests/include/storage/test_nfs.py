"""include/storage/nfs.py: a mounted share, atomic writes, manifests, keys confined to the share."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from include.diskio import Segment, file_segments, hash_segments
from include.errors import InvalidMigration, StorageError
from include.spec import StorageSpec
from include.storage import backend_for
from include.storage.nfs import MANIFEST_SUFFIX, NfsStorage

KEY = "apps/move-web/vda.qcow2"
MiB = 2**20


@pytest.fixture
def share(tmp_path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    return root


@pytest.fixture
def nfs(share) -> NfsStorage:
    return NfsStorage(str(share), "nfs.local")


def visible_files(root: Path) -> list[str]:
    """Published objects (a hidden ``.<name>.part`` is a write in progress, kept for a resume)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def joined(segments) -> bytes:
    return b"".join(bytes(s.length) if s.data is None else bytes(s.data) for s in segments)


# -- writer ---------------------------------------------------------------------------------------------------

def test_writer_commits_atomically(nfs, share):
    writer = nfs.open_writer(KEY, size_hint=10)
    writer.write(Segment(5, b"hello"))
    writer.write(Segment(3))
    writer.write(Segment(2, b"!!"))
    final = share / KEY
    assert not final.exists()  # nothing under the final name before commit
    assert not nfs.exists(KEY)
    temps = [p for p in final.parent.iterdir()]
    assert len(temps) == 1 and temps[0].name == ".vda.qcow2.part"
    writer.commit()
    assert final.read_bytes() == b"hello\0\0\0!!"
    assert visible_files(share) == [KEY]  # the temp file became the object
    assert nfs.exists(KEY) and nfs.size(KEY) == 10


def test_writer_abort_keeps_the_part_for_a_resume_but_publishes_nothing(nfs, share):
    writer = nfs.open_writer(KEY, size_hint=0)
    writer.write(Segment(4, b"half"))
    writer.abort()
    assert visible_files(share) == []  # nothing under the final name
    assert not nfs.exists(KEY)
    writer.abort()  # twice is fine


def test_writer_context_manager_aborts_on_exception(nfs, share):
    with pytest.raises(RuntimeError, match="source died"), nfs.open_writer(KEY, size_hint=0) as writer:
        writer.write(Segment(4, b"half"))
        raise RuntimeError("source died")
    assert visible_files(share) == []
    assert not nfs.exists(KEY)


def test_a_retry_resumes_from_the_part_and_rewrites_from_the_first_difference(nfs):
    data = bytes(range(256)) * 4096  # 1 MiB
    first = nfs.open_writer(KEY, size_hint=len(data))
    first.write(Segment(len(data) // 2, data[: len(data) // 2]))
    first.abort()  # the task died half way
    second = nfs.open_writer(KEY, size_hint=len(data))
    for i in range(0, len(data), 65536):
        second.write(Segment(65536, data[i:i + 65536]))
    second.commit()
    assert second.reused == len(data) // 2
    assert joined(nfs.read(KEY)) == data


def test_a_part_that_differs_is_rewritten(nfs):
    stale = nfs.open_writer(KEY, size_hint=8)
    stale.write(Segment(8, b"AAAABBBB"))
    stale.abort()
    writer = nfs.open_writer(KEY, size_hint=8)
    writer.write(Segment(4, b"AAAA"))
    writer.write(Segment(2, b"CC"))
    writer.write(Segment(2))
    writer.commit()
    assert writer.reused == 4
    assert joined(nfs.read(KEY)) == b"AAAACC\0\0"


def test_delete_removes_a_leftover_part(nfs, share):
    writer = nfs.open_writer(KEY, size_hint=4)
    writer.write(Segment(4, b"half"))
    writer.abort()
    nfs.delete(KEY)
    assert not list(share.rglob(".*.part"))


def test_writer_context_manager_commit(nfs):
    with nfs.open_writer(KEY, size_hint=0) as writer:
        writer.write(Segment(3, b"abc"))
        writer.commit()
    assert joined(nfs.read(KEY)) == b"abc"


def test_a_failed_rewrite_keeps_the_previous_object(nfs):
    with nfs.open_writer(KEY, size_hint=0) as writer:
        writer.write(Segment(3, b"old"))
        writer.commit()
    with pytest.raises(OSError), nfs.open_writer(KEY, size_hint=0) as writer:
        writer.write(Segment(3, b"new"))
        raise OSError("network dropped")
    assert joined(nfs.read(KEY)) == b"old"


def test_rewrite_replaces_the_object(nfs):
    for content in (b"first version, longer", b"second"):
        with nfs.open_writer(KEY, size_hint=0) as writer:
            writer.write(Segment(len(content), content))
            writer.commit()
    assert joined(nfs.read(KEY)) == b"second"


def test_open_writer_refuses_when_the_share_is_too_small(nfs, share):
    needed = shutil.disk_usage(share).free * 2 + 10**12
    with pytest.raises(StorageError, match=f"no space on the share for {re.escape(str(share / KEY))}: \\d+ bytes "
                                           f"free, {needed} needed"):
        nfs.open_writer(KEY, size_hint=needed)
    assert visible_files(share) == []


def test_sparse_writes_stay_sparse(nfs, share, tmp_path):
    src = tmp_path / "src.raw"
    with open(src, "wb") as fh:
        fh.truncate(64 * MiB)
        fh.seek(10 * MiB)
        fh.write(os.urandom(8192))
    with nfs.open_writer(KEY, size_hint=64 * MiB) as writer:
        for seg in file_segments(src):
            writer.write(seg)
        writer.commit()
    stored = share / KEY
    assert stored.stat().st_size == 64 * MiB
    assert stored.stat().st_blocks * 512 <= 256 * 1024  # a few blocks, not 64 MiB
    assert stored.read_bytes() == src.read_bytes()
    # read back as segments: the holes are still holes
    segments = list(nfs.read(KEY))
    assert any(s.data is None for s in segments)
    hasher = hashlib.sha256()
    list(hash_segments(segments, hasher))
    assert hasher.hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()


def test_trailing_hole_sets_the_length(nfs, share):
    with nfs.open_writer(KEY, size_hint=0) as writer:
        writer.write(Segment(1, b"x"))
        writer.write(Segment(5 * MiB))
        writer.commit()
    assert (share / KEY).stat().st_size == 5 * MiB + 1


# -- reading, manifests, deletion ------------------------------------------------------------------------------

def test_read_missing_object(nfs):
    with pytest.raises(StorageError, match="is missing from the share"):
        nfs.read("apps/none.qcow2")


def test_manifest_put_get(nfs, share):
    assert nfs.get_manifest(KEY) is None
    (share / KEY).parent.mkdir(parents=True)  # the object's folder (open_writer creates it)
    manifest = {"sha256": "ab" * 32, "size": 10, "format": "qcow2"}
    nfs.put_manifest(KEY, manifest)
    assert nfs.get_manifest(KEY) == manifest
    assert (share / (KEY + MANIFEST_SUFFIX)).is_file()
    nfs.put_manifest(KEY, {"sha256": "cd" * 32})
    assert nfs.get_manifest(KEY) == {"sha256": "cd" * 32}
    assert visible_files(share) == [KEY + MANIFEST_SUFFIX]  # no temp left
    assert not nfs.exists(KEY)  # a manifest is not the object


def test_manifest_that_cannot_be_serialised_leaves_nothing(nfs, share):
    (share / "apps" / "move-web").mkdir(parents=True)
    with pytest.raises(TypeError):
        nfs.put_manifest(KEY, {"bad": object()})
    assert visible_files(share) == []


def test_delete_removes_object_and_manifest(nfs, share):
    with nfs.open_writer(KEY, size_hint=0) as writer:
        writer.write(Segment(1, b"x"))
        writer.commit()
    nfs.put_manifest(KEY, {"sha256": "0"})
    assert nfs.delete(KEY) is True
    assert visible_files(share) == []
    assert nfs.delete(KEY) is False  # already gone


def test_only_empty_folders_are_removed(nfs, share):
    with nfs.open_writer(KEY, size_hint=0) as writer:
        writer.write(Segment(1, b"x"))
        writer.commit()
    (share / "apps" / "move-web" / "someone-elses.txt").write_text("keep")
    nfs.delete(KEY)
    assert nfs.remove_empty_dir("apps/move-web") is False  # not empty: nothing in it is touched
    assert (share / "apps" / "move-web" / "someone-elses.txt").read_text() == "keep"
    (share / "apps" / "move-web" / "someone-elses.txt").unlink()
    assert nfs.remove_empty_dir("apps/move-web") is True
    assert nfs.remove_empty_dir("apps/never") is False
    assert (share / "apps").is_dir()


def test_folders_and_files_are_private(nfs, share):
    with nfs.open_writer(KEY, size_hint=0) as writer:
        writer.write(Segment(1, b"x"))
        writer.commit()
    nfs.put_manifest(KEY, {"sha256": "0"})
    assert nfs.created_dirs == ["apps", "apps/move-web"]
    for folder in (share / "apps", share / "apps" / "move-web"):
        assert folder.stat().st_mode & 0o777 == 0o700
    for file in (share / KEY, share / (KEY + MANIFEST_SUFFIX)):
        assert file.stat().st_mode & 0o777 == 0o600


def _assert_refused(call) -> None:
    with pytest.raises(InvalidMigration) as info:
        call()
    assert info.value.field == "spec.storage.path"
    assert "is not a plain relative path" in str(info.value)


@pytest.mark.parametrize("key", ["../outside.qcow2", "/etc/passwd", "apps/../../outside", "../share-twin/x"])
def test_keys_escaping_the_share_are_refused(nfs, share, key):
    for call in (lambda: nfs.open_writer(key, 0), lambda: nfs.read(key), lambda: nfs.exists(key),
                 lambda: nfs.size(key), lambda: nfs.delete(key), lambda: nfs.remove_empty_dir(key),
                 lambda: nfs.get_manifest(key), lambda: nfs.put_manifest(key, {}), lambda: nfs.local_path(key)):
        _assert_refused(call)
    assert list(share.parent.iterdir()) == [share]  # nothing created next to the share


@pytest.mark.parametrize("key", ["", ".", "apps/..", "apps/../.."])
def test_keys_naming_the_share_itself_are_refused(nfs, share, key):
    (share / "keep.qcow2").write_bytes(b"x")
    for call in (lambda: nfs.open_writer(key, 0), lambda: nfs.delete(key), lambda: nfs.remove_empty_dir(key),
                 lambda: nfs.exists(key), lambda: nfs.local_path(key)):
        _assert_refused(call)
    assert visible_files(share) == ["keep.qcow2"]


def test_symlink_out_of_the_share_is_refused(nfs, share, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (share / "link").symlink_to(outside)
    with pytest.raises(StorageError, match="is a symlink or not a folder; refusing to follow it"):
        nfs.open_writer("link/vda.qcow2", 0)
    assert list(outside.iterdir()) == []


def test_local_path_and_location(nfs, share):
    with nfs.open_writer(KEY, size_hint=0) as writer:
        writer.commit()
    assert nfs.local_path(KEY) == (share / KEY).resolve()
    assert nfs.location(KEY) == str(share / KEY)
    assert nfs.type == "nfs"


# -- check ----------------------------------------------------------------------------------------------------------

def test_check_on_a_missing_folder_names_spec_storage_path(tmp_path):
    storage = NfsStorage(str(tmp_path / "not-mounted"))
    with pytest.raises(StorageError) as info:
        storage.check()
    assert info.value.field == "spec.storage.path"
    assert str(info.value).startswith("spec.storage.path: NFS share ")
    assert "is not mounted here" in str(info.value)
    assert info.value.permanent is False  # a mount can come back: retry


def test_check_on_a_read_only_folder(tmp_path, monkeypatch):
    storage = NfsStorage(str(tmp_path))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(StorageError, match="spec.storage.path: NFS share .* is not writable"):
        storage.check()


def test_check_describes_the_share(nfs, share, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * 2**30, 0, 42 * 2**30))
    assert nfs.check() == f"NFS share nfs.local:{share} (42 GiB free)"
    assert NfsStorage(str(share)).check() == f"NFS share {share} (42 GiB free)"


# -- backend_for -----------------------------------------------------------------------------------------------------

def test_backend_for_nfs(share):
    backend = backend_for(StorageSpec(type="nfs", path=str(share), endpoint="nfs.local"))
    assert isinstance(backend, NfsStorage)
    assert (backend.root, backend.endpoint) == (share, "nfs.local")


def test_backend_for_s3_needs_its_secret():
    with pytest.raises(InvalidMigration) as info:
        backend_for(StorageSpec(type="s3", bucket="bucket", endpoint="https://x"))
    assert info.value.field == "spec.storage.credentialsSecretRef"


def test_backend_for_unknown_type():
    with pytest.raises(InvalidMigration) as info:
        backend_for(StorageSpec(type="ftp", endpoint="ftp://x"))
    assert info.value.field == "spec.storage.type"
    assert "storage type 'ftp' is not supported" in str(info.value)
