"""TLS verification settings of a storage backend, from its Secret (shared by S3 and HTTP)."""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import threading

from include.inventory import Credentials

log = logging.getLogger(__name__)

# CA bundles written by this process: sha256 of the bundle -> its file, all in one private directory
_lock = threading.Lock()
_ca_dir: tuple[int, str] | None = None  # (pid that made it, path)
_ca_files: dict[str, str] = {}


def tls_verify(credentials: Credentials | None, endpoint: str | None, what: str) -> bool | str:
    """True (system CAs), a CA bundle file from the Secret's ``caBundle``, or False when the Secret sets
    ``insecureSkipVerify`` (logged as a warning every time)."""
    if credentials is None:
        return True
    if (credentials.first("insecureSkipVerify") or "").lower() in ("true", "1", "yes"):
        log.warning("TLS verification is DISABLED for %s %s (Secret %s sets insecureSkipVerify)",
                    what, endpoint, credentials.source)
        return False
    bundle = credentials.first("caBundle", "ca.crt")
    if not bundle:
        return True
    return ca_bundle_file(bundle)


def ca_bundle_file(bundle: str) -> str:
    """A file holding ``bundle``, private to this process's user: 0600, in a 0700 directory made with
    :func:`tempfile.mkdtemp` (once per process, removed at exit).

    Written once per distinct bundle and reused while it is still the file this process wrote (same
    owner, mode and content). A file is never trusted because its name exists: a predictable path in
    a shared /tmp could have been made by another local user, with their CA in it.
    """
    data = bundle.encode()
    digest = hashlib.sha256(data).hexdigest()
    with _lock:
        path = _ca_files.get(digest)
        if path is not None and _is_ours(path, data):
            return path
        directory = _private_dir()
        fd, path = tempfile.mkstemp(prefix="ca-", suffix=".pem", dir=directory)  # O_EXCL, 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except BaseException:
            os.unlink(path)
            raise
        _ca_files[digest] = path
        return path


def _is_ours(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if (st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077 or not stat.S_ISREG(st.st_mode)
                or st.st_size != len(data)):
            return False
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read() == data
    finally:
        os.close(fd)


def _private_dir() -> str:
    global _ca_dir
    pid = os.getpid()
    if _ca_dir is not None and _ca_dir[0] == pid and os.path.isdir(_ca_dir[1]):
        return _ca_dir[1]
    if _ca_dir is not None and _ca_dir[0] == pid:
        _ca_files.clear()  # the directory went (a /tmp cleaner): its files with it
    path = tempfile.mkdtemp(prefix="vmmigration-ca-")  # 0700, a fresh unpredictable name
    _ca_dir = (pid, path)
    atexit.register(_remove_dir, pid, path)
    return path


def _remove_dir(pid: int, path: str) -> None:
    if os.getpid() == pid:  # not in a forked child: the parent still uses it
        shutil.rmtree(path, ignore_errors=True)
