"""Live-export benchmark: reading a running VM's disk from its point in time, ours against qemu-img, in one run.

    .venv/bin/python bench/live_bench.py [--size-mib 1024] [--json] [--workdir DIR]

It builds a raw disk of the requested size whose every other 64 MiB block is random data (half allocated),
starts a VM with it on the local libvirtd (qemu:///system; the VM has no bootable disk, it only needs to
run), holds the disk at a point in time through the engine's libvirt driver (a pull-mode backup job
serving it over NBD) and measures, on that same export:

* ours: ``LibvirtDriver.read_point_in_time`` (block status, then the data ranges through ``include/nbd.py``)
  with sha256 over every byte, as Transferring reads it;
* baseline: ``qemu-img convert -f raw nbd+unix://... -O raw`` into a sparse file (what a user would run),
  then the same file hashed with sha256 (``qemu-img`` does not hash).

It prints a table (``--json``: JSON on stdout). A benchmark, not a test: exit code 0 unless something failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from include import nbd  # noqa: E402
from include.diskio import qemu_img_path  # noqa: E402
from include.providers.base import DiskInfo  # noqa: E402
from include.providers.libvirt_driver import LibvirtDriver, virt_type  # noqa: E402

MiB = 1024 * 1024
BLOCK = 64 * MiB
URI = "qemu:///system"


def progress(message: str) -> None:
    print(f"[live-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_disk(path: Path, size: int) -> int:
    rng = random.Random(7)
    data = 0
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset in range(0, size, 2 * BLOCK):
            fh.seek(offset)
            left = min(BLOCK, size - offset)
            data += left
            while left:
                n = min(left, 8 * MiB)
                fh.write(rng.randbytes(n))
                left -= n
    os.chmod(path, 0o644)
    return data


def ours(driver: LibvirtDriver, handle: dict, disk: DiskInfo) -> dict:
    start = time.perf_counter()
    segments, size, data = driver.read_point_in_time(handle, disk)
    h = hashlib.sha256()
    for seg in segments:
        h.update(seg.data if seg.data is not None else bytes(seg.length))
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "sha256": h.hexdigest(), "data_bytes": data, "size": size,
            "data_mib_s": round(data / MiB / seconds, 1)}


def baseline(sock: str, export: str, out: Path) -> dict:
    start = time.perf_counter()
    subprocess.run([qemu_img_path(), "convert", "-q", "-f", "raw", "-O", "raw", nbd.url(sock, export), str(out)],
                   check=True)
    copied = time.perf_counter() - start
    h = hashlib.sha256()
    with open(out, "rb") as fh:
        for block in iter(lambda: fh.read(8 * MiB), b""):
            h.update(block)
    seconds = time.perf_counter() - start
    return {"convert_seconds": round(copied, 3), "seconds": round(seconds, 3), "sha256": h.hexdigest()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vmm-bench-", dir=args.workdir or "/var/tmp"))
    os.chmod(work, 0o711)
    name = f"vmm-live-bench-{uuid.uuid4().hex[:6]}"
    disk_path = work / "data.raw"
    driver = LibvirtDriver(URI)
    dom = None
    try:
        progress(f"building a {args.size_mib} MiB disk (half data)")
        allocated = make_disk(disk_path, args.size_mib * MiB)
        dom = driver.conn.createXML(
            f"<domain type='{virt_type()}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            f"<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
            f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{disk_path}'/>"
            f"<target dev='vda' bus='virtio'/></disk></devices></domain>", 0)
        disk = DiskInfo(name="vda", format="raw", capacity=args.size_mib * MiB, allocation=allocated,
                        path=str(disk_path))
        (work / "pit").mkdir(mode=0o711)
        os.chmod(work / "pit", 0o711)
        start = time.perf_counter()
        pit = driver.begin_point_in_time(name, [disk], str(work / "pit"))
        begin_s = time.perf_counter() - start
        try:
            progress("reading the point in time: ours")
            mine = ours(driver, pit.handle, disk)
            progress("reading the point in time: qemu-img convert + sha256")
            theirs = baseline(pit.handle["socket"], "vda", work / "copy.raw")
        finally:
            driver.end_point_in_time(name, pit.handle)
        report = {
            "size_mib": args.size_mib, "data_mib": allocated // MiB, "begin_seconds": round(begin_s, 3),
            "ours": mine, "qemu_img": theirs, "same_sha256": mine["sha256"] == theirs["sha256"],
            "ratio_vs_qemu_img_convert": round(theirs["convert_seconds"] / mine["seconds"], 2),
            "ratio_vs_qemu_img_convert_plus_sha256": round(theirs["seconds"] / mine["seconds"], 2),
        }
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"disk {args.size_mib} MiB, {allocated // MiB} MiB data; point in time taken in {begin_s:.3f} s")
            print(f"  ours (block status + NBD reads + sha256): {mine['seconds']:.2f} s, {mine['data_mib_s']} MiB/s "
                  f"of data")
            print(f"  qemu-img convert from the export:        {theirs['convert_seconds']:.2f} s "
                  f"(+ sha256 of the copy: {theirs['seconds']:.2f} s)")
            print(f"  ratio (qemu-img convert / ours): {report['ratio_vs_qemu_img_convert']}x; "
                  f"with its sha256: {report['ratio_vs_qemu_img_convert_plus_sha256']}x; "
                  f"same sha256: {report['same_sha256']}")
        return 0 if report["same_sha256"] else 1
    finally:
        if dom is not None:
            dom.destroy()
        driver.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
