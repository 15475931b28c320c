"""The qcow2 snapshot reader against images qemu-img and qemu-io make: what it yields at a snapshot is what
``qemu-img convert -l snapshot.name=`` gives, with holes where nothing is allocated."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from include import qcow2

MiB = 1 << 20


def _io(path: Path, *commands: str) -> None:
    for c in commands:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", c, str(path)], check=True, capture_output=True)


def _img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _expected(path: Path, snap: str, tmp: Path) -> bytes:
    out = tmp / f"expected-{snap}.raw"
    _img("convert", "-U", "-f", "qcow2", "-l", f"snapshot.name={snap}", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def _read(path: Path, snap: str) -> tuple[bytes, int]:
    with open(path, "rb") as fh:
        buf, data = bytearray(), 0
        for seg in qcow2.segments(fh, snap):
            if seg.data is None:
                buf += bytes(seg.length)
            else:
                assert len(seg.data) == seg.length
                buf += seg.data
                data += seg.length
        return bytes(buf), data


@pytest.mark.parametrize("cluster", ["65536", "4096", "2097152"])
def test_a_snapshot_reads_as_qemu_img_reads_it_while_the_image_moves_on(tmp_path, cluster):
    img = tmp_path / "d.qcow2"
    _img("create", "-f", "qcow2", "-o", f"cluster_size={cluster}", str(img), "24M")
    _io(img, "write -P 0x11 0 3M", "write -P 0x22 10M 64k", "write -z 12M 1M", "write -P 0x33 23M 1M")
    _img("snapshot", "-c", "first", str(img))
    # the guest writes on: over the snapshot's data, into its holes, zeroes some of it
    _io(img, "write -P 0x44 0 1M", "write -P 0x55 5M 2M", "write -z 23M 512k")
    _img("snapshot", "-c", "second", str(img))
    _io(img, "write -P 0x66 1M 1M")
    for snap in ("first", "second"):
        got, data = _read(img, snap)
        assert got == _expected(img, snap, tmp_path), snap
    _got, data = _read(img, "first")
    size = int(cluster)
    written = [(0, 3 * MiB), (10 * MiB, 64 * 1024), (23 * MiB, MiB)]  # the zeroed megabyte is not data
    clusters = {c for off, n in written for c in range(off // size, (off + n - 1) // size + 1)}
    assert data == len(clusters) * size, "only allocated clusters are read; zero clusters are holes"


def test_compressed_clusters_and_an_odd_size(tmp_path):
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"".join(bytes([i % 251]) * 4096 for i in range(1000)) + b"tail" * 100)  # not cluster-aligned
    img = tmp_path / "c.qcow2"
    _img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    _img("snapshot", "-c", "s", str(img))
    got, _ = _read(img, "s")
    assert got[: raw.stat().st_size] == raw.read_bytes()  # the virtual size is the file's, rounded up to 512
    assert got == _expected(img, "s", tmp_path)


def test_what_is_refused_says_why(tmp_path):
    base = tmp_path / "base.qcow2"
    _img("create", "-f", "qcow2", str(base), "4M")
    top = tmp_path / "top.qcow2"
    _img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    with open(top, "rb") as fh, pytest.raises(qcow2.Qcow2Error, match="backing file"):
        qcow2.read_header(fh)
    _img("snapshot", "-c", "s", str(base))
    with open(base, "rb") as fh, pytest.raises(qcow2.Qcow2Error, match="no internal snapshot 'other'.*'s'"):
        list(qcow2.segments(fh, "other"))
    raw = tmp_path / "x.raw"
    raw.write_bytes(b"\0" * 4096)
    with open(raw, "rb") as fh, pytest.raises(qcow2.Qcow2Error, match="not a qcow2"):
        qcow2.read_header(fh)


def test_a_preallocated_image_sends_only_what_was_written(tmp_path):
    """PVE makes qcow2 disks with preallocation=metadata: every cluster has an offset, most hold zeros; those
    travel as holes."""
    img = tmp_path / "p.qcow2"
    _img("create", "-f", "qcow2", "-o", "preallocation=metadata", str(img), "16M")
    _io(img, "write -P 0x5a 4M 1M")
    _img("snapshot", "-c", "s", str(img))
    got, data = _read(img, "s")
    assert got == _expected(img, "s", tmp_path) and data == MiB


def test_a_compressed_cluster_at_the_end_of_the_file_is_read(tmp_path):
    """Its sector count may reach past the end of the file (QEMU reads what is there)."""
    img = tmp_path / "e.qcow2"
    _img("create", "-f", "qcow2", str(img), "4M")
    _io(img, "write -P 0x11 0 1M", "write -c -P 0x22 2M 64k", "discard 0 1M")
    _img("snapshot", "-c", "s", str(img))
    got, _ = _read(img, "s")
    assert got == _expected(img, "s", tmp_path)
