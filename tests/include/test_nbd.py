"""The NBD client against a real NBD server (Debian's qemu-nbd on a unix socket)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import pytest

from include import nbd
from include.diskio import qemu_img_path

MiB = 1024 * 1024


@pytest.fixture
def served(tmp_path):
    """A qcow2 image with data at two places, served read-only by qemu-nbd as export ``vda``."""
    image = tmp_path / "disk.qcow2"
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as fh:
        fh.truncate(64 * MiB)
        fh.seek(MiB)
        fh.write(os.urandom(3 * MiB))
        fh.seek(40 * MiB + 512)
        fh.write(os.urandom(5000))
    subprocess.run([qemu_img_path(), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "--read-only", "--persistent", "--shared=4", "-x", "vda", "-f", "qcow2",
                             f"--socket={sock}", str(image)])
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.05)
    yield str(sock), raw
    proc.terminate()
    proc.wait(10)


def test_reads_only_the_data_ranges_and_matches_the_image(served):
    sock, raw = served
    ranges = nbd.extents(sock, "vda")
    data = nbd.data_bytes(ranges)
    assert 3 * MiB <= data < 8 * MiB  # two data ranges, not the 64 MiB disk
    h, sent, holes = hashlib.sha256(), 0, 0
    for seg in nbd.segments(sock, "vda", ranges=ranges, chunk=1 * MiB):
        if seg.data is None:
            holes += seg.length
            h.update(bytes(seg.length))
        else:
            sent += seg.length
            h.update(seg.data)
    assert sent == data and sent + holes == 64 * MiB
    assert h.hexdigest() == hashlib.sha256(raw.read_bytes()).hexdigest()


def test_an_unknown_export_is_a_clear_error(served):
    sock, _raw = served
    with pytest.raises(nbd.NBDError, match="'vdz' refused"):
        nbd.NBDClient(sock, "vdz")


def test_the_size_is_the_exports(served):
    sock, _raw = served
    with nbd.NBDClient(sock, "vda") as client:
        assert client.size == 64 * MiB
        assert client.pread(0, 4096) == bytes(4096)
