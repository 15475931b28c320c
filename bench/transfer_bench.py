"""Transfer benchmark: our libvirt -> S3 -> libvirt migration against plain baselines, in one run.

    .venv/bin/python bench/transfer_bench.py [--size-gib 4] [--size-mib N] [--json] [--workdir DIR] [--keep]

It builds a qcow2 disk of the requested virtual size whose every other 64 MiB block is random data (half
the virtual size allocated), defines a shut-off VM with it on the local libvirtd (qemu:///system), starts a
versitygw S3 server on loopback, and measures, in this order:

* baselines: hashlib sha256 of the qcow2 file (8 MiB reads); boto3 ``upload_file`` of the same file with the
  default TransferConfig (a child process, so its peak RSS is known); ``qemu-img convert -f qcow2 -O raw``;
* ours, in one child process running the real phases (``include.phases``) of one whole migration
  validate -> snapshot -> export -> transfer -> convert -> import -> create_vm -> validate_target -> finalize,
  with export -> S3 (export_disk + transfer_disk) and S3 -> import (convert_disk + import_disk) timed inside it.

It prints a table (``--json``: the same as JSON on stdout); progress goes to stderr. It is a benchmark, not a
test: the exit code is 0 when a target is missed (the missed targets are listed), non-zero only when
something failed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024
GiB = 1024 * MiB
BLOCK = 64 * MiB  # random data blocks alternate with holes of the same size
READ = 8 * MiB
NAMESPACE = "default"
MIGRATION = "bench"
BUCKET = "vm-migrations"
BASELINE_BUCKET = "bench-baseline"
URI = "qemu:///system"

# targets of the issue
UPLOAD_SPEED_MIN = 0.9  # our upload (hashing) >= 0.9x boto3's upload_file (no hashing)
MIGRATION_TIME_MAX = 2.0  # whole migration <= 2x a direct qemu-img convert
RSS_MAX_MIB = 256  # peak RSS of our transfer process
SENT_MAX = 1.05  # bytes sent <= 1.05x allocated bytes


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def mib(n: float) -> float:
    return n / MiB


def qemu_img() -> str:
    from include.diskio import qemu_img_path

    return qemu_img_path()


# -- the source disk ---------------------------------------------------------------------------------------

def data_extents(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the random data: 64 MiB blocks alternating with 64 MiB holes, half the disk.

    Disks under 128 MiB use two blocks of a quarter of the size each (1 MiB aligned)."""
    block = BLOCK if size >= 2 * BLOCK else max(MiB, (size // 4) // MiB * MiB)
    extents = []
    offset = 0
    while offset < size:
        extents.append((offset, min(block, size - offset)))
        offset += 2 * block
    return extents


def write_sparse_raw(path: Path, size: int, extents: list[tuple[int, int]]) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset, length in extents:
            fh.seek(offset)
            left = length
            while left:
                n = min(left, READ)
                fh.write(os.urandom(n))
                left -= n


def build_disk(path: Path, size: int) -> dict[str, Any]:
    """The qcow2 source disk at ``path``; reused when a kept earlier run left one of the same layout."""
    extents = data_extents(size)
    layout = {"virtualSize": size, "extents": extents, "format": "qcow2"}
    sidecar = path.parent.parent.parent / "source-disk.json"  # outside the pool folder, so not a volume
    if path.exists() and sidecar.exists():
        try:
            if json.loads(sidecar.read_text()) == json.loads(json.dumps(layout)):
                _drop_internal_snapshots(path)
                progress(f"re-using the source disk {path} from an earlier --keep run")
                return layout
        except (OSError, ValueError, subprocess.CalledProcessError):
            pass
    sidecar.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.parent.parent / f".{path.stem}.raw.tmp"  # not in the pool folder
    data = sum(length for _, length in extents)
    progress(f"building a {size / GiB:.2f} GiB qcow2 disk with {data / MiB:,.0f} MiB of random data "
             f"({len(extents)} blocks)")
    began = time.perf_counter()
    try:
        write_sparse_raw(raw, size, extents)
        subprocess.run([qemu_img(), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    finally:
        raw.unlink(missing_ok=True)
    os.chmod(path, 0o644)
    sidecar.write_text(json.dumps(layout))
    progress(f"disk built in {time.perf_counter() - began:.1f} s")
    return layout


def _drop_internal_snapshots(path: Path) -> None:
    """A run killed between Snapshotting and Finalizing leaves an internal snapshot in a kept disk."""
    info = json.loads(subprocess.run([qemu_img(), "info", "--output=json", "-U", str(path)], check=True,
                                     capture_output=True, text=True).stdout)
    for snap in info.get("snapshots", []):
        subprocess.run([qemu_img(), "snapshot", "-d", snap["name"], str(path)], check=True, capture_output=True)


def allocated_data_bytes(path: Path) -> int:
    """Guest-visible allocated bytes: the sum of the ``data: true`` ranges of ``qemu-img map``."""
    proc = subprocess.run([qemu_img(), "map", "-U", "-f", "qcow2", "--output=json", str(path)], check=True,
                          capture_output=True, text=True)
    return sum(int(e["length"]) for e in json.loads(proc.stdout) if e.get("data"))


# -- libvirt world -----------------------------------------------------------------------------------------

def start_libvirtd() -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "libvirtd.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"libvirtd could not be started: {proc.stderr.strip()}")


def forget_world(world: Any) -> None:
    """Undefine the world but keep the source disk file; empty the target pool folder. Leaves a kept
    earlier run ready to be run again."""
    from include.demo import teardown

    teardown(world, delete_volumes=False)
    shutil.rmtree(world.root / "pools" / "dst", ignore_errors=True)


def define_source_vm(world: Any, disk: Path) -> None:
    from include.demo import ensure_pool

    conn = world.conn()
    try:
        ensure_pool(conn, world.source_pool, disk.parent)
        ensure_pool(conn, world.target_pool, world.root / "pools" / "dst")
        conn.defineXML(
            f"<domain type='kvm'><name>{world.vm_name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>"
            f"<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>"
            f"<target dev='vda' bus='virtio'/></disk></devices></domain>")
    finally:
        conn.close()


def target_volume_path(world: Any, volume: str) -> str:
    conn = world.conn()
    try:
        pool = conn.storagePoolLookupByName(world.target_pool)
        pool.refresh(0)
        return pool.storageVolLookupByName(volume).path()
    finally:
        conn.close()


def spec_documents(world: Any, server: Any) -> list[dict[str, Any]]:
    from include.demo import store_documents

    docs = store_documents(world, name=MIGRATION, namespace=NAMESPACE, target_format="raw", extra_spec={
        "storage": {"type": "s3", "bucket": BUCKET, "endpoint": server.endpoint, "region": server.region,
                    "credentialsSecretRef": {"name": f"{MIGRATION}-s3"}},
    })
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{MIGRATION}-s3", "namespace": NAMESPACE},
                 "stringData": {"accessKey": server.access_key, "secretKey": server.secret_key}})
    return docs


# -- child processes ---------------------------------------------------------------------------------------

def run_child(mode: str, job: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run this script with a hidden ``--<mode> JOB`` in a fresh interpreter and return its result.

    A child of its own: its peak RSS is its own (not the parent's disk building), and it starts cold as a
    real task does. The child measures itself (time, CPU, VmHWM); the job file carries the S3 keys."""
    job_path = workdir / f"{mode}.job.json"
    result_path = workdir / f"{mode}.result.json"
    result_path.unlink(missing_ok=True)
    job = {**job, "result": str(result_path)}
    fd = os.open(job_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # carries the S3 keys
    with os.fdopen(fd, "w") as fh:
        json.dump(job, fh)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), f"--{mode}", str(job_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    proc.wait()
    job_path.unlink(missing_ok=True)
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    result_path.unlink(missing_ok=True)
    if proc.returncode != 0 or result.get("error"):
        raise RuntimeError(f"the {mode} child failed (exit {proc.returncode}): {result.get('error') or 'no result'}")
    return result


def child_boto3_upload(job: dict[str, Any]) -> dict[str, Any]:
    """Baseline 2: boto3 as anyone would use it: a stock client (only path-style addressing set, as for any
    endpoint without bucket DNS names) and ``upload_file`` with the default TransferConfig."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3", endpoint_url=job["endpoint"], region_name=job["region"], aws_access_key_id=job["access_key"],
        aws_secret_access_key=job["secret_key"], config=Config(s3={"addressing_style": "path"}))
    cpu0, _ = _self_cpu()
    server0 = proc_cpu_seconds(job.get("serverPid"))
    busy0 = machine_busy_seconds()
    began = time.perf_counter()
    client.upload_file(job["file"], job["bucket"], job["key"])  # default TransferConfig
    seconds = time.perf_counter() - began
    busy = machine_busy_seconds() - busy0
    cpu = _self_cpu()[0] - cpu0
    server = proc_cpu_seconds(job.get("serverPid")) - server0
    stored = int(client.head_object(Bucket=job["bucket"], Key=job["key"])["ContentLength"])
    return {"seconds": seconds, "storedBytes": stored, "peakRssMiB": _peak_rss_kib(reset=False) / 1024,
            "cpuSeconds": round(cpu, 3), "serverCpuSeconds": round(server, 3),
            "otherCpuSeconds": round(max(0.0, busy - cpu - server), 3)}


def proc_cpu_seconds(pid: int | None) -> float:
    """utime + stime of a running process (0 when unknown): the S3 server's CPU, read from /proc."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all processes and the kernel), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _peak_rss_kib(reset: bool) -> int:
    """VmHWM of this process; with ``reset`` the high-water mark starts again from the current RSS
    (``echo 5 > /proc/self/clear_refs``), so each phase gets its own peak."""
    peak = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    if not peak:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if reset:
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    return peak


def child_ours(job: dict[str, Any]) -> dict[str, Any]:
    """Ours: one whole migration through the real phases, each phase timed, with its CPU (ours, the
    qemu-img we ran, the S3 server's) and our peak RSS."""
    from include import phases
    from include.store import SpecStore

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[ours  %(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    ctx = phases.MigrationContext(job["namespace"], job["name"], store=SpecStore(job["store"]))
    stats: dict[str, dict[str, float]] = {}
    server_pid = job.get("serverPid")
    out: dict[str, Any] = {"loadBefore": os.getloadavg()[0]}

    def timed(label: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        _peak_rss_kib(reset=True)
        cpu0, kids0 = _self_cpu()
        server0 = proc_cpu_seconds(server_pid)
        busy0 = machine_busy_seconds()
        began = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - began
        busy = machine_busy_seconds() - busy0
        cpu1, kids1 = _self_cpu()
        server = proc_cpu_seconds(server_pid) - server0
        entry = stats.setdefault(label, {"seconds": 0.0, "cpuSeconds": 0.0, "qemuImgCpuSeconds": 0.0,
                                         "serverCpuSeconds": 0.0, "otherCpuSeconds": 0.0, "peakRssMiB": 0.0})
        entry["seconds"] += seconds
        entry["cpuSeconds"] += cpu1 - cpu0
        entry["qemuImgCpuSeconds"] += kids1 - kids0
        entry["serverCpuSeconds"] += server
        entry["otherCpuSeconds"] += max(0.0, busy - (cpu1 - cpu0) - (kids1 - kids0) - server)
        entry["peakRssMiB"] = max(entry["peakRssMiB"], _peak_rss_kib(reset=False) / 1024)
        return result

    began = time.perf_counter()
    try:
        disks = timed("validate", phases.validate, ctx)["disks"]
        timed("snapshot", phases.snapshot, ctx)
        for disk in disks:
            timed("export_disk", phases.export_disk, ctx, disk)
            timed("transfer_disk", phases.transfer_disk, ctx, disk)
        records = {disk: ctx.disk_record(disk) for disk in disks}
        manifests = {disk: ctx.storage.get_manifest(ctx.disk_plan(disk).object_key) or {} for disk in disks}
        for disk in disks:
            timed("convert_disk", phases.convert_disk, ctx, disk)
            timed("import_disk", phases.import_disk, ctx, disk)
        timed("create_vm", phases.create_vm, ctx)
        timed("validate_target", phases.validate_target, ctx)
        timed("finalize", phases.finalize, ctx, succeeded=True)
        total = time.perf_counter() - began
        out.update(disks=disks, targetVolumes={d.name: d.target_volume for d in ctx.plan.disks},
                   compression=ctx.plan.storage.compression)
    except BaseException as err:
        with contextlib.suppress(Exception):
            phases.finalize(ctx, succeeded=False, failure=phases.failure_message(err))
        raise
    finally:
        ctx.close()
    out.update(
        seconds=total,
        phases={k: {m: round(v, 3 if m != "peakRssMiB" else 1) for m, v in e.items()} for k, e in stats.items()},
        exportToS3=stats["export_disk"]["seconds"] + stats["transfer_disk"]["seconds"],
        s3ToImport=stats["convert_disk"]["seconds"] + stats["import_disk"]["seconds"],
        sentBytes=sum(r.sent_bytes or 0 for r in records.values()),
        transitBytes=sum(r.transit_bytes or 0 for r in records.values()),
        storedBytes=sum(int(m.get("storedBytes") or 0) for m in manifests.values()),
        peakRssMiB=max(e["peakRssMiB"] for e in stats.values()),
        loadAfter=os.getloadavg()[0],
    )
    return out


def child_main(mode: str, job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    result_path = Path(job["result"])
    try:
        result = child_boto3_upload(job) if mode == "boto3-upload" else child_ours(job)
        code = 0
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which exits non-zero
        logging.getLogger(__name__).exception("%s failed", mode)
        result, code = {"error": f"{type(err).__name__}: {err}"}, 1
    result_path.write_text(json.dumps(result))
    return code


# -- measurements in the parent ----------------------------------------------------------------------------

def settle() -> None:
    """Between steps: write back what the previous step left dirty, so it does not throttle the next one."""
    os.sync()


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as fh:
        while fh.read(READ):
            pass


def baseline_sha256(path: Path) -> tuple[float, str]:
    hasher = hashlib.sha256()
    began = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        for block in iter(lambda: fh.read(READ), b""):
            hasher.update(block)
    return time.perf_counter() - began, hasher.hexdigest()


def baseline_qemu_convert(src: Path, dst: Path, *, durable: bool = False) -> float:
    """``qemu-img convert -f qcow2 -O raw``; ``durable``: plus an fsync of the output (on disk, not only in
    the page cache)."""
    dst.unlink(missing_ok=True)
    began = time.perf_counter()
    subprocess.run([qemu_img(), "convert", "-f", "qcow2", "-O", "raw", str(src), str(dst)], check=True)
    if durable:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - began
    dst.unlink()
    return seconds


def row(step: str, label: str, seconds: float, nbytes: int, *, baseline: str | None = None,
        baseline_seconds: float | None = None, kind: str | None = None, target: float | None = None) -> dict:
    """One table row. ``kind`` "speed": ratio = our MiB/s / baseline MiB/s (target is a minimum);
    "time": ratio = our seconds / baseline seconds (target is a maximum)."""
    ratio = None
    if baseline_seconds:
        ratio = baseline_seconds / seconds if kind == "speed" else seconds / baseline_seconds
    passed = None
    if target is not None and ratio is not None:
        passed = ratio >= target if kind == "speed" else ratio <= target
    return {"step": step, "label": label, "seconds": round(seconds, 3), "bytes": nbytes,
            "mibPerSecond": round(mib(nbytes) / seconds, 1) if seconds > 0 else None,
            "baseline": baseline, "ratio": round(ratio, 3) if ratio is not None else None, "ratioKind": kind,
            "target": (f">= {target:.2f}" if kind == "speed" else f"<= {target:.2f}") if target else None,
            "pass": passed}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from include.demo import DemoWorld, teardown, write_store
    from tests.servers.s3 import start_s3_server

    size = args.size_mib * MiB if args.size_mib else int(args.size_gib * GiB)
    size = max(16 * MiB, size // MiB * MiB)
    created_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vmmig-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = args.prefix or f"bench-{hashlib.sha1(str(workdir).encode()).hexdigest()[:6]}"
    os.environ.setdefault("VMMIGRATION_ALLOW_LOOPBACK", "true")  # our S3 server listens on 127.0.0.1
    os.environ["VMMIGRATION_STORE"] = str(workdir / "store")
    os.environ["VMMIGRATION_STAGING"] = str(workdir / "staging")
    progress(f"workdir {workdir}, libvirt prefix {prefix!r}, disk {size / GiB:.3g} GiB")

    start_libvirtd()
    world = DemoWorld(uri=URI, prefix=prefix, root=workdir / "world")
    forget_world(world)
    disk = world.root / "pools" / "src" / f"{world.vm_name}-vda.qcow2"
    server = None
    report: dict[str, Any] = {}
    try:
        shutil.rmtree(workdir / "store", ignore_errors=True)
        shutil.rmtree(workdir / "staging", ignore_errors=True)
        shutil.rmtree(workdir / "s3", ignore_errors=True)
        build_disk(disk, size)
        define_source_vm(world, disk)
        allocated = allocated_data_bytes(disk)
        file_bytes = disk.stat().st_size
        progress(f"source {disk.name}: virtual {size:,} B, allocated data {allocated:,} B, file {file_bytes:,} B")
        server = start_s3_server(workdir / "s3")
        server.create_bucket(BUCKET)
        server.create_bucket(BASELINE_BUCKET)
        write_store(workdir / "store", "bench.yaml", spec_documents(world, server))
        warm(disk)
        settle()

        progress("baseline 1: hashlib sha256 of the qcow2 file (8 MiB reads)")
        hash_s, digest = baseline_sha256(disk)
        settle()

        progress("baseline 2: boto3 upload_file, default TransferConfig (child process)")
        boto3_res = run_child("boto3-upload", {
            "endpoint": server.endpoint, "region": server.region, "access_key": server.access_key,
            "secret_key": server.secret_key, "bucket": BASELINE_BUCKET, "key": disk.name, "file": str(disk),
            "serverPid": server.process.pid if server.process else None,
        }, workdir)
        if boto3_res["storedBytes"] != file_bytes:
            raise RuntimeError(f"boto3 stored {boto3_res['storedBytes']} bytes of {file_bytes}")
        server.client().delete_object(Bucket=BASELINE_BUCKET, Key=disk.name)
        settle()

        progress("baseline 3: qemu-img convert -f qcow2 -O raw")
        kids0 = _self_cpu()[1]
        convert_s = baseline_qemu_convert(disk, workdir / "baseline.raw")
        convert_cpu = _self_cpu()[1] - kids0
        settle()
        progress("baseline 3b: the same, then fsync of the output (informative)")
        convert_sync_s = baseline_qemu_convert(disk, workdir / "baseline.raw", durable=True)
        settle()

        progress("ours: the whole migration through the phases (child process)")
        ours = run_child("ours", {"store": str(workdir / "store"), "namespace": NAMESPACE, "name": MIGRATION,
                                  "serverPid": server.process.pid if server.process else None}, workdir)
        progress("checking that the target volume holds the source disk (qemu-img compare)")
        volume = target_volume_path(world, ours["targetVolumes"]["vda"])
        from include.diskio import compare

        identical = compare(disk, volume, "qcow2", "raw")

        steps = [
            row("sha256", "baseline: hashlib sha256 of the qcow2 file", hash_s, file_bytes),
            row("boto3_upload", "baseline: boto3 upload_file (no hashing)", boto3_res["seconds"], file_bytes),
            row("qemu_img_convert", "baseline: qemu-img convert qcow2 -> raw", convert_s, file_bytes),
            row("qemu_img_convert_fsync", "baseline: the same + fsync (informative)", convert_sync_s, file_bytes),
            row("export_to_s3", "ours: export -> S3 (sha256 on the way)", ours["exportToS3"], file_bytes,
                baseline="boto3_upload", baseline_seconds=boto3_res["seconds"], kind="speed",
                target=UPLOAD_SPEED_MIN),
            row("s3_to_import", "ours: S3 -> import (convert_disk + import_disk)", ours["s3ToImport"], file_bytes,
                baseline="qemu_img_convert", baseline_seconds=convert_s, kind="time"),
            row("whole_migration", "ours: whole libvirt -> S3 -> libvirt migration", ours["seconds"], file_bytes,
                baseline="qemu_img_convert", baseline_seconds=convert_s, kind="time", target=MIGRATION_TIME_MAX),
        ]
        rss_mib = ours["peakRssMiB"]
        whole = steps[-1]
        # libvirtd's part of "other" is about 1-2 CPU seconds per 2 GiB; far more means something else ran
        other = sum(e["otherCpuSeconds"] for e in ours["phases"].values()) + boto3_res["otherCpuSeconds"]
        busy = other > 0.25 * (ours["seconds"] + boto3_res["seconds"])
        sent = ours["sentBytes"]
        report = {
            "disk": {"virtualBytes": size, "allocatedBytes": allocated, "qcow2FileBytes": file_bytes,
                     "sha256": digest, "dataExtents": len(data_extents(size))},
            "steps": steps,
            "wholeMigrationVsDurableConvert": round(whole["seconds"] / convert_sync_s, 3),
            "phases": ours["phases"],
            "cpu": {"boto3UploadSeconds": boto3_res["cpuSeconds"],
                    "boto3UploadServerSeconds": boto3_res["serverCpuSeconds"],
                    "boto3UploadOtherSeconds": boto3_res["otherCpuSeconds"],
                    "oursTransferSeconds": ours["phases"]["transfer_disk"]["cpuSeconds"],
                    "oursTransferServerSeconds": ours["phases"]["transfer_disk"]["serverCpuSeconds"],
                    "oursTransferOtherSeconds": ours["phases"]["transfer_disk"]["otherCpuSeconds"],
                    "baselineQemuImgSeconds": round(convert_cpu, 3),
                    "oursQemuImgSeconds": round(sum(e["qemuImgCpuSeconds"] for e in ours["phases"].values()), 3)},
            "rss": {"oursPeakMiB": round(rss_mib, 1),
                    "oursPeakPhase": max(ours["phases"], key=lambda k: ours["phases"][k]["peakRssMiB"]),
                    "boto3PeakMiB": round(boto3_res["peakRssMiB"], 1),
                    "targetMiB": RSS_MAX_MIB, "pass": rss_mib < RSS_MAX_MIB},
            "bytes": {"sent": sent, "stored": ours["storedBytes"], "transit": ours["transitBytes"],
                      "allocated": allocated, "qcow2FileBytes": file_bytes,
                      "ratio": round(sent / allocated, 4) if allocated else None, "target": SENT_MAX,
                      "pass": bool(allocated) and sent <= SENT_MAX * allocated},
            "targetIdenticalToSource": identical,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "qemuImg": subprocess.run([qemu_img(), "--version"], capture_output=True,
                                                  text=True).stdout.splitlines()[0],
                        "boto3": _version("boto3"), "kernel": platform.release(),
                        "loadAverage1mBeforeOurs": round(ours["loadBefore"], 2),
                        "loadAverage1mAfterOurs": round(ours["loadAfter"], 2),
                        "otherCpuSeconds": round(other, 2), "busy": busy},
            "compression": ours.get("compression"),
            "workdir": str(workdir),
        }
        targets = [(s["label"], s["pass"]) for s in steps if s["pass"] is not None]
        targets += [("peak RSS of our transfer process", report["rss"]["pass"]),
                    ("bytes sent vs allocated", report["bytes"]["pass"]),
                    ("target volume identical to the source", identical)]
        report["missed"] = [name for name, ok in targets if not ok]
        return report
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            progress(f"--keep: left {workdir} and the libvirt objects named {prefix}-* in place")
        else:
            progress("cleaning up")
            with contextlib.suppress(Exception):
                teardown(world)
            if created_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                for name in ("world", "store", "staging", "s3", "baseline.raw", "ours.job.json",
                             "ours.result.json", "boto3-upload.job.json", "boto3-upload.result.json"):
                    path = workdir / name
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# -- output ------------------------------------------------------------------------------------------------

def render(report: dict[str, Any]) -> str:
    d = report["disk"]
    lines = [
        f"disk: {d['virtualBytes'] / GiB:.3g} GiB virtual qcow2, {d['allocatedBytes'] / MiB:,.1f} MiB allocated "
        f"data in {d['dataExtents']} random blocks, file {d['qcow2FileBytes'] / MiB:,.1f} MiB "
        f"(MiB/s below = file size / seconds)",
        "",
    ]
    header = ("step", "seconds", "MiB/s", "baseline", "ratio", "target", "result")
    rows = []
    for s in report["steps"]:
        ratio = f"{s['ratio']:.2f}x {s['ratioKind']}" if s["ratio"] is not None else "-"
        result = "-" if s["pass"] is None else ("PASS" if s["pass"] else "FAIL")
        rows.append((s["label"], f"{s['seconds']:.2f}", f"{s['mibPerSecond']:,.0f}", s["baseline"] or "-", ratio,
                     s["target"] or "-", result))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i in (0, 3, 4, 5) else '>'}{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*header))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt.format(*r) for r in rows]
    r, b, c = report["rss"], report["bytes"], report["cpu"]
    lines += [
        "",
        f"peak RSS of our transfer process: {r['oursPeakMiB']:.1f} MiB in {r['oursPeakPhase']} "
        f"(target < {r['targetMiB']} MiB) {'PASS' if r['pass'] else 'FAIL'}; "
        f"boto3 baseline process: {r['boto3PeakMiB']:.1f} MiB",
        f"bytes sent: {b['sent']:,} vs allocated {b['allocated']:,} = {b['ratio']:.4f}x (target <= {b['target']}x) "
        f"{'PASS' if b['pass'] else 'FAIL'}; qcow2 file {b['qcow2FileBytes']:,}, stored {b['stored']:,}",
        f"whole migration vs qemu-img convert + fsync: {report['wholeMigrationVsDurableConvert']:.2f}x time",
        f"upload CPU seconds: boto3 {c['boto3UploadSeconds']:.1f} + S3 server {c['boto3UploadServerSeconds']:.1f} "
        f"+ other {c['boto3UploadOtherSeconds']:.1f}; ours {c['oursTransferSeconds']:.1f} + S3 server "
        f"{c['oursTransferServerSeconds']:.1f} + other {c['oursTransferOtherSeconds']:.1f} "
        f"({report['machine']['cpus']} CPUs; other = libvirtd, kernel, any other process)",
        f"qemu-img CPU seconds: baseline convert {c['baselineQemuImgSeconds']:.1f}, ours {c['oursQemuImgSeconds']:.1f}",
        "",
    ]
    ph_header = ("phase", "seconds", "our CPU s", "qemu-img CPU s", "S3 server CPU s", "other CPU s",
                 "peak RSS MiB")
    ph_rows = [(name, f"{e['seconds']:.2f}", f"{e['cpuSeconds']:.2f}", f"{e['qemuImgCpuSeconds']:.2f}",
                f"{e['serverCpuSeconds']:.2f}", f"{e['otherCpuSeconds']:.2f}", f"{e['peakRssMiB']:.0f}")
               for name, e in report["phases"].items()]
    widths = [max(len(str(x[i])) for x in [ph_header, *ph_rows]) for i in range(len(ph_header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines += [fmt.format(*ph_header), "  ".join("-" * w for w in widths), *[fmt.format(*x) for x in ph_rows]]
    m = report["machine"]
    lines += [
        "",
        f"target volume identical to the source (qemu-img compare): {report['targetIdenticalToSource']}",
        f"machine: {m['cpus']} CPUs, load average {m['loadAverage1mBeforeOurs']} before ours / "
        f"{m['loadAverage1mAfterOurs']} after, Python {m['python']}, {m['qemuImg']}, boto3 {m['boto3']}"
        + (f"; compression {report['compression']}" if report.get("compression") else ""),
        "",
        *([f"WARNING: other processes used {m['otherCpuSeconds']:.1f} CPU seconds during the boto3 and our runs: "
           f"the machine was busy and these numbers are unreliable; run again when it is idle"]
          if m.get("busy") else []),
        ("targets missed: " + "; ".join(report["missed"])) if report["missed"] else "all targets met",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Transfer benchmark: ours vs hashlib, boto3 and qemu-img.",
                                     epilog="See bench/README.md for what each number means.")
    parser.add_argument("--size-gib", type=float, default=4.0, help="virtual disk size in GiB (default 4)")
    parser.add_argument("--size-mib", type=int, default=None, help="virtual disk size in MiB (overrides --size-gib)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--workdir", default=None, help="where disks, S3 data, store and staging go "
                                                        "(default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir and the libvirt objects; a later "
                                                            "run with the same --workdir re-uses the disk")
    parser.add_argument("--prefix", default=None, help="libvirt name prefix (default: bench-<hash of workdir>)")
    parser.add_argument("--ours", metavar="JOB", help=argparse.SUPPRESS)
    parser.add_argument("--boto3-upload", metavar="JOB", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ours:
        return child_main("ours", args.ours)
    if args.boto3_upload:
        return child_main("boto3-upload", args.boto3_upload)
    try:
        report = run(args)
    except Exception as err:  # noqa: BLE001 - a benchmark that could not run says why and exits 1
        progress(f"FAILED: {type(err).__name__}: {err}")
        return 1
    print(json.dumps(report, indent=2) if args.json else render(report), flush=True)
    if report["missed"]:
        progress("targets missed: " + "; ".join(report["missed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
