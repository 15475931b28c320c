"""include/compression.py: zstd for stored disks, decompressed in bounded memory."""

from __future__ import annotations

import resource

from include.compression import Compressor, decompress
from include.diskio import CHUNK, Segment


def test_decompression_memory_is_bounded_whatever_the_ratio():
    comp = Compressor()
    zeros = bytes(CHUNK)
    packed = b"".join(comp.compress(zeros) for _ in range(256)) + comp.flush()  # 1 GiB of zeros
    assert len(packed) < 1024 * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = 0
    for seg in decompress(iter([Segment(length=len(packed), data=packed)])):
        assert seg.length <= CHUNK
        total += seg.length
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert total == 256 * CHUNK
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"
