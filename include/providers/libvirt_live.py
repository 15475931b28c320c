"""Running libvirt VMs: a point in time of a running domain (a pull-mode backup job serving each disk
over NBD on a unix socket, with a scratch file per disk for the blocks the guest overwrites), and the
boot check of a migrated domain (started paused, NIC links down, serial console read until a marker).

QEMU runs as its own user (``libvirt-qemu`` on Debian): the socket and scratch folder belong to that
user (read from the domain's DAC label), inside a folder of this run that only lets it through.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from include import nbd
from include.diskio import Segment
from include.errors import HypervisorError, InvalidMigration
from include.providers.base import BootResult, DiskInfo, PointInTime

log = logging.getLogger(__name__)

AGENT_CHANNEL = "org.qemu.guest_agent.0"
#: the longest unix socket path the kernel takes (sun_path is 108 bytes with its NUL)
SOCKET_MAX = 107
SERIAL_KEEP = 64 * 1024


def _libvirt() -> Any:
    from include.providers.libvirt_driver import _libvirt as load

    return load()


def qemu_owner(dom: Any) -> tuple[int, int]:
    """The uid and gid QEMU runs as for this domain (its DAC label; root when there is none)."""
    root = ET.fromstring(dom.XMLDesc(0))
    for label in root.findall("./seclabel"):
        if label.get("model") == "dac":
            text = (label.findtext("label") or "").replace("+", "")
            if ":" in text:
                uid, gid = text.split(":", 1)
                return int(uid), int(gid)
    return 0, 0


def _reachable(path: Path, uid: int, gid: int) -> str | None:
    """The first folder on the way to ``path`` that ``uid``/``gid`` cannot pass through, if any."""
    if uid == 0:
        return None
    for folder in [path, *path.parents]:
        st_ = os.stat(folder)
        if st_.st_uid == uid:
            ok = st_.st_mode & 0o100
        elif st_.st_gid == gid:
            ok = st_.st_mode & 0o010
        else:
            ok = st_.st_mode & 0o001
        if not ok:
            return str(folder)
    return None


def _quiesce(dom: Any) -> tuple[bool, str]:
    """Freeze the guest's filesystems through its agent; (frozen, what happened)."""
    libvirt = _libvirt()
    root = ET.fromstring(dom.XMLDesc(0))
    channel = None
    for target in root.findall("./devices/channel/target"):
        if target.get("name") == AGENT_CHANNEL:
            channel = target
    if channel is None:
        return False, "the VM has no guest agent channel"
    if channel.get("state") not in (None, "connected"):
        return False, "the guest agent is not connected"
    try:
        count = dom.fsFreeze(None, 0)
    except libvirt.libvirtError as err:
        _thaw(dom)  # an agent that timed out may still have frozen them: thawing is harmless otherwise
        return False, f"the guest agent did not freeze the filesystems ({err.get_error_message()})"
    if not count:
        _thaw(dom)
        return False, "the guest agent froze no filesystem"
    return True, f"the guest agent froze {count} filesystem(s) and thawed them"


def _thaw(dom: Any) -> str | None:
    """Thaw, trying a few times; None when thawed, else the last error."""
    libvirt = _libvirt()
    last = None
    for attempt in range(3):
        try:
            dom.fsThaw(None, 0)
            return None
        except libvirt.libvirtError as err:
            last = err.get_error_message()
            time.sleep(0.5 * (attempt + 1))
    return last


def handle_for(workdir: str) -> dict[str, Any]:
    return {"method": "libvirt-backup", "socket": str(Path(workdir) / "qemu" / "nbd.sock")}


def thaw_if_frozen(dom: Any | None) -> str | None:
    """Thaw the guest's filesystems when its agent says they are frozen (left so by a task that died
    between the freeze and the thaw of :func:`begin`)."""
    if dom is None or not dom.isActive():
        return None
    try:
        import libvirt_qemu

        answer = str(libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-fsfreeze-status"}', 5, 0))
    except Exception:  # noqa: BLE001 - no agent, or it does not answer: nothing it could have frozen
        return None
    if '"frozen"' not in answer:
        return None
    failed = _thaw(dom)
    if failed:
        raise HypervisorError(f"VM {dom.name()} was left with frozen filesystems and thawing them failed: {failed}")
    return f"thawed the filesystems of VM {dom.name()} (left frozen by an interrupted Snapshotting)"


def begin(dom: Any, disks: Sequence[DiskInfo], workdir: str) -> PointInTime:
    libvirt = _libvirt()
    uid, gid = qemu_owner(dom)
    if os.geteuid() not in (0, uid):
        raise InvalidMigration(f"a live export hands QEMU (uid {uid}) a folder of its own: run the worker as root or "
                               f"as QEMU's user, or shut the VM down", field="spec.sourceName")
    work = Path(workdir)
    blocked = _reachable(work, uid, gid)
    if blocked:
        raise InvalidMigration(f"QEMU (uid {uid}) cannot reach {blocked} to serve the point-in-time export; set "
                               f"VMMIGRATION_LIVE_DIR to a folder it can pass through (for example /var/tmp)")
    folder = work / "qemu"
    folder.mkdir(mode=0o700)
    os.chown(folder, uid, gid)
    sock = Path(handle_for(workdir)["socket"])
    if len(os.fsencode(sock)) > SOCKET_MAX:
        raise InvalidMigration(f"the socket path {sock} is longer than a unix socket takes; set "
                               f"VMMIGRATION_LIVE_DIR to a shorter folder")
    root = ET.Element("domainbackup", mode="pull")
    ET.SubElement(root, "server", transport="unix", socket=str(sock))
    disks_el = ET.SubElement(root, "disks")
    for d in disks:
        el = ET.SubElement(disks_el, "disk", name=d.name, backup="yes", type="file", exportname=d.name)
        ET.SubElement(el, "driver", type="qcow2")
        ET.SubElement(el, "scratch", file=str(folder / f"{d.name}.scratch"))
    frozen, detail = _quiesce(dom)
    try:
        dom.backupBegin(ET.tostring(root, encoding="unicode"), None, 0)
        taken = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except libvirt.libvirtError as err:
        raise HypervisorError(f"holding the disks of VM {dom.name()} at one point in time failed "
                              f"(libvirt backup): {err.get_error_message()}") from err
    finally:
        failed_thaw = _thaw(dom) if frozen else None
    if failed_thaw:
        log.error("VM %s: thawing the guest's filesystems failed: %s", dom.name(), failed_thaw)
        detail += f"; THAW FAILED: {failed_thaw}"
    consistency = "application-consistent" if frozen and not failed_thaw else "crash-consistent"
    return PointInTime(handle=handle_for(workdir),
                       disks=tuple(d.name for d in disks), consistency=consistency, detail=detail, taken_at=taken)


def active(dom: Any | None, handle: Mapping[str, Any]) -> bool:
    """Whether the domain's backup job is the one ``handle`` names (its socket is this run's)."""
    libvirt = _libvirt()
    if dom is None:
        return False
    try:
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError as err:
        # only "no backup job" and "not running" mean it is gone; anything else (a lock, a daemon hiccup) is
        # not taken for an ended job, which would leave it running with nothing recorded to end it
        if err.get_error_code() in (getattr(libvirt, "VIR_ERR_NO_DOMAIN_BACKUP", 104),
                                    libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
            return False
        raise HypervisorError(f"cannot tell whether VM {dom.name()} still holds its point in time: "
                              f"{err.get_error_message()}") from err
    server = ET.fromstring(xml).find("server")
    return server is not None and server.get("socket") == handle.get("socket")


def end(dom: Any | None, handle: Mapping[str, Any]) -> bool:
    libvirt = _libvirt()
    if not active(dom, handle):
        return False
    try:
        # libvirt names no job id: checked again right before, so another job started meanwhile is not hit
        if not active(dom, handle):
            return False
        dom.abortJob()
    except libvirt.libvirtError as err:
        if active(dom, handle):
            raise HypervisorError(f"ending the point-in-time export of VM {dom.name()} failed: "
                                  f"{err.get_error_message()}") from err
    # the job ends asynchronously: its scratch files are QEMU's until it has
    deadline = time.monotonic() + 60
    while active(dom, handle):
        if time.monotonic() > deadline:
            raise HypervisorError(f"the point-in-time export of VM {dom.name()} did not end within 60 s of its abort")
        time.sleep(0.1)
    return True


def read(handle: Mapping[str, Any], disk: DiskInfo) -> tuple[Iterator[Segment], int, int]:
    sock = str(handle.get("socket"))
    try:
        ranges = nbd.extents(sock, disk.name)
    except OSError as err:
        if not os.path.exists(sock):
            raise InvalidMigration(f"disk {disk.name}: the point in time is no longer held (its NBD socket is gone: "
                                   f"the VM stopped or its backup job ended); every disk must come from one instant: "
                                   f"run the migration again", field="spec.sourceName") from err
        raise HypervisorError(f"disk {disk.name}: the point-in-time export cannot be read: {err}") from err
    size = max((int(e["start"]) + int(e["length"]) for e in ranges), default=0)
    return nbd.segments(sock, disk.name, ranges=ranges), size, nbd.data_bytes(ranges)


# -- the boot check -------------------------------------------------------------------------------------

class SerialConsole:
    """The domain's serial console read on a thread into a bounded buffer."""

    def __init__(self, conn: Any, dom: Any) -> None:
        libvirt = _libvirt()
        self._stream = conn.newStream(0)
        dom.openConsole(None, self._stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="serial-console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                data = self._stream.recv(4096)
                if not isinstance(data, bytes) or not data:
                    return
                with self._lock:
                    self._buf += data
                    del self._buf[:-SERIAL_KEEP]
        except Exception:  # noqa: BLE001 - the console ends when the domain stops
            return

    def text(self) -> str:
        with self._lock:
            return self._buf.decode(errors="replace")

    def close(self) -> None:
        try:
            self._stream.abort()
        except Exception:  # noqa: BLE001 - already closed with the domain
            pass
        self._thread.join(timeout=5)


def last_lines(text: str, n: int = 12, limit: int = 1500) -> str:
    """The console's last lines, control characters (escape sequences) removed, bounded."""
    clean = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")
    clean = "".join(c for c in clean if c == "\n" or c == "\t" or ord(c) >= 0x20)
    lines = [line.rstrip() for line in clean.split("\n") if line.strip()]
    tail = lines[-n:]
    # a panic or error further up says more than the reboot after it: kept in front of the tail
    notable = [line for line in lines[:-n] if re.search(r"panic|fatal|error|fail", line, re.IGNORECASE)][-3:]
    text = "\n".join([*notable, "...", *tail] if notable else tail)
    return text[-limit:]


def _links_down(dom: Any) -> int:
    """Every NIC of the running (paused) domain set link down, live only; returns how many."""
    libvirt = _libvirt()
    root = ET.fromstring(dom.XMLDesc(0))
    count = 0
    for iface in root.findall("./devices/interface"):
        link = iface.find("link")
        if link is None:
            link = ET.SubElement(iface, "link")
        link.set("state", "down")
        try:
            dom.updateDeviceFlags(ET.tostring(iface, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as err:
            raise HypervisorError(f"boot check: setting the link of a NIC of {dom.name()} down failed: "
                                  f"{err.get_error_message()}") from err
        count += 1
    return count


def _agent_answers(dom: Any) -> str | None:
    try:
        import libvirt_qemu
    except ImportError:  # pragma: no cover - shipped with libvirt-python
        return None
    try:
        return str(libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 2, 0))
    except Exception:  # noqa: BLE001 - not up yet
        return None


def boot(conn: Any, dom: Any, *, mode: str, marker: str, timeout: float) -> BootResult:
    libvirt = _libvirt()
    if dom.isActive():
        # this run's own VM (the caller checked), left running by a boot check that was killed: off first
        log.warning("boot check: VM %s is running (an earlier check was interrupted); powering it off", dom.name())
        dom.destroy()
    try:
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    except libvirt.libvirtError as err:
        return BootResult(passed=False, seen="", seconds=0.0, output=f"the VM did not start: {err.get_error_message()}")
    console = None
    try:
        _links_down(dom)  # before the first instruction runs: it never meets the source on the network
        console = SerialConsole(conn, dom)
        start = time.monotonic()
        dom.resume()
        seen = ""
        while time.monotonic() - start < timeout:
            if mode == "serial":
                text = console.text()
                if marker in text:
                    seen = next(line for line in text.replace("\r", "").split("\n") if marker in line).strip()
            else:
                answer = _agent_answers(dom)
                if answer is not None:
                    seen = f"guest agent answered guest-ping: {answer}"
            if seen:
                break
            if not dom.isActive():
                break
            time.sleep(0.2)
        seconds = time.monotonic() - start
        return BootResult(passed=bool(seen), seen=seen[:300], seconds=round(seconds, 1),
                          output=last_lines(console.text()))
    finally:
        try:
            if dom.isActive():
                dom.destroy()  # powered off: the check only boots it once
        finally:
            if console is not None:
                console.close()
