"""vSphere leg of the benchmarks: a disk exported from a vCenter snapshot through NFC into S3.

In one run, on the same disk:

- **plain**: what a user would script instead: pyvmomi ``ExportSnapshot()``, ``requests`` streaming the
  lease's device URL straight into boto3 ``upload_fileobj`` (stock client, default TransferConfig), no hash;
- **ours**: the engine's Validating, Snapshotting, Exporting and Transferring phases for that VM (the
  export streamed into S3, hashed once, with a manifest);
- **libvirt**: ``bench/transfer_bench.py`` on a disk of the same size, for its ``export_to_s3`` figure
  (libvirt's volume download into S3), printed beside it (skip it with ``--no-libvirt``).

The simulator (govmomi's vcsim, tests/servers/vsphere.py) serves the snapshot's export from the datastore file
on this machine, so the figures measure the engine's NFC client and S3 path, not a real ESXi's export speed.
Exits 0 once it has run; 1 only if something failed.

    .venv/bin/python bench/vsphere_bench.py --size-mib 1024 [--json] [--no-libvirt]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "plugins"))

MiB = 1 << 20
BUCKET = "bench-vsphere"


def progress(message: str) -> None:
    print(f"[vsphere-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_vm(server: Any, work: Path, size_mib: int) -> tuple[str, Path]:
    """A VM with one streamOptimized disk: 64 MiB of random data alternating with 64 MiB holes (the VM made by
    the tests' helper, its disk file then replaced by this one)."""
    from include.diskio import qemu_img_path
    from tests.e2e import vsphere_world as vw

    name = "bench-vm"
    helper = work / "helper"
    helper.mkdir()
    vw.create_vm(server, name, [("a", size_mib)], work=helper)
    raw = work / "bench.raw"
    with open(raw, "wb") as fh:
        fh.truncate(size_mib * MiB)
        for start in range(0, size_mib, 128):
            fh.seek(start * MiB)
            for _ in range(min(64, size_mib - start)):
                fh.write(os.urandom(MiB))
    disk = server.datastore_path("datastore1", f"{name}/{name}-a.vmdk")
    subprocess.run([qemu_img_path(), "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(raw), str(disk)], check=True)
    raw.unlink()
    return name, disk


def plain_export(server: Any, vm_name: str, s3: Any) -> dict[str, Any]:
    """pyvmomi + requests + boto3, as a script would do it."""
    import boto3
    import requests
    from botocore.config import Config
    from pyVmomi import vim

    from tests.e2e import vsphere_world as vw

    si, vm = vw.find_vm(server, vm_name)
    try:
        task = vm.CreateSnapshot_Task(name="plain", description="bench", memory=False, quiesce=False)
        vw._wait(task)
        snap = vm.snapshot.rootSnapshotList[0].snapshot
        client = boto3.session.Session().client(
            "s3", endpoint_url=s3.endpoint, region_name=s3.region, aws_access_key_id=s3.access_key,
            aws_secret_access_key=s3.secret_key, config=Config(s3={"addressing_style": "path"}))
        began = time.perf_counter()
        lease = snap.ExportSnapshot()
        while lease.state != vim.HttpNfcLease.State.ready:
            time.sleep(0.05)
        url = lease.info.deviceUrl[0].url.replace("*", f"127.0.0.1:{server.port}")
        with requests.get(url, stream=True, verify=str(server.ca_file), headers={
                "Cookie": server.session_cookie(si)}, timeout=60) as resp:
            resp.raise_for_status()
            resp.raw.decode_content = True
            client.upload_fileobj(resp.raw, BUCKET, "plain/disk.vmdk")
        lease.HttpNfcLeaseComplete()
        seconds = time.perf_counter() - began
        stored = int(client.head_object(Bucket=BUCKET, Key="plain/disk.vmdk")["ContentLength"])
        vw._wait(snap.RemoveSnapshot_Task(removeChildren=False))
    finally:
        server.disconnect(si)
    return {"seconds": seconds, "bytes": stored}


def ours_export(server: Any, vm_name: str, s3: Any, work: Path) -> dict[str, Any]:
    from include import phases
    from include.demo import write_store
    from include.store import SpecStore
    from tests.e2e import vsphere_world as vw

    store = work / "store"
    os.environ["VMMIGRATION_STORE"] = str(store)
    os.environ["VMMIGRATION_STAGING"] = str(work / "staging")
    docs = [
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
         "metadata": {"name": "bench", "namespace": "default"},
         "spec": {"sourceName": vm_name, "targetProviderRef": {"name": "vc"}, "targetName": f"{vm_name}-copy",
                  "targetStorageHint": "datastore2",
                  "storage": {"type": "s3", "bucket": BUCKET, "endpoint": s3.endpoint, "region": s3.region,
                              "credentialsSecretRef": {"name": "s3"}}}},
        vw.vm_doc(vm_name, "default", "vc", vm_name),
        *vw.provider_docs(server, "vc"),
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": "default"},
         "stringData": {"accessKey": s3.access_key, "secretKey": s3.secret_key}},
    ]
    write_store(store, "bench.yaml", docs)
    ctx = phases.MigrationContext("default", "bench", store=SpecStore(store))
    try:
        disks = phases.validate(ctx)["disks"]
        phases.snapshot(ctx)
        began = time.perf_counter()
        for disk in disks:
            phases.export_disk(ctx, disk)
            phases.transfer_disk(ctx, disk)
        seconds = time.perf_counter() - began
        sent = sum(ctx.disk_record(d).sent_bytes or 0 for d in disks)
    finally:
        phases.finalize(ctx, succeeded=False, failure="benchmark: only the export is measured")
        ctx.close()
    return {"seconds": seconds, "bytes": sent}


def libvirt_export(size_mib: int, work: Path) -> dict[str, Any] | None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "transfer_bench.py"), "--size-mib", str(size_mib),
                           "--json", "--workdir", str(work / "libvirt")], capture_output=True, text=True,
                          env={**os.environ, "VMMIGRATION_ALLOW_LOOPBACK": "true"}, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        progress(f"libvirt leg failed: {proc.stderr[-800:]}")
        return None
    steps = {s["step"]: s for s in json.loads(proc.stdout)["steps"]}
    return {"seconds": steps["export_to_s3"]["seconds"], "mibPerSecond": steps["export_to_s3"]["mibPerSecond"],
            "boto3MibPerSecond": steps["boto3_upload"]["mibPerSecond"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.servers.s3 import start_s3_server
    from tests.servers.vsphere import start_vcsim

    os.environ["VMMIGRATION_ALLOW_LOOPBACK"] = "true"
    work = Path(tempfile.mkdtemp(prefix="vsphere-bench-"))
    server = start_vcsim(work / "vcsim")
    s3 = start_s3_server(work / "s3")
    try:
        s3.create_bucket(BUCKET)
        progress(f"building a {args.size_mib} MiB VM disk (half data)")
        vm, disk = make_vm(server, work, args.size_mib)
        export_bytes = disk.stat().st_size
        progress("plain: pyvmomi + requests + boto3 upload_fileobj")
        plain = plain_export(server, vm, s3)
        progress("ours: Validating, Snapshotting, Exporting, Transferring")
        ours = ours_export(server, vm, s3, work)
    finally:
        s3.stop()
        server.stop()
    libvirt = None if args.no_libvirt else libvirt_export(args.size_mib, work)
    rate = {k: export_bytes / MiB / v["seconds"] for k, v in (("plain", plain), ("ours", ours))}
    return {"sizeMiB": args.size_mib, "exportMiB": round(export_bytes / MiB, 1),
            "plain": {**plain, "mibPerSecond": round(rate["plain"], 1)},
            "ours": {**ours, "mibPerSecond": round(rate["ours"], 1)},
            "ratio": round(rate["ours"] / rate["plain"], 2), "libvirt": libvirt}


def render(report: dict[str, Any]) -> str:
    lines = [f"vSphere NFC export -> S3, {report['sizeMiB']} MiB disk ({report['exportMiB']} MiB streamOptimized "
             f"export)",
             f"  plain (pyvmomi+requests+boto3)  {report['plain']['seconds']:7.2f} s  "
             f"{report['plain']['mibPerSecond']:7.1f} MiB/s",
             f"  ours  (export+transfer phases)  {report['ours']['seconds']:7.2f} s  "
             f"{report['ours']['mibPerSecond']:7.1f} MiB/s   ratio ours/plain {report['ratio']:.2f}"]
    lib = report.get("libvirt")
    if lib:
        lines.append(f"  libvirt export -> S3 (same size) {lib['seconds']:6.2f} s  {lib['mibPerSecond']:7.1f} MiB/s "
                     f"(boto3 upload_file of the qcow2: {lib['boto3MibPerSecond']:.1f} MiB/s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-libvirt", action="store_true", help="skip the libvirt leg")
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except Exception as err:  # noqa: BLE001 - a benchmark reports and exits 1
        progress(f"failed: {err}")
        return 1
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
