"""Opt-in compression of disk data in transit (the guide's "enable compression if bandwidth-limited").

A migration opts in with the annotation ``vmmigration.virtrigaud.io/compression: zstd``. Only data
bytes are compressed (holes are already left out by the extent map); the sha256 always covers the
uncompressed disk, so verification does not depend on the codec.
"""

from __future__ import annotations

from collections.abc import Iterator

from include.diskio import CHUNK, Segment
from include.errors import InvalidMigration

ANNOTATION = "vmmigration.virtrigaud.io/compression"
CODECS = ("none", "zstd")


def codec_from(annotations: dict[str, str]) -> str | None:
    value = (annotations.get(ANNOTATION) or "none").strip().lower()
    if value not in CODECS:
        raise InvalidMigration(f"{value!r} is not a compression codec (use one of {', '.join(CODECS)})",
                               field=f"metadata.annotations[{ANNOTATION}]")
    return None if value == "none" else value


class Compressor:
    """Streaming zstd: feed data, get compressed bytes back (possibly empty until a frame fills)."""

    def __init__(self, level: int = 3) -> None:
        import zstandard

        self._obj = zstandard.ZstdCompressor(level=level, threads=-1).compressobj()

    def compress(self, data: bytes | memoryview) -> bytes:
        return self._obj.compress(bytes(data))

    def flush(self) -> bytes:
        return self._obj.flush()


class _SegmentReader:
    """A file-like ``read`` over stored segments, for the streaming decompressor."""

    def __init__(self, segments: Iterator[Segment]) -> None:
        self._segments = iter(segments)
        self._pending = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        while not len(self._pending):
            seg = next(self._segments, None)
            if seg is None:
                return b""
            if seg.data is None:
                raise ValueError("a compressed object has no holes")
            self._pending = memoryview(seg.data)
        n = len(self._pending) if size is None or size < 0 else min(size, len(self._pending))
        out, self._pending = self._pending[:n].tobytes(), self._pending[n:]
        return out


def decompress(segments: Iterator[Segment]) -> Iterator[Segment]:
    """Decompressed data in pieces of at most CHUNK bytes, whatever the compression ratio (a zeroed
    disk compresses thousands of times: memory never holds more than one piece)."""
    import zstandard

    reader = _SegmentReader(segments)
    for piece in zstandard.ZstdDecompressor().read_to_iter(reader, read_size=CHUNK, write_size=CHUNK):
        yield Segment(length=len(piece), data=piece)
