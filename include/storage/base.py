"""What every intermediate storage backend offers: objects written atomically, read back as
segments, each disk's sha256 kept in a manifest beside it."""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from include.diskio import Segment
from include.errors import StorageError

#: the suffix of the manifest object written beside each disk object
MANIFEST_SUFFIX = ".manifest.json"


class ObjectWriter(abc.ABC):
    """Receives a disk's bytes; nothing is visible under the final key until ``commit``."""

    @abc.abstractmethod
    def write(self, segment: Segment) -> None: ...

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class StorageBackend(abc.ABC):
    """Intermediate storage (S3, HTTP, NFS) addressed by keys like ``<ns>/<name>/<disk>.qcow2``."""

    type: str = ""
    #: whether objects keep holes (a sparse file on a share); otherwise only data extents are stored
    #: and the manifest records where they go
    supports_holes: bool = False

    @abc.abstractmethod
    def check(self) -> str:
        """Verify reachability and credentials; return a description. Raises StorageAuthError/StorageError."""

    @abc.abstractmethod
    def location(self, key: str) -> str:
        """Where ``key`` lives, for people (a path or a URL)."""

    @abc.abstractmethod
    def open_writer(self, key: str, size_hint: int) -> ObjectWriter: ...

    @abc.abstractmethod
    def read(self, key: str) -> Iterator[Segment]: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int: ...

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Delete the object ``key``, its manifest and any partial upload of it; only ever called for
        keys the migration's ledger records as written by it."""

    def put_manifest(self, key: str, manifest: dict[str, Any]) -> None:
        """Write the manifest of ``key`` beside it (replacing one there)."""
        self.put_document(key + MANIFEST_SUFFIX, json.dumps(manifest, indent=2).encode())

    def get_manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of ``key``, or None when there is none; a StorageError when it is not JSON."""
        data = self.get_document(key + MANIFEST_SUFFIX)
        if data is None:
            return None
        try:
            manifest = json.loads(data)
        except ValueError as err:
            raise StorageError(f"the manifest of {self.location(key)} is not JSON ({err})") from err
        return manifest if isinstance(manifest, dict) else None

    @abc.abstractmethod
    def put_document(self, key: str, data: bytes) -> None:
        """Write a small object (a manifest) whole, atomically."""

    @abc.abstractmethod
    def get_document(self, key: str) -> bytes | None:
        """A small object's bytes, or None when it does not exist."""

    def local_path(self, key: str) -> Path | None:
        """A local file holding ``key`` when the backend is a mounted filesystem (lets qemu-img read it
        in place instead of through a staging copy); None otherwise."""
        return None

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections and worker threads."""

    @property
    def created_dirs(self) -> list[str]:
        """Folders (keys) the backend made while writing, for the ledger; none where there are no folders."""
        return []

    def remove_empty_dir(self, key: str) -> bool:
        """Remove the folder ``key`` if the backend has folders and it is empty (never its content)."""
        return False
