"""A read-only NBD client for a point-in-time export (libvirt's pull-mode backup serves one per disk on a
unix socket): the fixed-newstyle handshake, ``NBD_OPT_GO`` and ``NBD_CMD_READ`` with simple replies.

Which ranges hold data comes from the server's block status (``base:allocation``), read through
``qemu-img map`` on the same export; only those ranges are read, everything else is a hole.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

from include.diskio import Segment, fill_gaps, qemu_img_path

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
CMD_READ = 0
CMD_DISC = 2
#: the largest read a QEMU NBD server answers in one reply is 32 MiB; stay well below it
MAX_READ = 4 * 1024 * 1024


class NBDError(OSError):
    pass


def url(socket_path: str, export: str) -> str:
    return f"nbd+unix:///{export}?socket={socket_path}"


class NBDClient:
    """One connection to one export; ``size`` is the export's length in bytes."""

    def __init__(self, socket_path: str, export: str, *, timeout: float = 60.0) -> None:
        self.export = export
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._handle = 0
        try:
            self._sock.connect(socket_path)
            self.size = self._handshake(export)
        except BaseException:
            self._sock.close()
            raise

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise NBDError(f"NBD export {self.export}: the server closed the connection")
            buf += chunk
        return bytes(buf)

    def _handshake(self, export: str) -> int:
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise NBDError("not a fixed-newstyle NBD server")
        self._sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self._sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        size = None
        while True:
            magic, _opt, reply, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length) if length else b""
            if magic != OPT_REPLY_MAGIC:
                raise NBDError("bad NBD option reply")
            if reply & 0x80000000:
                raise NBDError(f"NBD export {export!r} refused (reply {reply:#x}): "
                               f"{payload.decode(errors='replace')}".rstrip(": "))
            if reply == REP_INFO and len(payload) >= 12 and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                size = struct.unpack(">Q", payload[2:10])[0]
            elif reply == REP_ACK:
                break
        if size is None:
            raise NBDError(f"NBD export {export!r}: the server did not give its size")
        return int(size)

    def pread(self, offset: int, length: int) -> bytes:
        self._handle += 1
        self._sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, self._handle, offset, length))
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise NBDError(f"NBD export {self.export}: unexpected reply")
        if error:
            raise NBDError(f"NBD export {self.export}: read of {length} bytes at {offset} failed (error {error})")
        return self._recv(length)

    def close(self) -> None:
        try:
            self._sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def extents(socket_path: str, export: str) -> list[dict[str, Any]]:
    """The export's block status as ``qemu-img map`` reports it (data / zero per range)."""
    proc = subprocess.run([qemu_img_path(), "map", "--output=json", "-f", "raw", url(socket_path, export)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NBDError(f"block status of NBD export {export} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def _has_data(extent: dict[str, Any]) -> bool:
    """Read unless it reads as zeros: a hole without the zero flag has unknown content (the NBD spec)."""
    return not extent.get("zero")


def data_bytes(ranges: list[dict[str, Any]]) -> int:
    return sum(int(e["length"]) for e in ranges if _has_data(e))


def segments(socket_path: str, export: str, *, chunk: int = MAX_READ,
             ranges: list[dict[str, Any]] | None = None) -> Iterator[Segment]:
    """The export's guest data: allocated ranges read through NBD, the rest holes."""
    ranges = ranges if ranges is not None else extents(socket_path, export)
    chunk = max(4096, min(chunk, MAX_READ))
    with NBDClient(socket_path, export) as client:

        def read(pos: int, left: int) -> Iterator[Segment]:
            while left:
                n = min(chunk, left)
                yield Segment(length=n, data=client.pread(pos, n))
                pos += n
                left -= n

        data = ((int(e["start"]), int(e["length"]), read(int(e["start"]), int(e["length"])))
                for e in ranges if _has_data(e))
        yield from fill_gaps(data, client.size)
