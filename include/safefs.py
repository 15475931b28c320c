"""Files and folders other local users cannot touch: private staging, and no symlink ever followed.

The engine runs as a privileged user (root in the demo; the libvirt socket's owner in docker-compose)
on hosts where other users may write to ``/tmp`` or to the NFS share. So:

* staging lives in a folder made by :func:`tempfile.mkdtemp` (an unpredictable name, mode 0700)
  inside a base that another user cannot rename things in (:func:`ensure_base`);
* files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600 (:func:`create_private`);
* a staged file is trusted only while it is a regular file, owned by us, with one link, in a
  private folder (:func:`check_private_file`); its sha256 is checked again before it is used;
* folders on a share are walked one component at a time with ``openat``-style calls and
  ``O_NOFOLLOW`` (:func:`walk`), so a symlink planted anywhere below the share root is refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from include.errors import InvalidMigration, StorageError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _trusted_owner(st: os.stat_result, trusted: set[int] | None = None) -> bool:
    return st.st_uid in (os.geteuid(), 0) or st.st_uid in (trusted or ())


def is_private_dir(path: Path) -> bool:
    """A real folder (not a symlink), owned by us, that nobody else can read or write."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def ensure_base(base: Path) -> None:
    """Make sure staging folders can be made safely inside ``base``: created 0700 if missing; if it
    exists it must be a real folder owned by us or root, and not writable by others unless sticky
    (like ``/tmp``, where nobody can rename or delete another user's folder)."""
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
    except OSError as err:
        raise InvalidMigration(f"staging folder {base} cannot be created: {err.strerror}") from err
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidMigration(f"staging folder {base} is not a folder (a symlink?); refusing to use it")
    if not _trusted_owner(st):
        raise InvalidMigration(f"staging folder {base} belongs to uid {st.st_uid}, not to this engine; refusing "
                               f"to stage disks where another user controls the folder")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise InvalidMigration(f"staging folder {base} is writable by other users and not sticky; refusing to "
                               f"use it")


@contextlib.contextmanager
def create_private(path: Path) -> Iterator[BinaryIO]:
    """A new file, 0600, never through a symlink; a leftover of ours from an interrupted try is replaced."""
    check_parent(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # inside our private folder: only ever ours
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        yield fh


def check_parent(path: Path) -> None:
    if not is_private_dir(path.parent):
        raise InvalidMigration(f"{path.parent} is not a private staging folder of this engine; refusing to write "
                               f"{path.name} there")


def check_private_file(path: Path) -> None:
    """Refuse a staged file that is not what the engine itself left there."""
    check_parent(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise InvalidMigration(f"staged file {path} is missing; run the phase that made it again") from None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        raise InvalidMigration(f"staged file {path} is not a plain file of this engine (a symlink, a hard link or "
                               f"another owner); refusing to use it")


def split_key(key: str) -> list[str]:
    """An object key's path components; ``..``, ``.``, empty parts and NULs are refused."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise InvalidMigration(f"object key {key!r} is not a plain relative path", field="spec.storage.path")
    return parts


class Walker:
    """Folders below one root, opened component by component without following symlinks.

    :param root: the share's mount point (itself may be reached through symlinks: an operator's choice)
    :param created: folders (relative keys) this walker made, appended as it makes them
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.created: list[str] = []
        #: owners besides us and root that count as ours: the owner our own mkdir produced (an NFS export
        #: with root_squash maps the engine's root to another uid)
        self.trusted: set[int] = set()

    def open_root(self) -> int:
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise StorageError(f"NFS share {self.root} cannot be opened: {err.strerror}",
                               field="spec.storage.path") from err

    def open_dir(self, parts: list[str], *, create: bool) -> int:
        """A descriptor of the folder ``root/parts...``; made (0700) when ``create`` and missing."""
        fd = self.open_root()
        try:
            for i, part in enumerate(parts):
                made = False
                if create:
                    try:
                        os.mkdir(part, 0o700, dir_fd=fd)
                        self.created.append("/".join(parts[:i + 1]))
                        made = True
                    except FileExistsError:
                        pass
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as err:
                    where = self.root.joinpath(*parts[:i + 1])
                    if err.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise StorageError(f"{where} is a symlink or not a folder; refusing to follow it",
                                           field="spec.storage.path") from err
                    raise
                os.close(fd)
                fd = nfd
                st = os.fstat(fd)
                if made:
                    self.trusted.add(st.st_uid)
                if not _trusted_owner(st, self.trusted) or st.st_mode & 0o022:
                    raise StorageError(f"{self.root.joinpath(*parts[:i + 1])} belongs to uid {st.st_uid} or is "
                                       f"writable by others; refusing to write below it", field="spec.storage.path")
            return fd
        except BaseException:
            os.close(fd)
            raise

    @contextlib.contextmanager
    def parent(self, key: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
        """(descriptor of the key's folder, the key's last component)."""
        parts = split_key(key)
        fd = self.open_dir(parts[:-1], create=create)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)


def open_file(dir_fd: int, name: str, flags: int, mode: int = 0o600, *, trusted: set[int] | None = None) -> int:
    """``openat`` without following a symlink; a file that is not ours (owner, links) is refused."""
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    st = os.fstat(fd)
    made = flags & os.O_CREAT and flags & os.O_EXCL  # just created by us, whatever uid the share gave it
    if not stat.S_ISREG(st.st_mode) or not (made or _trusted_owner(st, trusted)) or st.st_nlink > 1:
        os.close(fd)
        raise StorageError(f"{name} is not a plain file of this engine (another owner or a hard link); refusing "
                           f"to use it")
    return fd
