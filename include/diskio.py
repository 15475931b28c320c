"""Disk I/O: streaming copies with one-pass sha256 and progress, sparse files, and qemu-img.

Memory stays bounded by the chunk size whatever the disk size. A stream is a sequence of
``Segment``: data bytes, or a hole of N zero bytes that is never materialised (holes are hashed
as zeros from a shared buffer and written by seeking, so sparse disks stay sparse).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024
_ZEROS = bytes(CHUNK)


class QemuImgError(RuntimeError):
    """qemu-img failed; the message carries its stderr."""


@dataclass(frozen=True)
class Segment:
    """A run of a stream: ``data`` bytes, or (``data is None``) a hole of ``length`` zero bytes."""

    length: int
    data: bytes | memoryview | None = None


class ProgressTracker:
    """Bytes done / total with rate and ETA; reports through ``callback`` at most every ``percent_step``
    percent or ``interval`` seconds (whichever comes first), plus once at the end.

    What is counted is the data that really moves: a disk's holes cost nothing to skip, so counting them would
    make the rate climb and the ETA lie. ``total`` is the data expected (a disk's allocated bytes, an estimate
    that grows, up to the rest of the virtual size, if more data comes); ``virtual`` is the disk's virtual size,
    shown beside it; ``position`` is how far into the virtual size the stream has got (holes included).
    :meth:`add_segment` counts a segment."""

    def __init__(self, total: int, callback: Callable[[int, int, float, float | None], None] | None = None,
                 *, interval: float = 10.0, percent_step: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 virtual: int | None = None):
        self.total = max(int(total), 0)
        self.virtual = max(int(virtual), 0) if virtual is not None else None
        self.done = 0
        self.position = 0
        self.callback = callback
        self.interval = interval
        self.percent_step = percent_step
        self.clock = clock
        self.started = clock()
        self._last_time = self.started
        self._last_done = 0

    @property
    def rate(self) -> float:
        elapsed = self.clock() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.rate
        if rate <= 0 or self.total <= 0:
            return None
        return max(self.total - self.done, 0) / rate

    def add(self, n: int) -> None:
        """``n`` more bytes of data moved."""
        self.done += n
        self.position += n
        if self.done > self.total:
            # the estimate was low (a qcow2 overlay whose backing file's data comes along too): what is left is at
            # most the rest of the virtual size, so the disk does not sit at "100%, ETA 0" while data still comes
            rest = self.virtual - self.position if self.virtual is not None else 0
            self.total = self.done + max(rest, 0)
        now = self.clock()
        step = self.total * self.percent_step / 100.0 if self.total else 0
        if (now - self._last_time >= self.interval) or (step and self.done - self._last_done >= step):
            self._emit(now)

    def add_segment(self, seg: Segment) -> None:
        """Count one segment of a disk stream: its data moved, a hole only advances the position."""
        if seg.data is None:
            self.position += seg.length
            return
        self.add(seg.length)

    def finish(self) -> None:
        """The end of the stream: the data counted is all there was."""
        self.total = self.done
        self._emit(self.clock())

    def _emit(self, now: float) -> None:
        self._last_time = now
        self._last_done = self.done
        if self.callback is not None:
            self.callback(self.done, self.total, self.rate, self.eta)


def format_progress(done: int, total: int, rate: float, eta: float | None, *, virtual: int | None = None) -> str:
    """``45.0% 450/1,000 MiB of data (10,240 MiB virtual) at 95.1 MiB/s, ETA 6s``."""
    percent = done * 100.0 / total if total else 100.0
    eta_text = f"{eta:.0f}s" if eta is not None else "?"
    beside = f" ({virtual / 2**20:,.0f} MiB virtual)" if virtual is not None else ""
    return (f"{percent:5.1f}% {done / 2**20:,.0f}/{total / 2**20:,.0f} MiB of data{beside} "
            f"at {rate / 2**20:,.1f} MiB/s, ETA {eta_text}")


def hash_segments(segments: Iterable[Segment], hasher: Any) -> Iterator[Segment]:
    """Pass segments through, feeding every logical byte (holes as zeros) to ``hasher`` once."""
    for seg in segments:
        if seg.data is None:
            left = seg.length
            while left:
                n = min(left, CHUNK)
                hasher.update(_ZEROS[:n] if n != CHUNK else _ZEROS)
                left -= n
        else:
            hasher.update(seg.data)
        yield seg


def prefetched(segments: Iterable[Segment], depth: int = 4) -> Iterator[Segment]:
    """Read ahead in a thread: the producer (a disk or a socket) works while the consumer hashes and
    writes. At most ``depth`` segments wait in between, so memory stays bounded (depth x chunk)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for seg in segments:
                while not stop.is_set():
                    try:
                        q.put(seg, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            q.put(err)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def file_segments(path: str | os.PathLike[str], *, chunk: int = CHUNK, sparse: bool = True) -> Iterator[Segment]:
    """Read a file as segments, reporting its holes (SEEK_DATA/SEEK_HOLE) instead of reading zeros."""
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        pos = 0
        while pos < size:
            if sparse:
                try:
                    data_at = os.lseek(fh.fileno(), pos, os.SEEK_DATA)
                except OSError:  # ENXIO: only a hole is left
                    data_at = size
                if data_at > pos:
                    yield Segment(length=data_at - pos)
                    pos = data_at
                    continue
                hole_at = os.lseek(fh.fileno(), pos, os.SEEK_HOLE)
            else:
                hole_at = size
            os.lseek(fh.fileno(), pos, os.SEEK_SET)
            while pos < hole_at:
                buf = fh.read(min(chunk, hole_at - pos))
                if not buf:
                    raise OSError(f"{path}: file shrank while being read at offset {pos}")
                pos += len(buf)
                yield Segment(length=len(buf), data=buf)


def write_segments(segments: Iterable[Segment], fh: BinaryIO, progress: ProgressTracker | None = None) -> int:
    """Write segments to a file object, seeking over holes; returns the logical length written."""
    total = 0
    for seg in segments:
        if seg.data is None:
            fh.seek(seg.length, os.SEEK_CUR)
        else:
            fh.write(seg.data)
        total += seg.length
        if progress is not None:
            progress.add_segment(seg)
    fh.truncate(total)
    return total


def sha256_file(path: str | os.PathLike[str], progress: ProgressTracker | None = None) -> str:
    hasher = hashlib.sha256()
    for seg in hash_segments(file_segments(path), hasher):
        if progress is not None:
            progress.add(seg.length)
    return hasher.hexdigest()


def allocated_bytes(path: str | os.PathLike[str]) -> int:
    return os.stat(path).st_blocks * 512


# -- qemu-img -------------------------------------------------------------------------------------

def qemu_img_path() -> str:
    found = shutil.which("qemu-img")
    if not found:
        raise QemuImgError("qemu-img is not installed (Debian package qemu-utils)")
    return found


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([qemu_img_path(), *args], capture_output=True, text=True)
    if proc.returncode not in (0,):
        raise QemuImgError(f"qemu-img {' '.join(args[:1])} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def image_info(path: str | os.PathLike[str], fmt: str | None = None) -> dict[str, Any]:
    args = ["info", "--output=json", "-U"]
    if fmt:
        args += ["-f", fmt]
    return json.loads(_run([*args, str(path)]).stdout)


class UnsafeImage(QemuImgError):  # noqa: N818 - reads as what it is
    """An image that would make qemu-img open files other than itself."""


def ensure_standalone(path: str | os.PathLike[str], fmt: str) -> None:
    """Refuse an image that would make qemu-img open another file: a backing file, an external data file,
    or any protocol but a plain file (a crafted qcow2 naming ``/etc/shadow`` or ``nbd://...`` as its
    backing file would otherwise copy that into the target). Checked right before each use."""
    info = image_info(path, fmt)
    for node in (info, *(info.get("children") or [])):
        if not isinstance(node, dict):
            continue
        backing = node.get("backing-filename") or node.get("full-backing-filename")
        if backing:
            raise UnsafeImage(f"{path} has a backing file ({backing}); refusing to follow it")
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        raise UnsafeImage(f"{path} names an external data file ({data['data-file']}); refusing to follow it")


def convert(src: str | os.PathLike[str], src_fmt: str, dst: str | os.PathLike[str], dst_fmt: str,
            progress: Callable[[float], None] | None = None, *, into_existing: bool = False,
            vmdk_subformat: str = "monolithicSparse") -> None:
    """``qemu-img convert`` keeping the output sparse, reporting percent through ``progress``.

    ``into_existing`` writes into a freshly created, all-zero image (``-n --target-is-zero``), such as a
    target volume just made by the hypervisor.
    """
    ensure_standalone(src, src_fmt)
    args = [qemu_img_path(), "convert", "-p", "-f", src_fmt, "-O", dst_fmt]
    if into_existing:
        args += ["-n", "--target-is-zero"]
    elif dst_fmt == "vmdk":
        # streamOptimized is what vSphere imports; QEMU cannot rewrite its clusters, so elsewhere it is
        # monolithicSparse
        args += ["-o", f"subformat={vmdk_subformat}"]
    args += [str(src), str(dst)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None and proc.stderr is not None
    buf = ""
    pattern = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")
    while True:
        ch = proc.stdout.read(1)
        if not ch:
            break
        buf += ch
        if ch in "\r\n":
            match = pattern.search(buf)
            if match and progress is not None:
                progress(float(match.group(1)))
            buf = ""
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise QemuImgError(f"qemu-img convert {src_fmt} -> {dst_fmt} failed: {err.strip()}")


def guest_extents(path: str | os.PathLike[str], fmt: str) -> list[dict[str, Any]]:
    """``qemu-img map``: where each guest range of an image lives in its file (or that it reads as zeros)."""
    ensure_standalone(path, fmt)
    return json.loads(_run(["map", "--output=json", "-U", "-f", fmt, str(path)]).stdout)


def readable_in_place(extents: list[dict[str, Any]]) -> bool:
    """Whether every data range sits uncompressed at a known file offset (what ``guest_segments`` reads)."""
    return all("offset" in e for e in extents if e.get("data") and not e.get("zero"))


def guest_segments(path: str | os.PathLike[str], fmt: str, *, chunk: int = CHUNK,
                   extents: list[dict[str, Any]] | None = None) -> Iterator[Segment]:
    """The guest-visible (raw) content of an image, read straight from its file through its map: data
    ranges are read where they lie, unallocated and zeroed ranges are holes. A qcow2 -> raw conversion
    with no temporary file and no byte of free space read."""
    extents = extents if extents is not None else guest_extents(path, fmt)
    if not readable_in_place(extents):
        raise QemuImgError(f"{path}: compressed or encrypted clusters cannot be read in place")
    with open(path, "rb", buffering=0) as fh:
        fd = fh.fileno()

        def read(pos: int, left: int) -> Iterator[Segment]:
            while left:
                buf = os.pread(fd, min(chunk, left), pos)
                if not buf:
                    raise OSError(f"{path}: short read at {pos}")
                pos += len(buf)
                left -= len(buf)
                yield Segment(length=len(buf), data=buf)

        data = ((int(e["start"]), int(e["length"]), read(int(e["offset"]), int(e["length"])))
                for e in extents if e.get("data") and not e.get("zero"))
        size = max((int(e["start"]) + int(e["length"]) for e in extents), default=0)
        yield from fill_gaps(data, size)


def fill_gaps(ranges: Iterable[tuple[int, int, Iterable[Segment]]], size: int) -> Iterator[Segment]:
    """A logical stream of ``size`` bytes from its data ranges ((offset, length, their segments), in
    order): the gaps between them and after the last are holes."""
    pos = 0
    for offset, length, segments in ranges:
        if offset > pos:
            yield Segment(length=offset - pos)
        yield from segments
        pos = offset + length
    if size > pos:
        yield Segment(length=size - pos)


def compare(a: str | os.PathLike[str], b: str | os.PathLike[str], fmt_a: str | None = None,
            fmt_b: str | None = None) -> bool:
    """``qemu-img compare``: True when both images have the same guest-visible content."""
    args = [qemu_img_path(), "compare", "-U"]
    if fmt_a:
        args += ["-f", fmt_a]
    if fmt_b:
        args += ["-F", fmt_b]
    proc = subprocess.run([*args, str(a), str(b)], capture_output=True, text=True)
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    raise QemuImgError(f"qemu-img compare failed: {proc.stderr.strip()}")


def check(path: str | os.PathLike[str], fmt: str) -> None:
    if fmt == "raw":
        return
    proc = subprocess.run([qemu_img_path(), "check", "-U", "-f", fmt, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise QemuImgError(f"qemu-img check {path} reports errors: {(proc.stdout + proc.stderr).strip()}")


def ensure_free_space(folder: Path, needed: int) -> None:
    """Refuse early, with the guide's advice, when a staging folder cannot hold ``needed`` bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(f"not enough space in {folder}: {needed} bytes needed, {free} free "
                      f"(see 'Monitor Disk Space' in the user guide)")
