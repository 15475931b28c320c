"""A demo (and test) world on a real libvirtd: two dir pools, a source VM with two disks of real
data, and the spec-store documents that describe a migration of it through an NFS-style folder.

Used by ``make demo`` and by the end-to-end tests. Nothing here touches anything it did not create:
every pool, volume and domain name starts with the given prefix.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from include.diskio import qemu_img_path

MiB = 1024 * 1024


@dataclass
class DemoWorld:
    uri: str
    prefix: str
    root: Path  # where pools, share and store live

    @property
    def source_pool(self) -> str:
        return f"{self.prefix}-src"

    @property
    def target_pool(self) -> str:
        return f"{self.prefix}-dst"

    @property
    def vm_name(self) -> str:
        return f"{self.prefix}-vm"

    @property
    def share(self) -> Path:
        return self.root / "nfs-share"

    def conn(self):
        import libvirt

        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        return libvirt.open(self.uri)


def ensure_pool(conn, name: str, path: Path) -> Any:
    import libvirt

    path.mkdir(parents=True, exist_ok=True)
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        pool = conn.storagePoolDefineXML(
            f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>", 0)
    if not pool.isActive():
        pool.create(0)
    pool.setAutostart(0)
    pool.refresh(0)
    return pool


def ensure_world_pools(conn, world: DemoWorld) -> tuple[Any, Path]:
    """The world's source and target pools (made if missing); returns the source pool and its folder."""
    src = world.root / "pools" / "src"
    pool = ensure_pool(conn, world.source_pool, src)
    ensure_pool(conn, world.target_pool, world.root / "pools" / "dst")
    return pool, src


def _write_pattern(path: Path, size: int, extents: list[tuple[int, int]], seed: int) -> str:
    """A sparse raw image of ``size`` bytes with random data at ``extents`` (offset, length)."""
    rng = random.Random(seed)
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset, length in extents:
            fh.seek(offset)
            left = length
            while left:
                n = min(left, 4 * MiB)
                fh.write(rng.randbytes(n))
                left -= n
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(4 * MiB), b""):
            h.update(block)
    return h.hexdigest()


def create_source_vm(world: DemoWorld, *, vda_mib: int = 256, vdb_mib: int = 128, data_scale: float = 1.0,
                     vdb_format: str = "qcow2") -> dict:
    """Create (if missing) the source pool and a shut-off VM with a qcow2 vda and a sparse raw vdb.

    Returns the guest-visible sha256 of each disk (raw content), to compare after migration.
    """
    conn = world.conn()
    try:
        pool, pool_dir = ensure_world_pools(conn, world)
        vda = pool_dir / f"{world.vm_name}-vda.qcow2"
        vdb = pool_dir / f"{world.vm_name}-vdb.{vdb_format}"
        sums = {}
        if not vda.exists():
            raw = pool_dir / ".vda.raw.tmp"
            d = int(32 * MiB * data_scale)
            sums["vda"] = _write_pattern(raw, vda_mib * MiB, [(0, 2 * d), (vda_mib * MiB // 2, d)], seed=1)
            subprocess.run([qemu_img_path(), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(vda)], check=True)
            raw.unlink()
        if not vdb.exists():
            d = int(16 * MiB * data_scale)
            raw = vdb if vdb_format == "raw" else pool_dir / ".vdb.raw.tmp"
            sums["vdb"] = _write_pattern(raw, vdb_mib * MiB, [(MiB, d), (vdb_mib * MiB - d, d)], seed=2)
            if raw != vdb:
                subprocess.run([qemu_img_path(), "convert", "-f", "raw", "-O", vdb_format, str(raw), str(vdb)],
                               check=True)
                raw.unlink()
        os.chmod(vda, 0o644)
        os.chmod(vdb, 0o644)
        pool.refresh(0)
        try:
            conn.lookupByName(world.vm_name)
        except Exception:  # noqa: BLE001 - libvirtError: not defined yet
            conn.defineXML(
                f"<domain type='kvm'><name>{world.vm_name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>"
                f"<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
                f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{vda}'/>"
                f"<target dev='vda' bus='virtio'/></disk>"
                f"<disk type='file' device='disk'><driver name='qemu' type='{vdb_format}'/><source file='{vdb}'/>"
                f"<target dev='vdb' bus='virtio'/></disk>"
                f"<disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>"
                f"</devices></domain>")
        return sums
    finally:
        conn.close()


def store_documents(world: DemoWorld, *, name: str = "demo", namespace: str = "default",
                    target_format: str | None = "raw", bridge: str = "virbr0", cpu: int = 2,
                    memory: int = 512, extra_spec: dict | None = None) -> list[dict[str, Any]]:
    """The VMMigration and the inventory it needs: a VirtualMachine and two libvirt Providers."""
    spec: dict[str, Any] = {
        "sourceName": world.vm_name,
        "sourceNamespace": namespace,
        "targetProviderRef": {"name": f"{world.prefix}-kvm-target", "namespace": namespace},
        "targetName": f"{world.vm_name}-migrated",
        "targetStorageHint": world.target_pool,
        "targetNetworkHints": [{"name": "eth0", "bridge": bridge}],
        "targetResourceHints": {"cpu": cpu, "memory": memory},
        "storage": {"type": "nfs", "path": str(world.share), "endpoint": "nfs.local"},
        "cleanupPolicy": {"deleteIntermediate": True, "deleteSnapshot": True, "deleteSource": False},
        "retryPolicy": {"maxAttempts": 2, "backoffDuration": "5s", "maxBackoffDuration": "10s"},
    }
    if target_format:
        spec["targetDiskFormat"] = target_format
    spec.update(extra_spec or {})
    provider = {"type": "libvirt", "endpoint": world.uri,
                "runtime": {"mode": "Remote", "image": "virtrigaud/provider-libvirt:latest"},
                "credentialSecretRef": {"name": f"{world.prefix}-libvirt-creds"}}
    return [
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
         "metadata": {"name": name, "namespace": namespace}, "spec": spec},
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VirtualMachine",
         "metadata": {"name": world.vm_name, "namespace": namespace},
         "spec": {"providerRef": {"name": f"{world.prefix}-kvm-source"}, "classRef": {"name": "small"},
                  "powerState": "Off"},
         "status": {"id": world.vm_name}},
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "Provider",
         "metadata": {"name": f"{world.prefix}-kvm-source", "namespace": namespace}, "spec": provider},
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "Provider",
         "metadata": {"name": f"{world.prefix}-kvm-target", "namespace": namespace}, "spec": provider},
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": f"{world.prefix}-libvirt-creds", "namespace": namespace},
         "type": "Opaque", "stringData": {"username": "root"}},
    ]


def write_store(store_root: Path, filename: str, docs: list[dict[str, Any]]) -> Path:
    store_root.mkdir(parents=True, exist_ok=True)
    path = store_root / filename
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def teardown(world: DemoWorld, *, delete_volumes: bool = True) -> None:
    """Remove every domain and pool whose name starts with the world's prefix, and their volumes
    unless ``delete_volumes`` is False (the files then stay, to be defined again later)."""
    import libvirt

    conn = world.conn()
    try:
        for dom in conn.listAllDomains(0):
            if dom.name().startswith(world.prefix):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        for pool in conn.listAllStoragePools(0):
            if pool.name().startswith(world.prefix):
                if pool.isActive():
                    for vol in pool.listAllVolumes(0) if delete_volumes else ():
                        vol.delete(0)
                    pool.destroy()
                pool.undefine()
    finally:
        conn.close()
