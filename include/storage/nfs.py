"""NFS storage: ``storage.path`` is the share's mount point on this host.

A disk is written under a temporary name in the same folder, fsynced and renamed when complete,
so a reader never sees half a disk under the final name. Its sha256 travels with it in a
``<key>.manifest.json`` written the same way. Holes are kept (written by seeking).

Other users may write to the share too, so nothing below the share root is reached through a path
string: folders are opened one component at a time without following symlinks, files are opened
``O_NOFOLLOW`` relative to their verified folder (:mod:`include.safefs`), folders are made 0700 and
files 0600. ``storage.path`` itself must lie under one of the allowed roots
(``VMMIGRATION_ALLOWED_ROOTS``), never ``/`` or a system folder. The backend deletes only keys it is
given (the migration's ledger decides which) and removes folders only when empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from include import safefs
from include.diskio import Segment, file_segments
from include.errors import InvalidMigration, StorageError
from include.storage.base import MANIFEST_SUFFIX, ObjectWriter, StorageBackend

ROOTS_ENV = "VMMIGRATION_ALLOWED_ROOTS"
#: never a share, whatever the allowed roots say: the folder itself or anything below it
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root", "/run",
                 "/sbin", "/sys", "/usr", "/var/lib/libvirt", "/var/lib/dpkg", "/var/lib/apt", "/var/log",
                 "/var/spool", "/var/run", "/var/cache")
#: never a share themselves (folders below them may be)
_SYSTEM_FOLDERS = ("/", "/home", "/mnt", "/media", "/opt", "/srv", "/tmp", "/var", "/var/lib", "/var/tmp")


def allowed_roots() -> list[Path]:
    raw = os.environ.get(ROOTS_ENV, "")
    return [Path(os.path.realpath(p)) for p in raw.split(os.pathsep) if p.strip()]


def check_share_path(path: str) -> Path:
    """``storage.path`` resolved, if it lies under an allowed root and is no system folder.

    :raises InvalidMigration: naming ``spec.storage.path``.
    """
    field = "spec.storage.path"
    if not path or not os.path.isabs(path):
        raise InvalidMigration(f"{path!r} must be an absolute path", field=field)
    real = Path(os.path.realpath(path))
    text = str(real)
    for tree in _SYSTEM_TREES:
        if text == tree or text.startswith(tree + "/"):
            raise InvalidMigration(f"{path} is (or is inside) the system folder {tree}; it cannot be a share",
                                   field=field)
    if text in _SYSTEM_FOLDERS:
        raise InvalidMigration(f"{path} is a system folder; use a folder below it made for migrations", field=field)
    roots = allowed_roots()
    if not roots:
        raise InvalidMigration(f"{path} is not allowed: no storage roots are configured (set {ROOTS_ENV} to the "
                               f"folders that NFS shares are mounted under)", field=field)
    if not any(real == root or root in real.parents for root in roots):
        raise InvalidMigration(f"{path} is outside the allowed storage roots ({', '.join(map(str, roots))}; "
                               f"{ROOTS_ENV})", field=field)
    return real


class _FileWriter(ObjectWriter):
    """Writes ``.<name>.part`` and renames it into place on commit.

    An interrupted write leaves its part file (abort keeps it). The next writer of the same key compares
    what it is about to write with what the part already holds and skips what matches, so a retry
    rewrites only from the first difference (``reused`` counts the bytes it did not write again).
    A full share removes the part at once and fails naming the path.
    """

    def __init__(self, dir_fd: int, name: str, where: Path, trusted: set[int] | None = None) -> None:
        self.dir_fd = os.dup(dir_fd)
        self.name = name
        self.tmp = f".{name}.part"
        self.where = where
        try:
            fd = safefs.open_file(self.dir_fd, self.tmp, os.O_RDWR, trusted=trusted)
            existing = True
        except FileNotFoundError:
            fd = safefs.open_file(self.dir_fd, self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            existing = False
        except OSError as err:
            os.close(self.dir_fd)
            if err.errno == errno.ELOOP:
                raise StorageError(f"{where / self.tmp} is a symlink; refusing to write through it") from err
            raise
        self.fh = os.fdopen(fd, "r+b")
        self.resumable = os.fstat(fd).st_size if existing else 0
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
        try:
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
        except OSError as err:
            self._full(err)
            raise

    def _full(self, err: OSError) -> None:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            self.discard()
            raise StorageError(f"no space left on the share writing {self.where / self.name} "
                               f"({self.length} bytes written); the partial file was removed") from err

    def commit(self) -> None:
        try:
            self.fh.truncate(self.length)
            self.fh.flush()
            os.fsync(self.fh.fileno())
        except OSError as err:
            self._full(err)
            raise
        self.fh.close()
        os.rename(self.tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)
        os.close(self.dir_fd)

    def abort(self) -> None:
        # keep the part: the retry resumes from it; cleanup (deleteIntermediate) removes leftovers
        if not self.fh.closed:
            with contextlib.suppress(OSError):
                self.fh.flush()
            self.fh.close()
            os.close(self.dir_fd)

    def discard(self) -> None:
        """Close and remove the part file."""
        if not self.fh.closed:
            with contextlib.suppress(OSError):
                self.fh.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp, dir_fd=self.dir_fd)
            os.close(self.dir_fd)


class NfsStorage(StorageBackend):
    type = "nfs"
    supports_holes = True

    def __init__(self, path: str, endpoint: str | None = None) -> None:
        self.path = path
        self.root = Path(path)
        self.endpoint = endpoint
        self._walker: safefs.Walker | None = None

    @property
    def walker(self) -> safefs.Walker:
        if self._walker is None:
            self._walker = safefs.Walker(check_share_path(self.path))
        return self._walker

    @property
    def created_dirs(self) -> list[str]:
        """Folders (keys) this backend made on the share, in the order it made them."""
        return list(self._walker.created) if self._walker else []

    def check(self) -> str:
        real = check_share_path(self.path)
        if not real.is_dir():
            raise StorageError(f"NFS share {self.root} is not mounted here (no such folder)",
                               field="spec.storage.path")
        if not os.access(real, os.W_OK):
            raise StorageError(f"NFS share {self.root} is not writable", field="spec.storage.path")
        free = shutil.disk_usage(real).free
        where = f"{self.endpoint}:{self.root}" if self.endpoint else str(self.root)
        return f"NFS share {where} ({free // 2**30} GiB free)"

    def location(self, key: str) -> str:
        return str(self.root / key)

    def open_writer(self, key: str, size_hint: int) -> ObjectWriter:
        with self.walker.parent(key, create=True) as (fd, name):
            vfs = os.fstatvfs(fd)
            free = vfs.f_bavail * vfs.f_frsize
            if size_hint > free:
                raise StorageError(f"no space on the share for {self.location(key)}: {free} bytes free, "
                                   f"{size_hint} needed")
            return _FileWriter(fd, name, Path(self.location(key)).parent, self.walker.trusted)

    def _open(self, key: str) -> int:
        try:
            with self.walker.parent(key) as (fd, name):
                return safefs.open_file(fd, name, os.O_RDONLY, trusted=self.walker.trusted)
        except FileNotFoundError:
            raise StorageError(f"{self.location(key)} is missing from the share") from None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise StorageError(f"{self.location(key)} is a symlink; refusing to read through it") from err
            raise

    def read(self, key: str) -> Iterator[Segment]:
        fd = self._open(key)

        def segments() -> Iterator[Segment]:
            try:
                yield from file_segments(f"/proc/self/fd/{fd}")  # the very file opened above
            finally:
                os.close(fd)

        return segments()

    def local_path(self, key: str) -> Path | None:
        os.close(self._open(key))  # checked: a plain file of ours, reached without a symlink
        return Path(os.path.realpath(self.root)) / key

    def _stat(self, key: str) -> os.stat_result | None:
        try:
            with self.walker.parent(key) as (fd, name):
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self._stat(key) is not None

    def size(self, key: str) -> int:
        st = self._stat(key)
        if st is None:
            raise StorageError(f"{self.location(key)} is missing from the share")
        return st.st_size

    def delete(self, key: str) -> bool:
        removed = False
        try:
            with self.walker.parent(key) as (fd, name):
                for item in (name, name + MANIFEST_SUFFIX, f".{name}.part", f".{name}{MANIFEST_SUFFIX}.part"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(item, dir_fd=fd)
                        removed = True
        except FileNotFoundError:
            return False
        return removed

    def remove_empty_dir(self, key: str) -> bool:
        try:
            with self.walker.parent(key) as (fd, name):
                os.rmdir(name, dir_fd=fd)
                return True
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                return False
            raise

    def put_document(self, key: str, data: bytes) -> None:
        with self.walker.parent(key, create=True) as (fd, name):
            writer = _FileWriter(fd, name, Path(self.location(key)).parent, self.walker.trusted)
        try:
            writer.write(Segment(length=len(data), data=data))
            writer.commit()
        except BaseException:
            writer.discard()  # a document is rewritten whole, never resumed
            raise

    def get_document(self, key: str) -> bytes | None:
        try:
            fd = self._open(key)
        except StorageError:
            if not self.exists(key):
                return None
            raise
        with os.fdopen(fd, "rb") as fh:
            return fh.read()


def from_spec(storage, credentials=None) -> NfsStorage:
    """The backend of a spec's ``storage`` block of type nfs (no credentials: the share is mounted)."""
    return NfsStorage(storage.path or "", storage.endpoint)
