"""include/diskio.py: sparse streaming, one-pass sha256, progress, and the qemu-img helpers."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from include import diskio
from include.diskio import (
    CHUNK,
    ProgressTracker,
    QemuImgError,
    Segment,
    allocated_bytes,
    file_segments,
    format_progress,
    hash_segments,
    sha256_file,
    write_segments,
)

BLOCK = 4096  # filesystem block: holes and data are reported at this granularity
MiB = 2**20


def make_sparse(path: Path, size: int, extents: list[tuple[int, bytes]]) -> bytes:
    """A sparse file of ``size`` bytes with ``extents`` written at their offsets; returns its content."""
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset, data in extents:
            fh.seek(offset)
            fh.write(data)
    return path.read_bytes()


def merged_layout(segments: list[Segment]) -> list[tuple[str, int]]:
    """("hole"|"data", length) runs, adjacent runs of the same kind merged (chunking is not layout)."""
    runs: list[tuple[str, int]] = []
    for seg in segments:
        kind = "hole" if seg.data is None else "data"
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] + seg.length)
        else:
            runs.append((kind, seg.length))
    return runs


def joined(segments: list[Segment]) -> bytes:
    return b"".join(bytes(seg.length) if seg.data is None else bytes(seg.data) for seg in segments)


# -- file_segments ------------------------------------------------------------------------------------------

def test_file_segments_reports_holes_and_data(tmp_path):
    path = tmp_path / "disk.raw"
    content = make_sparse(path, MiB, [(16 * BLOCK, b"A" * BLOCK), (128 * BLOCK, b"B" * 2 * BLOCK)])
    segments = list(file_segments(path, chunk=BLOCK))
    assert merged_layout(segments) == [("hole", 16 * BLOCK), ("data", BLOCK), ("hole", 111 * BLOCK),
                                       ("data", 2 * BLOCK), ("hole", MiB - 130 * BLOCK)]
    assert all(seg.length == len(seg.data) for seg in segments if seg.data is not None)
    assert all(seg.length <= BLOCK for seg in segments if seg.data is not None)  # chunk bounds reads
    assert joined(segments) == content
    assert sum(seg.length for seg in segments) == MiB


def test_file_segments_data_at_both_ends(tmp_path):
    path = tmp_path / "disk.raw"
    size = 64 * BLOCK
    content = make_sparse(path, size, [(0, b"start" * 100), (size - BLOCK, b"e" * BLOCK)])
    segments = list(file_segments(path))
    assert merged_layout(segments) == [("data", BLOCK), ("hole", size - 2 * BLOCK), ("data", BLOCK)]
    assert joined(segments) == content


def test_file_segments_unaligned_size_and_full_file(tmp_path):
    path = tmp_path / "dense.bin"
    data = os.urandom(3 * BLOCK + 123)
    path.write_bytes(data)
    segments = list(file_segments(path, chunk=1000))
    assert merged_layout(segments) == [("data", len(data))]
    assert joined(segments) == data
    assert max(seg.length for seg in segments) == 1000


def test_file_segments_of_an_all_hole_and_an_empty_file(tmp_path):
    hole = tmp_path / "hole.raw"
    make_sparse(hole, 10 * MiB, [])
    assert [(s.length, s.data) for s in file_segments(hole)] == [(10 * MiB, None)]
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    assert list(file_segments(empty)) == []


def test_file_segments_without_sparse_reads_everything(tmp_path):
    path = tmp_path / "disk.raw"
    content = make_sparse(path, 32 * BLOCK, [(8 * BLOCK, b"x" * BLOCK)])
    segments = list(file_segments(path, sparse=False, chunk=8 * BLOCK))
    assert all(seg.data is not None for seg in segments)
    assert joined(segments) == content


# -- hashing -------------------------------------------------------------------------------------------------

def test_hash_segments_equals_sha256_of_the_file(tmp_path):
    path = tmp_path / "disk.raw"
    # a hole longer than CHUNK exercises the zero-buffer loop
    content = make_sparse(path, 3 * CHUNK + 5 * BLOCK, [(BLOCK, b"data" * 1024), (2 * CHUNK + BLOCK, b"z" * BLOCK)])
    hasher = hashlib.sha256()
    passed = list(hash_segments(file_segments(path), hasher))
    assert hasher.hexdigest() == hashlib.sha256(content).hexdigest()
    assert joined(passed) == content  # segments pass through unchanged
    assert sha256_file(path) == hashlib.sha256(content).hexdigest()


def test_hash_segments_holes_hash_as_zeros():
    hasher = hashlib.sha256()
    list(hash_segments([Segment(CHUNK + 7), Segment(3, b"abc"), Segment(CHUNK)], hasher))
    assert hasher.hexdigest() == hashlib.sha256(bytes(CHUNK + 7) + b"abc" + bytes(CHUNK)).hexdigest()


def test_sha256_file_reports_progress(tmp_path):
    path = tmp_path / "disk.raw"
    make_sparse(path, 4 * MiB, [(MiB, b"q" * BLOCK)])
    seen: list[int] = []
    progress = ProgressTracker(4 * MiB, lambda done, total, rate, eta: seen.append(done), percent_step=10)
    sha256_file(path, progress)
    assert progress.done == 4 * MiB
    assert seen and seen[-1] == 4 * MiB


# -- write_segments ------------------------------------------------------------------------------------------

def test_write_segments_keeps_the_output_sparse(tmp_path):
    src = tmp_path / "src.raw"
    size = 64 * MiB
    content = make_sparse(src, size, [(MiB, os.urandom(BLOCK)), (40 * MiB, os.urandom(2 * BLOCK))])
    dst = tmp_path / "dst.raw"
    progress = ProgressTracker(size, virtual=size)
    with open(dst, "wb") as fh:
        written = write_segments(file_segments(src), fh, progress)
    assert written == size
    # the progress counts the data written, not the holes skipped; the position went through all of it
    assert progress.done == BLOCK + 2 * BLOCK
    assert progress.position == size
    assert dst.stat().st_size == size
    assert dst.read_bytes() == content
    assert allocated_bytes(dst) == dst.stat().st_blocks * 512
    assert allocated_bytes(dst) <= 64 * BLOCK  # 3 data blocks (plus fs slack), not 64 MiB
    assert allocated_bytes(dst) < size // 100


def test_write_segments_trailing_hole_sets_the_length(tmp_path):
    dst = tmp_path / "out.raw"
    with open(dst, "wb") as fh:
        assert write_segments([Segment(2, b"ab"), Segment(10 * MiB)], fh) == 10 * MiB + 2
    assert dst.stat().st_size == 10 * MiB + 2
    assert dst.read_bytes()[:3] == b"ab\0"
    assert allocated_bytes(dst) <= 4 * BLOCK


def test_write_segments_truncates_a_longer_existing_file(tmp_path):
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"x" * 100)
    with open(dst, "r+b") as fh:
        write_segments([Segment(5, b"hello")], fh)
    assert dst.read_bytes() == b"hello"


@st.composite
def layouts(draw):
    """A file size (not always block-aligned) and extents written at block offsets with random bytes."""
    blocks = draw(st.integers(1, 48))
    tail = draw(st.sampled_from([0, 0, 1, 777, BLOCK - 1]))
    size = blocks * BLOCK + tail
    extents = []
    for _ in range(draw(st.integers(0, 6))):
        start = draw(st.integers(0, blocks - 1))
        length = draw(st.integers(1, min(4 * BLOCK, size - start * BLOCK)))
        byte = draw(st.integers(0, 255))
        extents.append((start * BLOCK, bytes([byte]) * length))
    return size, extents


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.sampled_from([BLOCK, 3 * BLOCK, 1000, CHUNK]))
def test_round_trip_property(layout, chunk):
    size, extents = layout
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src.raw", Path(tmp) / "dst.raw"
        content = make_sparse(src, size, extents)
        hasher = hashlib.sha256()
        with open(dst, "wb") as fh:
            assert write_segments(hash_segments(file_segments(src, chunk=chunk), hasher), fh) == size
        out = dst.read_bytes()
        assert out == content
        assert hasher.hexdigest() == hashlib.sha256(content).hexdigest() == hashlib.sha256(out).hexdigest()
        assert sha256_file(dst) == sha256_file(src)
        # never more allocated than the source (holes stay holes)
        assert allocated_bytes(dst) <= allocated_bytes(src) + BLOCK


# -- ProgressTracker -----------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_progress_emits_at_least_every_percent_step_and_on_finish():
    clock = FakeClock()
    calls: list[tuple[int, int]] = []
    tracker = ProgressTracker(1000, lambda done, total, rate, eta: calls.append((done, total)), interval=1e9,
                              percent_step=10, clock=clock)
    for _ in range(1000):
        tracker.add(1)
    emitted = [done for done, _ in calls]
    assert emitted == [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    tracker.finish()
    assert calls[-1] == (1000, 1000)
    assert len(calls) == 11


@given(st.lists(st.integers(1, 50), min_size=1, max_size=200), st.sampled_from([1.0, 5.0, 10.0, 25.0]))
def test_progress_gap_property(chunks, step):
    total = sum(chunks)
    emitted: list[int] = []
    tracker = ProgressTracker(total, lambda done, *_: emitted.append(done), interval=1e9, percent_step=step,
                              clock=FakeClock())
    for n in chunks:
        tracker.add(n)
    tracker.finish()
    points = [0, *emitted]
    largest = max(chunks)
    # between two reports at most one step plus the chunk that crossed it
    assert all(b - a < total * step / 100 + largest for a, b in zip(points, points[1:]))
    assert emitted[-1] == total
    assert emitted == sorted(emitted)


def test_progress_emits_on_interval():
    clock = FakeClock()
    calls: list[int] = []
    tracker = ProgressTracker(10**9, lambda done, *_: calls.append(done), interval=10, percent_step=50, clock=clock)
    for _ in range(8):
        clock.now += 3
        tracker.add(1)
    # 12 s after start, then 12 s after that: every 4th add
    assert calls == [4, 8]


def test_progress_rate_and_eta_with_an_injected_clock():
    clock = FakeClock(100.0)
    calls = []
    tracker = ProgressTracker(1000, lambda *args: calls.append(args), percent_step=50, clock=clock)
    assert tracker.rate == 0.0 and tracker.eta is None  # nothing measured yet
    clock.now = 110.0
    tracker.add(500)
    assert calls == [(500, 1000, 50.0, 10.0)]
    assert tracker.rate == pytest.approx(50.0)
    assert tracker.eta == pytest.approx(10.0)
    clock.now = 120.0
    tracker.add(500)
    assert tracker.eta == 0.0
    assert calls[-1] == (1000, 1000, 50.0, 0.0)


def test_progress_counts_data_not_holes_so_the_rate_does_not_climb_over_them():
    clock = FakeClock(0.0)
    calls = []
    tracker = ProgressTracker(2 * MiB, lambda *args: calls.append(args), interval=1, percent_step=100, clock=clock,
                              virtual=64 * MiB)
    clock.now = 1.0
    tracker.add_segment(Segment(MiB, b"x" * MiB))
    clock.now = 1.5
    tracker.add_segment(Segment(60 * MiB))  # a hole: no data moved, only the position
    assert (tracker.done, tracker.position) == (MiB, 61 * MiB)
    assert tracker.rate == pytest.approx(MiB / 1.5)
    clock.now = 2.0
    tracker.add_segment(Segment(2 * MiB, b"y" * 2 * MiB))  # more data than the estimate: the total grows
    # by what may still come (the virtual size not read yet), so it does not sit at 100% while data comes
    assert tracker.total == 4 * MiB and tracker.done == 3 * MiB and tracker.eta is not None and tracker.eta > 0
    tracker.finish()
    assert calls[-1][:2] == (3 * MiB, 3 * MiB)
    assert "of data (64 MiB virtual)" in format_progress(MiB, 3 * MiB, MiB, 2.0, virtual=64 * MiB)


def test_progress_with_unknown_total_and_no_callback():
    clock = FakeClock()
    tracker = ProgressTracker(0, None, clock=clock)
    clock.now += 5
    tracker.add(100)
    tracker.finish()  # no callback: nothing to call, nothing raised
    assert tracker.done == 100
    assert tracker.total == 100  # an estimate that was low (here none) grows to what came
    assert tracker.eta == 0.0
    assert tracker.rate == pytest.approx(20.0)
    assert ProgressTracker(-5).total == 0


def test_format_progress():
    assert format_progress(MiB, 2 * MiB, MiB, 10.4) == " 50.0% 1/2 MiB of data at 1.0 MiB/s, ETA 10s"
    assert format_progress(0, 0, 0.0, None) == "100.0% 0/0 MiB of data at 0.0 MiB/s, ETA ?"


# -- qemu-img ----------------------------------------------------------------------------------------------------

@pytest.fixture
def raw_image(tmp_path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.raw"
    content = make_sparse(path, 8 * MiB, [(0, b"\xeb\x63\x90" + os.urandom(509)), (3 * MiB, os.urandom(64 * 1024)),
                                          (7 * MiB, b"end" * 1000)])
    return path, content


def test_qemu_img_is_installed():
    assert Path(diskio.qemu_img_path()).name == "qemu-img"


def test_image_info(raw_image):
    path, _ = raw_image
    info = diskio.image_info(path)
    assert info["format"] == "raw"
    assert info["virtual-size"] == 8 * MiB
    assert diskio.image_info(path, fmt="raw")["virtual-size"] == 8 * MiB


def test_convert_round_trip_raw_qcow2_raw(raw_image, tmp_path):
    raw, content = raw_image
    qcow2, back = tmp_path / "disk.qcow2", tmp_path / "back.raw"
    percents: list[float] = []
    diskio.convert(raw, "raw", qcow2, "qcow2", progress=percents.append)
    info = diskio.image_info(qcow2)
    assert (info["format"], info["virtual-size"]) == ("qcow2", 8 * MiB)
    assert percents and percents[-1] == 100.0
    assert percents == sorted(percents) and all(0.0 <= p <= 100.0 for p in percents)
    diskio.check(qcow2, "qcow2")  # a clean image passes
    assert diskio.compare(raw, qcow2) is True
    assert diskio.compare(raw, qcow2, fmt_a="raw", fmt_b="qcow2") is True
    diskio.convert(qcow2, "qcow2", back, "raw")
    assert back.read_bytes() == content
    assert hashlib.sha256(back.read_bytes()).hexdigest() == sha256_file(raw)
    assert allocated_bytes(back) < 8 * MiB  # conversion keeps the output sparse


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_convert_to_vmdk_subformats(raw_image, tmp_path, subformat):
    """monolithicSparse by default (QEMU can rewrite it); streamOptimized is asked for vSphere targets."""
    raw, _ = raw_image
    vmdk = tmp_path / "disk.vmdk"
    if subformat == "monolithicSparse":
        diskio.convert(raw, "raw", vmdk, "vmdk")
    else:
        diskio.convert(raw, "raw", vmdk, "vmdk", vmdk_subformat=subformat)
    info = diskio.image_info(vmdk)
    assert info["format"] == "vmdk"
    assert info["format-specific"]["data"]["create-type"] == subformat
    assert diskio.compare(raw, vmdk, fmt_b="vmdk") is True


def test_compare_false_for_different_images(raw_image, tmp_path):
    raw, content = raw_image
    other = tmp_path / "other.raw"
    changed = bytearray(content)
    changed[5 * MiB] ^= 0xFF
    other.write_bytes(bytes(changed))
    assert diskio.compare(raw, other) is False


def test_check_on_raw_is_a_no_op(raw_image):
    assert diskio.check(raw_image[0], "raw") is None


def test_check_reports_a_broken_image(tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"not a qcow2 image" * 100)
    with pytest.raises(QemuImgError, match="reports errors"):
        diskio.check(bad, "qcow2")


def test_qemu_img_errors_carry_stderr(tmp_path):
    missing = tmp_path / "missing.qcow2"
    with pytest.raises(QemuImgError, match=r"qemu-img info failed \(1\): .*No such file"):
        diskio.image_info(missing)
    with pytest.raises(QemuImgError, match="qemu-img (convert qcow2 -> raw|info) failed.*: .*No such file"):
        diskio.convert(missing, "qcow2", tmp_path / "out.raw", "raw")
    not_qcow2 = tmp_path / "plain.raw"
    not_qcow2.write_bytes(b"\0" * 4096)
    with pytest.raises(QemuImgError, match="not in qcow2 format"):
        diskio.convert(not_qcow2, "qcow2", tmp_path / "out.raw", "raw")
    with pytest.raises(QemuImgError, match="qemu-img compare failed"):
        diskio.compare(not_qcow2, missing)


def test_missing_qemu_img_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(QemuImgError, match="qemu-img is not installed"):
        diskio.qemu_img_path()


def test_ensure_free_space(tmp_path):
    folder = tmp_path / "staging" / "deep"
    diskio.ensure_free_space(folder, 1)
    assert folder.is_dir()
    with pytest.raises(OSError, match="not enough space in .*Monitor Disk Space"):
        diskio.ensure_free_space(folder, 2**62)


def test_an_image_with_a_backing_or_data_file_is_never_opened_through(tmp_path):
    """A crafted qcow2 naming a host file as its backing file would copy that file into the target."""
    import subprocess

    from include.diskio import UnsafeImage, convert, ensure_standalone, guest_extents

    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"TOPSECRET".ljust(65536, b"\0"))
    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(evil)], check=True)
    external = tmp_path / "external.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on",
                    str(external), "64K"], check=True)
    for image in (evil, external):
        with pytest.raises(UnsafeImage, match="refusing to follow it"):
            ensure_standalone(image, "qcow2")
        with pytest.raises(UnsafeImage):
            guest_extents(image, "qcow2")
        with pytest.raises(UnsafeImage):
            convert(image, "qcow2", tmp_path / "out.raw", "raw")
        assert not (tmp_path / "out.raw").exists()
    ensure_standalone(secret, "raw")  # a plain image is fine
