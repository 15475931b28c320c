"""NFS storage: ``storage.path`` is the share's mount point on this host.

A disk is written under a temporary name in the same folder, fsynced and renamed when complete,
so a reader never sees half a disk under the final name. Its sha256 travels with it in a
``<key>.manifest.json`` written the same way. Holes are kept (written by seeking).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from include.diskio import Segment, file_segments
from include.errors import InvalidMigration, StorageError
from include.storage.base import ObjectWriter, StorageBackend

MANIFEST_SUFFIX = ".manifest.json"


class _FileWriter(ObjectWriter):
    """Writes ``.<name>.part`` and renames it into place on commit.

    An interrupted write leaves its part file (abort keeps it). The next writer of the same key compares
    what it is about to write with what the part already holds and skips what matches, so a retry
    rewrites only from the first difference (``reused`` counts the bytes it did not write again).
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.part")
        existing = self.tmp.exists()
        self.fh = open(self.tmp, "r+b" if existing else "wb")  # noqa: SIM115 - closed in commit/abort
        self.resumable = os.fstat(self.fh.fileno()).st_size if existing else 0
        self.length = 0
        self.reused = 0

    def _matches(self, segment: Segment) -> bool:
        """Whether the part already holds ``segment`` at the current offset (read back with pread)."""
        if self.length + segment.length > self.resumable:
            return False
        fd, pos = self.fh.fileno(), self.length
        left = segment.length
        view = memoryview(segment.data) if segment.data is not None else None
        while left:
            n = min(left, 8 * 1024 * 1024)
            have = os.pread(fd, n, pos)
            want = view[segment.length - left:segment.length - left + n] if view is not None else bytes(n)
            if have != want:
                return False
            pos += n
            left -= n
        return True

    def write(self, segment: Segment) -> None:
        if self.resumable:
            if self._matches(segment):
                self.length += segment.length
                self.reused += segment.length
                return
            self.fh.truncate(self.length)  # first difference: the rest is written anew
            self.resumable = 0
        self.fh.seek(self.length)
        if segment.data is not None:
            self.fh.write(segment.data)
        self.length += segment.length

    def commit(self) -> None:
        self.fh.truncate(self.length)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)

    def abort(self) -> None:
        # keep the part: the retry resumes from it; cleanup (deleteIntermediate) removes leftovers
        if not self.fh.closed:
            self.fh.flush()
            self.fh.close()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NfsStorage(StorageBackend):
    type = "nfs"
    supports_holes = True

    def __init__(self, path: str, endpoint: str | None = None) -> None:
        self.root = Path(path)
        self.endpoint = endpoint

    def _path(self, key: str) -> Path:
        resolved = (self.root / key).resolve()
        if self.root.resolve() not in resolved.parents:
            raise InvalidMigration(f"object key {key!r} escapes the share", field="spec.storage.path")
        return resolved

    def check(self) -> str:
        if not self.root.is_dir():
            raise StorageError(f"NFS share {self.root} is not mounted here (no such folder)",
                               field="spec.storage.path")
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"NFS share {self.root} is not writable", field="spec.storage.path")
        free = shutil.disk_usage(self.root).free
        where = f"{self.endpoint}:{self.root}" if self.endpoint else str(self.root)
        return f"NFS share {where} ({free // 2**30} GiB free)"

    def location(self, key: str) -> str:
        return str(self.root / key)

    def open_writer(self, key: str, size_hint: int) -> ObjectWriter:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if size_hint > free:
            raise StorageError(f"NFS share {self.root} has {free} bytes free, {size_hint} needed")
        return _FileWriter(path)

    def read(self, key: str) -> Iterator[Segment]:
        path = self._path(key)
        if not path.exists():
            raise StorageError(f"{path} is missing from the share")
        return file_segments(path)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def delete(self, key: str) -> bool:
        removed = False
        final = self._path(key)
        for path in (final, self._path(key + MANIFEST_SUFFIX), final.with_name(f".{final.name}.part")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed = True
        return removed

    def delete_prefix(self, prefix: str) -> int:
        folder = self._path(prefix)
        if not folder.is_dir():
            return 0
        count = sum(1 for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder)
        # drop now-empty parents up to the share root
        parent = folder.parent
        while parent != self.root.resolve() and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
        return count

    def put_manifest(self, key: str, manifest: dict[str, Any]) -> None:
        data = json.dumps(manifest, indent=2).encode()
        writer = _FileWriter(self._path(key + MANIFEST_SUFFIX))
        try:
            writer.write(Segment(length=len(data), data=data))
            writer.commit()
        except BaseException:
            writer.abort()
            writer.tmp.unlink(missing_ok=True)  # a manifest is rewritten whole, never resumed
            raise

    def get_manifest(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key + MANIFEST_SUFFIX).read_text())
        except FileNotFoundError:
            return None
