"""Running guests on the real libvirtd for the running-source and boot-check tests: the test guest of
``tests/guest`` (booted under KVM, writing records to its vdb), a host bridge of its own with no uplink,
and folders QEMU's user can reach."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from include.demo import DemoWorld, ensure_world_pools
from include.diskio import qemu_img_path
from include.providers.libvirt_live import AGENT_CHANNEL, SerialConsole

ROOT = Path(__file__).resolve().parents[2]
MARKER = "VMMIGRATION-GUEST-BOOTED"
MiB = 1024 * 1024


def build_guest() -> Path:
    proc = subprocess.run(["bash", str(ROOT / "tests" / "guest" / "build_guest.sh")], capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"building the test guest failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def virt_type() -> str:
    """The domain type that runs the test guest here (``tests/guest/virt.py``): kvm, or qemu (TCG) on a host
    whose KVM cannot run it (kvm_pvm in a Firecracker VM: SYSLINUX stops on an emulation failure)."""
    from tests.guest.virt import virt_type as guest_virt

    return guest_virt()


def reachable_root() -> Path:
    """A fresh folder QEMU (libvirt-qemu) can pass through: 0711 in /var/tmp."""
    root = Path(tempfile.mkdtemp(prefix="vmmig-live-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    return root


class Bridge:
    """A Linux bridge with no uplink (nothing leaves this host), made and removed by the test."""

    def __init__(self) -> None:
        self.name = f"vmmig{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "link", "add", "name", self.name, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", self.name, "up"], check=True)

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.name], check=False)


def define_guest(world: DemoWorld, image: Path, *, bridge: str | None, data_mib: int = 32,
                 vda_format: str = "qcow2", agent: bool = True, kind: str = "kvm") -> dict[str, Path]:
    """The test guest as the world's source VM: vda its boot disk (``vda_format``), vdb a raw data disk."""
    conn = world.conn()
    try:
        pool, src = ensure_world_pools(conn, world)
        vda = src / f"{world.vm_name}-vda.{vda_format}"
        vdb = src / f"{world.vm_name}-vdb.raw"
        subprocess.run([qemu_img_path(), "convert", "-q", "-f", "raw", "-O", vda_format, str(image), str(vda)],
                       check=True)
        with open(vdb, "wb") as fh:
            fh.truncate(data_mib * MiB)
        pool.refresh(0)
        nic = (f"<interface type='bridge'><source bridge='{bridge}'/><model type='virtio'/></interface>"
               if bridge else "")
        channel = (f"<channel type='unix'><target type='virtio' name='{AGENT_CHANNEL}'/></channel>" if agent else "")
        conn.defineXML(
            f"<domain type='{kind}'><name>{world.vm_name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>"
            f"<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><on_poweroff>destroy</on_poweroff>"
            f"<devices>"
            f"<disk type='file' device='disk'><driver name='qemu' type='{vda_format}'/><source file='{vda}'/>"
            f"<target dev='vda' bus='virtio'/></disk>"
            f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{vdb}'/>"
            f"<target dev='vdb' bus='virtio'/></disk>"
            f"{nic}<serial type='pty'/><console type='pty'/>{channel}"
            f"</devices></domain>")
        return {"vda": vda, "vdb": vdb}
    finally:
        conn.close()


def start_and_wait(world: DemoWorld, name: str | None = None, timeout: float = 60.0) -> float:
    """Start the domain and wait for the guest's marker on its serial console; returns the seconds it took."""
    import libvirt

    conn = world.conn()
    try:
        dom = conn.lookupByName(name or world.vm_name)
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        console = SerialConsole(conn, dom)
        start = time.monotonic()
        dom.resume()
        try:
            while MARKER not in console.text():
                if time.monotonic() - start > timeout:
                    raise AssertionError(f"the test guest printed no marker in {timeout} s:\n{console.text()[-2000:]}")
                time.sleep(0.1)
            return time.monotonic() - start
        finally:
            console.close()
    finally:
        conn.close()


def is_running(world: DemoWorld, name: str | None = None) -> bool:
    conn = world.conn()
    try:
        return bool(conn.lookupByName(name or world.vm_name).isActive())
    finally:
        conn.close()


def raw_copy(path: Path, fmt: str, dest: Path) -> Path:
    """The guest-visible content of an image as a raw file (``qemu-img convert -U``: shared, read-only)."""
    subprocess.run([qemu_img_path(), "convert", "-q", "-U", "-f", fmt, "-O", "raw", str(path), str(dest)],
                   check=True)
    return dest


def remove_root(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
