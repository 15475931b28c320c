"""Stand-ins for the node commands a migration runs over SSH: ``pvesm`` and ``qm``, acting on the test server's
state file and storage folders (tests/servers/pve/state.py, same lock as the API server).

Run as ``python -m tests.servers.pve.commands WORKDIR NODE pvesm|qm ARGS...``; the SSH server of each node puts
a ``bin/`` folder first in PATH (sshd_config ``SetEnv``) whose ``pvesm`` and ``qm`` scripts do exactly that.

- ``pvesm path VOLID`` prints the file of a volume (it need not exist, as on a node);
- ``pvesm list STORAGE [--content C] [--vmid N]`` prints PVE's table (Volid Format Type Size VMID);
- ``pvesm status`` prints the storages (Name Type Status Total Used Available %);
- ``pvesm export VOLID raw+size -`` writes PVE's ``raw+size`` stream to stdout (the size as a little-endian u64,
  then the raw bytes) of a raw volume; ``--snapshot`` is refused as a real node refuses it (LVM-thin's plugin
  dies "cannot export a snapshot", a directory storage's has no such format);
- ``qm importdisk VMID FILE STORAGE [--format F]`` and ``qm disk import ...`` copy FILE into a new
  ``vm-<vmid>-disk-<n>`` volume (``qemu-img convert``; the source format kept unless ``--format``) and add it
  to the VM's config as ``unused<N>``, printing ``Successfully imported disk as 'unused0:local-lvm:vm-100-disk-1'``;
- ``lvchange -ay|-an [-K|-Ky] VG/LV`` and ``lvs --noheadings -o lv_path VG/LV`` for the LVM-thin storage's
  snapshot volumes (``pve/snap_vm-100-disk-0_<snapname>``, the copy a snapshot made): activating one makes
  ``lvs`` print its path (the snapshot file); one not activated, or not there, fails as LVM does;
- ``qm config VMID`` prints the config as ``key: value`` lines; ``qm status VMID`` prints ``status: stopped``.

Errors go to stderr with exit status 255, as PVE's perl tools exit on ``die``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import sys
from pathlib import Path

from tests.servers.pve.state import PveError, Store, image_info, snap_file


def pvesm(store: Store, node: str, args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pvesm")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("path").add_argument("volume")
    lst = sub.add_parser("list")
    lst.add_argument("storage")
    lst.add_argument("--content")
    lst.add_argument("--vmid", type=int)
    sub.add_parser("status")
    exp = sub.add_parser("export")
    exp.add_argument("volume")
    exp.add_argument("format", choices=("raw+size", "qcow2+size", "vmdk+size", "zfs", "tar+size", "btrfs"))
    exp.add_argument("filename")
    exp.add_argument("--snapshot")
    exp.add_argument("--base")
    exp.add_argument("--with-snapshots", type=int, default=0)
    opts = parser.parse_args(args)
    state = store.read()
    if opts.cmd == "path":
        print(store.volume_path(state, opts.volume))
    elif opts.cmd == "list":
        rows = store.list_volumes(state, opts.storage)
        rows = [r for r in rows if (not opts.content or r["content"] == opts.content)
                and (opts.vmid is None or r.get("vmid") == opts.vmid)]
        width = max([len("Volid"), *(len(r["volid"]) for r in rows)])
        print(f"{'Volid':<{width}} {'Format':<6} {'Type':<12} {'Size':>12} VMID")
        for r in rows:
            print(f"{r['volid']:<{width}} {r['format']:<6} {r['content']:<12} {r['size']:>12} {r.get('vmid', '')}")
    elif opts.cmd == "export":
        return export(store, state, opts)
    else:
        print(f"{'Name':<12} {'Type':<8} {'Status':<8} {'Total':>14} {'Used':>14} {'Available':>14} {'%':>8}")
        for sid, spec in state["storages"].items():
            usage = shutil.disk_usage(spec["path"])
            print(f"{sid:<12} {'dir':<8} {'active':<8} {usage.total // 1024:>14} {usage.used // 1024:>14} "
                  f"{usage.free // 1024:>14} {100 * usage.used / usage.total:>7.2f}%")
    return 0


def export(store: Store, state: dict, opts: argparse.Namespace) -> int:
    sid, _ = store.split_volid(opts.volume)
    lvm = store.storage(state, sid).get("naming") == "lvm"
    kind = "LvmThinPlugin" if lvm else "DirPlugin"
    if opts.snapshot and lvm:  # LVMPlugin's volume_export, which LvmThinPlugin inherits, has always refused it
        raise PveError(f"cannot export a snapshot in PVE::Storage::{kind}")
    if opts.format != "raw+size" or opts.with_snapshots or opts.base or opts.snapshot:
        raise PveError(f"volume export format {opts.format} not available for PVE::Storage::{kind}")
    if opts.filename != "-":
        raise PveError("the test server's pvesm export writes to stdout only ('-')")
    path = store.volume_path(state, opts.volume)
    fmt, size = image_info(path)
    if fmt != "raw":
        raise PveError(f"volume export format {opts.format} not available for PVE::Storage::{kind} ({fmt})")
    out = sys.stdout.buffer
    out.write(struct.pack("<Q", size))
    with open(path, "rb") as fh:
        shutil.copyfileobj(fh, out, 1 << 20)
    out.flush()
    return 0


def qm_import(store: Store, node: str, vmid: int, source: str, storage: str, fmt: str | None) -> int:
    state = store.read()
    store.vm(state, node, vmid)
    store.storage(state, storage)
    path = Path(source) if source.startswith("/") else store.source_path(state, source)
    if not path.is_file():
        raise PveError(f"source '{source}' does not exist")
    print(f"importing disk '{source}' to VM {vmid} ...", flush=True)
    volid, _ = store.import_image(vmid, path, storage, fmt, lambda line: print(line, flush=True))
    with store.transaction() as state:
        config = store.vm(state, node, vmid)["config"]
        key = store.next_unused(config)
        config[key] = volid
    print(f"Successfully imported disk as '{key}:{volid}'")
    return 0


def qm(store: Store, node: str, args: list[str]) -> int:
    if args[:2] == ["disk", "import"]:
        args = ["importdisk", *args[2:]]
    parser = argparse.ArgumentParser(prog="qm")
    sub = parser.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("importdisk")
    imp.add_argument("vmid", type=int)
    imp.add_argument("source")
    imp.add_argument("storage")
    imp.add_argument("--format", choices=("raw", "qcow2", "vmdk"))
    sub.add_parser("config").add_argument("vmid", type=int)
    sub.add_parser("status").add_argument("vmid", type=int)
    opts = parser.parse_args(args)
    if opts.cmd == "importdisk":
        return qm_import(store, node, opts.vmid, opts.source, opts.storage, opts.format)
    vm = store.vm(store.read(), node, opts.vmid)
    if opts.cmd == "config":
        for key, value in sorted(vm["config"].items()):
            print(f"{key}: {value}")
    else:
        print(f"status: {vm['status']}")
    return 0


def _snapshot_lv(store: Store, name: str) -> Path:
    """The file of an LVM-thin snapshot volume ``pve/snap_<volname>_<snap>`` (Failed to find... when absent)."""
    vg, _, lv = name.partition("/")
    state = store.read()
    found = re.fullmatch(r"snap_(vm-\d+-disk-\d+)_(\w+)", lv)
    for sid, spec in state["storages"].items():
        if found and vg == "pve" and spec.get("naming") == "lvm":
            path = snap_file(store.volume_path(state, f"{sid}:{found.group(1)}"), found.group(2))
            if path.is_file():
                return path
    raise PveError(f"  Failed to find logical volume \"{name}\"")


def lvm(store: Store, tool: str, args: list[str]) -> int:
    active = store.workdir / "lvm-active.json"
    marks = json.loads(active.read_text()) if active.exists() else []
    if tool == "lvchange":
        parser = argparse.ArgumentParser(prog="lvchange")
        parser.add_argument("-a", dest="activate", choices=("y", "n"), required=True)
        parser.add_argument("-K", dest="ignore_skip", nargs="?", const="y", choices=("y", "n"))
        parser.add_argument("lv")
        opts = parser.parse_args([a.replace("-ay", "-ay") for a in args])
        _snapshot_lv(store, opts.lv)
        if opts.activate == "y" and opts.ignore_skip != "y":
            raise PveError(f"  Logical volume {opts.lv} is skipped from activation (use -K)")
        marks = sorted(set(marks) | {opts.lv}) if opts.activate == "y" else [m for m in marks if m != opts.lv]
        active.write_text(json.dumps(marks))
        return 0
    parser = argparse.ArgumentParser(prog="lvs")
    parser.add_argument("--noheadings", action="store_true")
    parser.add_argument("-o", dest="fields", default="lv_path")
    parser.add_argument("lv")
    opts = parser.parse_args(args)
    path = _snapshot_lv(store, opts.lv)
    if opts.lv not in marks:
        raise PveError(f"  {opts.lv}: the volume is not active (lv_path is empty for an inactive volume)")
    print(f"  {path}")
    return 0


def main(argv: list[str]) -> int:
    workdir, node, tool, *args = argv
    store = Store(workdir)
    try:
        if tool in ("lvchange", "lvs"):
            return lvm(store, tool, args)
        return pvesm(store, node, args) if tool == "pvesm" else qm(store, node, args)
    except PveError as exc:
        print(exc.message, file=sys.stderr)
        return 255


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
