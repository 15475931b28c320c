"""Reading a qcow2 image as it was at one of its internal snapshots, from any random-access file (an SFTP file on
a Proxmox VE node, a local file), as guest data: allocated clusters read, the rest holes.

A Proxmox VE snapshot of a qcow2 disk on a file storage is an internal qcow2 snapshot. ``qemu-img convert -l``
reads one, but only into a regular file (it resizes its target), so it cannot stream; this reads the snapshot's
own L1 and L2 tables instead, over the same SSH connection that carries the bytes, without a temporary copy. It
is safe while the VM runs and writes: QEMU never rewrites a cluster a snapshot still references (its refcount is
above one, so a write copies it), and a snapshot's tables do not change while it exists.

Covered: qcow2 version 2 and 3, any cluster size, zero clusters, zlib-compressed clusters. Refused, with the
reason: encryption, an external data file, extended L2 entries (subclusters), zstd compression, a backing file
(an overlay's snapshot is only part of the disk), an image marked corrupt.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from include.diskio import Segment

MAGIC = b"QFI\xfb"
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COMPRESSED = 1 << 62
ZERO_FLAG = 1
#: incompatible feature bits (qcow2 version 3)
CORRUPT, EXTERNAL_DATA, COMPRESSION_TYPE, EXTENDED_L2 = 1 << 1, 1 << 2, 1 << 3, 1 << 4
#: the largest read asked of the file at once (contiguous host clusters are read together up to this)
MAX_RUN = 4 * 1024 * 1024
#: the granularity at which all-zero data (preallocated clusters) is found and sent as a hole
ZERO_PIECE = 1024 * 1024
#: QEMU's own limit on an L1 table (32 MiB of entries)
MAX_L1 = 32 * 1024 * 1024 // 8


class Qcow2Error(ValueError):
    """Not a qcow2 image this reader can read at a snapshot (the message says why)."""


class RandomAccess(Protocol):
    def seek(self, offset: int, whence: int = 0) -> int: ...

    def read(self, size: int = -1) -> bytes: ...


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    l1_offset: int
    l1_size: int
    disk_size: int | None


@dataclass(frozen=True)
class Image:
    cluster_bits: int
    size: int
    snapshots: tuple[Snapshot, ...]

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def _pread(fh: RandomAccess, offset: int, length: int, *, short_ok: bool = False) -> bytes:
    """``length`` bytes at ``offset``; fewer only with ``short_ok`` (a compressed cluster's sector count may
    reach past the end of the file, which QEMU tolerates)."""
    fh.seek(offset)
    out = bytearray()
    while len(out) < length:
        chunk = fh.read(length - len(out))
        if not chunk:
            if short_ok:
                break
            raise Qcow2Error(f"the image ends at {offset + len(out)}, inside a structure it points to")
        out += chunk
    return bytes(out)


def read_header(fh: RandomAccess) -> Image:
    head = _pread(fh, 0, 72)
    if head[:4] != MAGIC:
        raise Qcow2Error("not a qcow2 image")
    version, backing_offset, _backing_size, cluster_bits, size, crypt, _l1, _l1_off, _rt, _rtc, nb_snaps, \
        snaps_offset = struct.unpack(">IQIIQIIQQIIQ", head[4:72])
    if version not in (2, 3):
        raise Qcow2Error(f"qcow2 version {version} is not read here")
    if not 9 <= cluster_bits <= 21:
        raise Qcow2Error(f"a cluster size of 2^{cluster_bits} is not valid")
    if crypt:
        raise Qcow2Error("the image is encrypted")
    if backing_offset:
        raise Qcow2Error("the image has a backing file: its snapshot holds only what differs from it")
    if version == 3:
        incompatible, = struct.unpack(">Q", _pread(fh, 72, 8))
        if incompatible & CORRUPT:
            raise Qcow2Error("the image is marked corrupt (run qemu-img check -r)")
        if incompatible & EXTERNAL_DATA:
            raise Qcow2Error("the image keeps its data in an external data file")
        if incompatible & EXTENDED_L2:
            raise Qcow2Error("the image has extended L2 entries (subclusters)")
        if incompatible & COMPRESSION_TYPE:
            raise Qcow2Error("the image's compressed clusters are zstd, not zlib")
    return Image(cluster_bits=cluster_bits, size=size, snapshots=tuple(_snapshots(fh, snaps_offset, nb_snaps)))


def _snapshots(fh: RandomAccess, offset: int, count: int) -> Iterator[Snapshot]:
    for _ in range(count):
        l1_offset, l1_size, id_size, name_size, _s, _ns, _clock, _vmstate, extra_size = struct.unpack(
            ">QIHHIIQII", _pread(fh, offset, 40))
        extra = _pread(fh, offset + 40, extra_size) if extra_size else b""
        disk_size = struct.unpack(">Q", extra[8:16])[0] if len(extra) >= 16 else None
        strings = _pread(fh, offset + 40 + extra_size, id_size + name_size)
        yield Snapshot(id=strings[:id_size].decode(errors="replace"),
                       name=strings[id_size:].decode(errors="replace"), l1_offset=l1_offset, l1_size=l1_size,
                       disk_size=disk_size)
        entry = 40 + extra_size + id_size + name_size
        offset += (entry + 7) & ~7


def snapshot_size(image: Image, snap: Snapshot) -> int:
    """The disk's virtual size at the snapshot (recorded with it since QEMU 1.x; else the image's)."""
    return snap.disk_size if snap.disk_size is not None else image.size


def find_snapshot(image: Image, name: str) -> Snapshot:
    for snap in image.snapshots:
        if snap.name == name:
            return snap
    raise Qcow2Error(f"the image has no internal snapshot {name!r} "
                     f"(it has {', '.join(repr(s.name) for s in image.snapshots) or 'none'})")


def _data_or_hole(data: bytes | memoryview) -> Segment:
    """Clusters that hold only zeros (PVE's ``preallocation=metadata`` allocates every one) travel as a hole."""
    if bytes(data).count(0) == len(data):
        return Segment(length=len(data))
    return Segment(length=len(data), data=data)


def _inflate(raw: bytes, cluster_size: int) -> bytes:
    data = zlib.decompressobj(-15).decompress(raw, cluster_size)
    if len(data) != cluster_size:
        raise Qcow2Error(f"a compressed cluster inflated to {len(data)} bytes, not {cluster_size}")
    return data


def _clusters(fh: RandomAccess, image: Image, snap: Snapshot) -> Iterator[tuple[int, int]]:
    """(guest cluster index, its L2 entry) for every allocated or zero cluster of the snapshot, in guest order."""
    per_l2 = image.cluster_size // 8
    if snap.l1_size > MAX_L1:
        raise Qcow2Error(f"snapshot {snap.name!r} has an L1 table of {snap.l1_size} entries (QEMU's limit is "
                         f"{MAX_L1})")
    l1 = struct.unpack(f">{snap.l1_size}Q", _pread(fh, snap.l1_offset, 8 * snap.l1_size)) if snap.l1_size else ()
    for l1_index, l1_entry in enumerate(l1):
        l2_offset = l1_entry & OFFSET_MASK
        if not l2_offset:
            continue
        for l2_index, entry in enumerate(struct.unpack(f">{per_l2}Q", _pread(fh, l2_offset, image.cluster_size))):
            if entry & ~(1 << 63):
                yield l1_index * per_l2 + l2_index, entry


def segments(fh: RandomAccess, snapshot: str, *, image: Image | None = None) -> Iterator[Segment]:
    """The guest data of ``snapshot``: allocated clusters as data (contiguous host clusters read together), zero and
    unallocated clusters as holes; as long as the disk was at the snapshot."""
    image = image or read_header(fh)
    snap = find_snapshot(image, snapshot)
    size = snapshot_size(image, snap)
    cs, bits = image.cluster_size, image.cluster_bits
    pos = 0  # guest offset reached
    run_guest = run_host = run_len = 0  # a run of standard clusters contiguous in guest and host

    def flush() -> Iterator[Segment]:
        nonlocal run_len, pos
        if run_len:
            length = min(run_len, size - run_guest)
            data = memoryview(_pread(fh, run_host, length))
            piece = max(cs, ZERO_PIECE)  # zeros found per MiB (or per cluster, when clusters are larger)
            for at in range(0, length, piece):
                yield _data_or_hole(data[at:at + piece])
            pos = run_guest + length
            run_len = 0

    for index, entry in _clusters(fh, image, snap):
        guest = index * cs
        if guest >= size:
            break
        if entry & COMPRESSED:
            shift = 62 - (bits - 8)
            host = entry & ((1 << shift) - 1)
            sectors = ((entry >> shift) & ((1 << (bits - 8)) - 1)) + 1
            kind, host_end = "compressed", host + sectors * 512 - (host & 511)
        elif entry & ZERO_FLAG:  # reads as zeros, whether a cluster stays allocated for it or not
            kind = "zero"
        else:
            kind, host = "data", entry & OFFSET_MASK
        if kind == "data" and run_len and guest == run_guest + run_len and host == run_host + run_len \
                and run_len < MAX_RUN:
            run_len += cs
            continue
        yield from flush()
        if kind == "zero":
            continue
        if guest > pos:
            yield Segment(length=guest - pos)
            pos = guest
        if kind == "compressed":
            data = _inflate(_pread(fh, host, host_end - host, short_ok=True), cs)[: size - guest]
            yield _data_or_hole(data)
            pos = guest + len(data)
        else:
            run_guest, run_host, run_len = guest, host, cs
    yield from flush()
    if size > pos:
        yield Segment(length=size - pos)
