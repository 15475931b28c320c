"""The byte path of a disk through intermediate storage, written once for every backend.

A disk is a stream of ``Segment``s: data, or a hole (a length with no bytes). On the way out
(``Encoder``) every logical byte is hashed once; holes are kept where the backend keeps them (a
sparse file on a share), else only the data extents are stored and the manifest says where they go;
with zstd the data is compressed as it passes. On the way back (``decode``) the stored object is
decompressed and its extents put back in place (the gaps as holes), and the sha256 of the logical
stream is checked against the manifest when the stream ends.

The manifest (``<key>.manifest.json``) is the one document that describes a stored disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from include.compression import Compressor, decompress
from include.diskio import Segment, fill_gaps, hash_segments
from include.errors import ChecksumError


@dataclass(frozen=True)
class Manifest:
    """What is stored under a key: the logical disk (size, sha256), how it is stored (extents,
    compression) and what it is (format, virtual size, the migration that wrote it)."""

    disk: str
    sha256: str
    size: int  # logical bytes, holes included: what the sha256 covers
    stored_bytes: int  # bytes actually written to the backend
    extents: tuple[tuple[int, int], ...] | None  # [offset, length] of the stored data; None: holes kept
    compression: str | None
    format: str
    virtual_size: int
    migration: str

    _KEYS = {"stored_bytes": "storedBytes", "virtual_size": "virtualSize"}

    def to_dict(self) -> dict[str, Any]:
        out = {self._KEYS.get(f.name, f.name): getattr(self, f.name) for f in dataclasses.fields(self)}
        out["extents"] = None if self.extents is None else [list(e) for e in self.extents]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, disk: str, where: str) -> Manifest:
        """The manifest of ``disk`` read beside ``where``; a ChecksumError when it lacks what verifying needs."""
        if not isinstance(data, Mapping) or not data.get("sha256") or not isinstance(data.get("size"), int):
            raise ChecksumError(f"disk {disk}: no manifest with a sha256 beside {where}")
        extents = data.get("extents")
        return cls(disk=str(data.get("disk", "")), sha256=str(data["sha256"]), size=int(data["size"]),
                   stored_bytes=int(data.get("storedBytes") or 0),
                   extents=None if extents is None else tuple((int(o), int(n)) for o, n in extents),
                   compression=data.get("compression"), format=str(data.get("format", "")),
                   virtual_size=int(data.get("virtualSize") or 0), migration=str(data.get("migration", "")))


class Encoder:
    """Turns a disk's logical segments into what a backend stores, hashing each byte once.

    ``encode`` yields the segments to write; afterwards ``manifest`` describes them."""

    def __init__(self, *, keep_holes: bool, compression: str | None) -> None:
        self.compressor = Compressor() if compression == "zstd" else None
        self.compression = compression if self.compressor is not None else None
        #: only a backend that keeps holes gets them, and never inside a compressed stream
        self.keep_holes = keep_holes and self.compressor is None
        self.hasher = hashlib.sha256()
        self.logical = 0  # bytes of the disk seen, holes included
        self.stored = 0  # bytes handed to the backend
        self._extents: list[list[int]] = []

    def encode(self, segments: Iterable[Segment]) -> Iterator[Segment]:
        for seg in hash_segments(segments, self.hasher):
            if seg.data is not None:
                if not self.keep_holes:
                    self._note_extent(seg.length)
                out = self.compressor.compress(seg.data) if self.compressor is not None else seg.data
                if out:
                    self.stored += len(out)
                    yield seg if out is seg.data else Segment(length=len(out), data=out)
            elif self.keep_holes:
                yield seg
            self.logical += seg.length
        if self.compressor is not None:
            tail = self.compressor.flush()
            if tail:
                self.stored += len(tail)
                yield Segment(length=len(tail), data=tail)

    def _note_extent(self, length: int) -> None:
        if self._extents and self._extents[-1][0] + self._extents[-1][1] == self.logical:
            self._extents[-1][1] += length
        else:
            self._extents.append([self.logical, length])

    @property
    def sha256(self) -> str:
        return self.hasher.hexdigest()

    def manifest(self, *, disk: str, fmt: str, virtual_size: int, migration: str) -> Manifest:
        return Manifest(disk=disk, sha256=self.sha256, size=self.logical, stored_bytes=self.stored,
                        extents=None if self.keep_holes else tuple((o, n) for o, n in self._extents),
                        compression=self.compression, format=fmt, virtual_size=virtual_size, migration=migration)


def inflate(stored: Iterable[Segment], extents: Iterable[tuple[int, int]], size: int) -> Iterator[Segment]:
    """Stored data extents back into the logical stream, the gaps between them as holes."""
    stream = iter(stored)
    pending = [memoryview(b"")]

    def take(offset: int, length: int) -> Iterator[Segment]:
        left = length
        while left:
            if not len(pending[0]):
                seg = next(stream, None)
                if seg is None or seg.data is None:
                    raise ChecksumError(f"stored object ends {left} bytes early (extent at {offset})")
                pending[0] = memoryview(seg.data)
            piece = pending[0][:left]  # a view: no copy of what is left
            pending[0] = pending[0][len(piece):]
            left -= len(piece)
            yield Segment(length=len(piece), data=piece)

    yield from fill_gaps(((offset, length, take(offset, length)) for offset, length in extents), size)


def decode(stored: Iterable[Segment], manifest: Manifest, *, where: str) -> Iterator[Segment]:
    """The logical segments of a stored object; raises ChecksumError at the end unless they hash to
    the manifest's sha256 (``where`` names the object in that error)."""
    stream: Iterable[Segment] = stored
    if manifest.compression == "zstd":
        stream = decompress(stream)
    if manifest.extents is not None:
        stream = inflate(stream, manifest.extents, manifest.size)
    hasher = hashlib.sha256()
    yield from hash_segments(stream, hasher)
    if hasher.hexdigest() != manifest.sha256:
        raise ChecksumError(f"{where} has sha256 {hasher.hexdigest()}, expected {manifest.sha256} "
                            f"(corrupted in storage)")
