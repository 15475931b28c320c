"""The state of the Proxmox VE test server: one JSON file in the server's work folder plus real storage folders.

Shared by the API server process (tests/servers/pve/api.py), the ``pvesm``/``qm`` stand-ins that SSH sessions
run (tests/servers/pve/commands.py) and the test helpers (tests/servers/pve/server.py), so every change goes
through ``Store.transaction()``: an exclusive ``flock`` on ``state.lock``, read, change, write to a temporary
file and ``os.replace`` it (a reader never sees half a file).

Storages are ``dir`` storages, one folder each (``<workdir>/storage/<id>/``) seen by every node:

- ``images/<vmid>/<file>`` for VM disks, ``import/<file>`` for import volumes (content ``import``, PVE 8.4+),
  ``template/iso/<file>`` for ISO images.
- Volume ids follow the storage's ``naming``: ``dir`` (PVE's dir plugin: ``local:100/vm-100-disk-0.qcow2``)
  or ``lvm`` (as on the guide's ``local-lvm`` LVM-thin storage: ``local-lvm:vm-100-disk-0``; the file is
  ``images/100/vm-100-disk-0.<format>``). Every format (raw, qcow2, vmdk) is allowed on both, unlike a real
  LVM-thin storage (raw only), so that tests can put qcow2 disks there.

Disk bytes are real: ``qemu-img`` creates, converts and snapshots the files.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DISK_KEY = re.compile(r"(ide|sata|scsi|virtio|efidisk|tpmstate)\d+")
UNUSED_KEY = re.compile(r"unused\d+")
NEW_DISK = re.compile(r"([a-z][a-z0-9\-_.]*[a-z0-9]):(\d+(?:\.\d+)?)")
FORMATS = ("raw", "qcow2", "vmdk")
IMPORT_EXT = re.compile(r"[\w.+\- ]+\.(qcow2|raw|vmdk)")

DEFAULT_STORAGES: dict[str, dict[str, Any]] = {
    "local": {"content": "images,import,iso", "naming": "dir"},
    "local-lvm": {"content": "images", "naming": "lvm"},
}
DEFAULT_BRIDGES = ("vmbr0", "vmbr1")


class PveError(Exception):
    """A failure a node reports as HTTP 500 (or in a task's exit status) with this message."""

    def __init__(self, message: str, status: int = 500, errors: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.errors = errors or {}


# -- sizes ----------------------------------------------------------------------------------------------------
def format_size(size: int) -> str:
    """Bytes as PVE writes them into a disk's ``size=``: the largest unit that divides evenly (``32G``, ``10M``)."""
    for unit in ("", "K", "M", "G"):
        if size % 1024:
            return f"{size}{unit}"
        size //= 1024
    return f"{size}T"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", text.strip())
    if not m:
        raise PveError(f"unable to parse size '{text}'")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def parse_prop(text: str, default_key: str = "file") -> dict[str, str]:
    """``local-lvm:vm-100-disk-0,size=32G`` -> {"file": "local-lvm:vm-100-disk-0", "size": "32G"} (order kept)."""
    out: dict[str, str] = {}
    for part in [p for p in str(text).split(",") if p]:
        key, sep, value = part.partition("=")
        if sep:
            out[key] = value
        else:
            out[default_key] = part
    return out


def join_prop(props: dict[str, str], default_key: str = "file") -> str:
    head = [props[default_key]] if default_key in props else []
    return ",".join(head + [f"{k}={v}" for k, v in props.items() if k != default_key])


def image_info(path: Path) -> tuple[str, int]:
    """(format, virtual size in bytes) of a disk image: qcow2 from its header, raw from its length, others by
    ``qemu-img info``."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head[:4] == b"QFI\xfb":
        return "qcow2", struct.unpack(">Q", head[24:32])[0]
    if head[:4] == b"KDMV" or path.suffix == ".vmdk":
        out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True)
        if out.returncode == 0:
            info = json.loads(out.stdout)
            return info["format"], int(info["virtual-size"])
    return "raw", path.stat().st_size


def qemu_img(*args: str) -> str:
    """Run qemu-img; a failure becomes a PveError with its stderr (as a node's task would report it)."""
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PveError(f"qemu-img {args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


# -- the store ------------------------------------------------------------------------------------------------
class Store:
    """The state file and the storage folders of one test server."""

    def __init__(self, workdir: Path | str):
        self.workdir = Path(workdir)
        self.file = self.workdir / "state.json"
        self.lock_file = self.workdir / "state.lock"

    # state file
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with open(self.lock_file, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        return json.loads(self.file.read_text())

    def _write(self, state: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.workdir, prefix=".state-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=1, sort_keys=True)
        os.replace(tmp, self.file)

    def read(self) -> dict[str, Any]:
        """A snapshot of the state (a copy: changing it changes nothing)."""
        with self.locked():
            return self._read()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        """The state under the lock; written back (atomically) if the block ends without an exception."""
        with self.locked():
            state = self._read()
            before = copy.deepcopy(state)
            yield state
            if state != before:
                self._write(state)

    def initialise(self, nodes: tuple[str, ...], storages: dict[str, dict[str, Any]],
                   bridges: tuple[str, ...] = DEFAULT_BRIDGES) -> None:
        """A fresh cluster: the nodes, the storages (their folders made), the bridges; no VMs, no tasks."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {
            "nodes": {n: {"bridges": list(bridges)} for n in nodes},
            "storages": {},
            "vms": {},
            "tasks": {},
            "counter": 0,
        }
        for sid, spec in storages.items():
            root = self.workdir / "storage" / sid
            for sub in ("images", "import", "template/iso"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            state["storages"][sid] = {"type": "dir", "path": str(root), "content": spec.get("content", "images"),
                                      "naming": spec.get("naming", "dir"), "shared": 0}
        with self.locked():
            self._write(state)

    # storages and volumes
    @staticmethod
    def storage(state: dict[str, Any], sid: str) -> dict[str, Any]:
        found = state["storages"].get(sid)
        if found is None:
            raise PveError(f"storage '{sid}' does not exist")
        return found

    @staticmethod
    def split_volid(volid: str) -> tuple[str, str]:
        sid, sep, name = volid.partition(":")
        if not sep or not name or not re.fullmatch(r"[a-z][a-z0-9\-_.]*[a-z0-9]", sid):
            raise PveError(f"unable to parse volume ID '{volid}'")
        return sid, name

    def volume_path(self, state: dict[str, Any], volid: str) -> Path:
        """Where a volume's bytes are (the file need not exist, as with ``pvesm path``)."""
        sid, name = self.split_volid(volid)
        root = Path(self.storage(state, sid)["path"])
        if name.startswith("import/"):
            return root / name
        if name.startswith("iso/"):
            return root / "template" / name
        m = re.fullmatch(r"(\d+)/((?:vm|base)-\d+-disk-\d+\.(?:raw|qcow2|vmdk))", name)
        if m:
            return root / "images" / m.group(1) / m.group(2)
        m = re.fullmatch(r"(?:vm|base)-(\d+)-disk-\d+", name)
        if m:
            folder = root / "images" / m.group(1)
            for fmt in FORMATS:
                if (folder / f"{name}.{fmt}").exists():
                    return folder / f"{name}.{fmt}"
            return folder / f"{name}.raw"
        raise PveError(f"unable to parse directory volume name '{name}'")

    def volume_vmid(self, volid: str) -> int | None:
        m = re.search(r"(?:vm|base)-(\d+)-disk-\d+", volid)
        return int(m.group(1)) if m else None

    def list_volumes(self, state: dict[str, Any], sid: str) -> list[dict[str, Any]]:
        """The storage's content as ``GET .../content`` lists it, from the folder itself."""
        spec = self.storage(state, sid)
        root = Path(spec["path"])
        out: list[dict[str, Any]] = []
        images = root / "images"
        for folder in sorted(images.iterdir()) if images.is_dir() else []:
            for file in sorted(folder.iterdir()):
                m = re.fullmatch(r"((?:vm|base)-(\d+)-disk-\d+)\.(raw|qcow2|vmdk)", file.name)
                if not m or file.name.startswith("."):
                    continue
                name = m.group(1) if spec["naming"] == "lvm" else f"{folder.name}/{file.name}"
                fmt, size = image_info(file)
                out.append({"volid": f"{sid}:{name}", "content": "images", "format": fmt, "size": size,
                            "used": file.stat().st_blocks * 512, "vmid": int(m.group(2)),
                            "ctime": int(file.stat().st_mtime)})
        for file in sorted((root / "import").iterdir()) if (root / "import").is_dir() else []:
            if file.is_file() and IMPORT_EXT.fullmatch(file.name):
                out.append({"volid": f"{sid}:import/{file.name}", "content": "import", "format": file.suffix[1:],
                            "size": file.stat().st_size, "ctime": int(file.stat().st_mtime)})
        iso = root / "template" / "iso"
        for file in sorted(iso.iterdir()) if iso.is_dir() else []:
            if file.is_file() and not file.name.startswith("."):
                out.append({"volid": f"{sid}:iso/{file.name}", "content": "iso", "format": "iso",
                            "size": file.stat().st_size, "ctime": int(file.stat().st_mtime)})
        return out

    def allocate(self, state: dict[str, Any], sid: str, vmid: int, fmt: str) -> tuple[str, Path]:
        """A new ``vm-<vmid>-disk-<n>`` volume name (lowest free n on that storage), reserved by an empty file.

        Call under the lock; fill the file outside it."""
        spec = self.storage(state, sid)
        if "images" not in spec["content"].split(","):
            raise PveError(f"storage '{sid}' does not support content-type 'images'")
        if fmt not in FORMATS:
            raise PveError(f"unsupported format '{fmt}'")
        folder = Path(spec["path"]) / "images" / str(vmid)
        folder.mkdir(parents=True, exist_ok=True)
        n = 0
        while any((folder / f"vm-{vmid}-disk-{n}.{f}").exists() for f in FORMATS):
            n += 1
        path = folder / f"vm-{vmid}-disk-{n}.{fmt}"
        path.touch()
        name = f"vm-{vmid}-disk-{n}" if spec["naming"] == "lvm" else f"{vmid}/vm-{vmid}-disk-{n}.{fmt}"
        return f"{sid}:{name}", path

    def source_path(self, state: dict[str, Any], source: str) -> Path:
        """The file behind an ``import-from`` source: a volume id or an absolute path; it must exist."""
        path = Path(source) if source.startswith("/") else self.volume_path(state, source)
        if not path.is_file():
            raise PveError(f"volume '{source}' does not exist" if not source.startswith("/")
                           else f"source '{source}' does not exist")
        return path

    def import_image(self, vmid: int, source: Path, sid: str, fmt: str | None,
                     log: Any = None) -> tuple[str, int]:
        """Copy ``source`` into a new volume of ``sid`` for VM ``vmid`` with ``qemu-img convert`` (the source's
        format kept unless ``fmt`` is given); (volid, virtual size). The volume is removed again on failure."""
        src_fmt, size = image_info(source)
        target_fmt = fmt or (src_fmt if src_fmt in FORMATS else "raw")
        if self.read()["storages"][sid].get("naming") == "lvm":  # LVM-thin holds raw volumes only
            if fmt not in (None, "raw"):
                raise PveError(f"unsupported format '{fmt}'")
            target_fmt = "raw"
        with self.transaction() as state:
            volid, path = self.allocate(state, sid, vmid, target_fmt)
        try:
            if log:
                log(f"transferred 0.0 B of {human(size)} (0.00%)")
            qemu_img("convert", "-f", src_fmt, "-O", target_fmt, str(source), str(path))
            if log:
                log(f"transferred {human(size)} of {human(size)} (100.00%)")
        except Exception:
            path.unlink(missing_ok=True)
            raise
        return volid, size

    def new_image(self, vmid: int, sid: str, fmt: str, size: int) -> str:
        if self.read()["storages"][sid].get("naming") == "lvm" and fmt != "raw":
            raise PveError(f"unsupported format '{fmt}'")
        with self.transaction() as state:
            volid, path = self.allocate(state, sid, vmid, fmt)
        try:
            qemu_img("create", "-q", "-f", fmt, str(path), str(size))
        except Exception:
            path.unlink(missing_ok=True)
            raise
        return volid

    # VMs
    @staticmethod
    def vm(state: dict[str, Any], node: str, vmid: int | str) -> dict[str, Any]:
        found = state["vms"].get(str(vmid))
        if found is None or found["node"] != node:
            raise PveError(f"Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist")
        return found

    @staticmethod
    def next_unused(config: dict[str, Any]) -> str:
        n = 0
        while f"unused{n}" in config:
            n += 1
        return f"unused{n}"


def volumes_of(config: dict[str, Any], *, unused: bool = True) -> list[tuple[str, str]]:
    """(config key, volume id) of every disk in a VM config that is a storage volume (not a CD-ROM drive with
    ``none``/``cdrom``, not an absolute path)."""
    out = []
    for key, value in config.items():
        if DISK_KEY.fullmatch(key) or (unused and UNUSED_KEY.fullmatch(key)):
            props = parse_prop(value)
            file = props.get("file", "")
            if props.get("media") == "cdrom" or file in ("none", "cdrom", "") or file.startswith("/"):
                continue
            out.append((key, file))
    return out


def human(size: float) -> str:
    """Sizes as PVE's task logs print them (``2.0 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def now() -> int:
    return int(time.time())


def remove_volume_file(path: Path) -> None:
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # images/<vmid>/ once empty


def snap_file(path: Path, name: str) -> Path:
    """The snapshot volume of an LVM-thin volume's file (``snap_vm-100-disk-0_<snapname>``, as LVM names it)."""
    return path.parent / f"snap_{path.stem}_{name}{path.suffix}"


def guest_write(path: Path, fmt: str) -> None:
    """What a running guest does to a disk: 1 MiB of 0xee written at its start (on a qcow2 through qemu-io, so
    that a cluster a snapshot holds is copied, as QEMU does)."""
    if fmt == "qcow2":
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xee 0 1M", str(path)], check=True,
                       capture_output=True)
    else:
        with open(path, "r+b") as fh:
            fh.write(b"\xee" * (1 << 20))


def copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
