"""Libvirt/KVM through libvirt-python: qemu:///system, qemu+ssh://..., any libvirt URI.

Disk bytes move through the libvirt stream API (``virStorageVolDownload``/``Upload`` with sparse
streams), which works the same for a local daemon and a remote one over SSH; holes are sent as
holes. ``libvirt`` is imported lazily: this module is imported at DAG parse time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any
from urllib.parse import quote, urlsplit
from xml.sax.saxutils import escape

from include.diskio import CHUNK, Segment
from include.errors import HypervisorError, NotFound, TargetCreationError, UnsupportedDiskFormat
from include.providers.base import DiskInfo, HypervisorDriver, TargetDisk, VMInfo
from include.spec import NetworkHint

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("qcow2", "raw", "vmdk")


def _libvirt():
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors surface as exceptions
    return libvirt


def is_local_uri(uri: str) -> bool:
    """Whether a libvirt URI names the daemon on this host (``qemu:///system``, ``qemu+unix:///...``);
    ``qemu://host/system`` is a remote daemon even if the same path exists here."""
    parts = urlsplit(uri)
    return parts.scheme in ("qemu", "qemu+unix") and not parts.hostname


def connection_uri(endpoint: str, credentials: Mapping[str, str] | None) -> tuple[str, str | None]:
    """The URI to open for a Provider: for ``qemu+ssh://`` the Secret's private key (keys ``sshPrivateKey``
    or ``ssh-privatekey``, as in a kubernetes.io/ssh-auth Secret) goes to a 0600 file named by ``keyfile=``.

    Returns the URI and the key file to delete once the connection is open.
    """
    scheme = endpoint.split(":", 1)[0]
    if "no_verify=1" in endpoint:
        log.warning("SSH host key verification is DISABLED for %s (no_verify=1)", endpoint.split("?", 1)[0])
    if "+ssh" not in scheme or not credentials or "keyfile=" in endpoint:
        return endpoint, None
    key = next((credentials[k] for k in ("sshPrivateKey", "ssh-privatekey", "privateKey") if credentials.get(k)),
               None)
    if not key:
        return endpoint, None
    fd, path = tempfile.mkstemp(prefix="vmmigration-sshkey-")
    with os.fdopen(fd, "w") as fh:
        fh.write(key if key.endswith("\n") else key + "\n")
    os.chmod(path, 0o600)
    return f"{endpoint}{'&' if '?' in endpoint else '?'}keyfile={quote(path)}", path


class LibvirtDriver(HypervisorDriver):
    native_format = "qcow2"
    attachable_formats = ("qcow2", "raw", "vmdk")

    def __init__(self, uri: str, *, credentials: Mapping[str, str] | None = None) -> None:
        self.uri = uri
        self._credentials = credentials

    @classmethod
    def for_provider(cls, endpoint: str, credentials: Mapping[str, str] | None) -> LibvirtDriver:
        return cls(endpoint, credentials=credentials)

    @cached_property
    def conn(self) -> Any:
        libvirt = _libvirt()
        # the private key (if any) is written only now, and removed as soon as ssh has connected with it
        uri, keyfile = connection_uri(self.uri, self._credentials)
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError as err:
            raise HypervisorError(f"cannot connect to libvirt at {self.uri.split('?', 1)[0]}: {err}") from err
        finally:
            if keyfile:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(keyfile)

    def close(self) -> None:
        if "conn" in self.__dict__:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - closing a dead connection is not an error worth raising
                log.debug("closing libvirt connection failed", exc_info=True)
            del self.__dict__["conn"]

    def check(self) -> str:
        version = self.conn.getLibVersion()
        return f"libvirt {version // 1000000}.{version // 1000 % 1000}.{version % 1000} at {self.uri}"

    # -- source side -------------------------------------------------------------------------------
    def _domain(self, name: str) -> Any:
        libvirt = _libvirt()
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"VM {name!r} not found on {self.uri}") from err
            raise HypervisorError(f"looking up VM {name!r} on {self.uri} failed: {err}") from err

    def vm_exists(self, name: str) -> bool:
        try:
            self._domain(name)
        except NotFound:
            return False
        return True

    def get_vm(self, name: str) -> VMInfo:
        dom = self._domain(name)
        root = ET.fromstring(dom.XMLDesc(0))
        state, _max_mem, mem_kib, vcpus, _cpu = dom.info()
        libvirt = _libvirt()
        disks = tuple(self._disk_info(el) for el in root.findall("./devices/disk")
                      if el.get("device", "disk") == "disk")
        interfaces = []
        for el in root.findall("./devices/interface"):
            src = el.find("source")
            iface = {"type": el.get("type", "")}
            if src is not None:
                iface.update({k: v for k, v in src.attrib.items() if k in ("bridge", "network")})
            interfaces.append(iface)
        # only a shut-off VM has stable disks: shutting down, suspended, crashed or unknown all count as running
        return VMInfo(name=name, running=state != libvirt.VIR_DOMAIN_SHUTOFF,
                      vcpus=int(vcpus), memory_mib=int(mem_kib) // 1024, disks=disks,
                      interfaces=tuple(interfaces))

    def _disk_info(self, el: ET.Element) -> DiskInfo:
        libvirt = _libvirt()
        target = el.find("target")
        driver = el.find("driver")
        source = el.find("source")
        name = target.get("dev") if target is not None else None
        fmt = driver.get("type") if driver is not None else "raw"
        if not name or source is None:
            raise UnsupportedDiskFormat(f"disk without target or source in the domain XML: {ET.tostring(el)!r}")
        if fmt not in SUPPORTED_FORMATS:
            raise UnsupportedDiskFormat(f"disk {name} has format {fmt!r}; supported: {', '.join(SUPPORTED_FORMATS)}")
        bus = target.get("bus", "virtio")
        try:
            if el.get("type") == "volume":
                pool = self.conn.storagePoolLookupByName(source.get("pool"))
                vol = pool.storageVolLookupByName(source.get("volume"))
            elif el.get("type") == "file":
                vol = self.conn.storageVolLookupByPath(source.get("file"))
            else:
                raise UnsupportedDiskFormat(f"disk {name} is of type {el.get('type')!r}; file and volume disks "
                                            f"are supported")
        except libvirt.libvirtError as err:
            raise NotFound(f"disk {name}: its storage volume is not in any libvirt storage pool ({err}); "
                           f"define a pool for its folder") from err
        backing = ET.fromstring(vol.XMLDesc(0)).findtext("./backingStore/path")
        if backing:
            raise UnsupportedDiskFormat(f"disk {name} ({vol.path()}) is an overlay on {backing}; flatten it first "
                                        f"(virsh blockpull, or qemu-img convert into a standalone image)")
        _kind, capacity, allocation = vol.info()
        # The volume's capacity is the virtual size libvirt probed from the image header.
        return DiskInfo(name=name, format=fmt, capacity=int(capacity), allocation=int(allocation),
                        path=vol.path(), pool=vol.storagePoolLookupByVolume().name(), volume=vol.name(), bus=bus)

    def create_snapshot(self, vm: str, snapshot: str, disks: Sequence[DiskInfo]) -> list[str]:
        """Internal snapshot of a shut-off VM whose disks are all qcow2; returns the disks covered.

        libvirt only takes an internal snapshot when every disk can hold one, so a VM with a raw disk
        gets none (and the pipeline relies on the VM staying shut off, which Exporting re-checks).
        """
        libvirt = _libvirt()
        dom = self._domain(vm)
        if not disks or any(d.format != "qcow2" for d in disks):
            return []
        covered = [d.name for d in disks]
        try:
            dom.snapshotLookupByName(snapshot)
            return covered  # a retry after the snapshot was made
        except libvirt.libvirtError:
            pass
        disk_xml = "".join(f"<disk name='{escape(d.name)}' snapshot='internal'/>" for d in disks)
        xml = (f"<domainsnapshot><name>{escape(snapshot)}</name>"
               f"<description>taken by the VM migration engine before export</description>"
               f"<disks>{disk_xml}</disks></domainsnapshot>")
        try:
            dom.snapshotCreateXML(xml, 0)
        except libvirt.libvirtError as err:
            raise HypervisorError(f"snapshot {snapshot} of {vm} failed: {err}") from err
        return covered

    def delete_snapshot(self, vm: str, snapshot: str) -> bool:
        libvirt = _libvirt()
        try:
            snap = self._domain(vm).snapshotLookupByName(snapshot)
        except (NotFound, libvirt.libvirtError):
            return False
        snap.delete(0)
        return True

    def has_snapshot(self, vm: str, snapshot: str) -> bool:
        libvirt = _libvirt()
        try:
            self._domain(vm).snapshotLookupByName(snapshot)
        except (NotFound, libvirt.libvirtError):
            return False
        return True

    def read_disk(self, disk: DiskInfo) -> Iterator[Segment]:
        libvirt = _libvirt()
        vol = self._volume(disk.pool or "", disk.volume or "")
        stream = self.conn.newStream(0)
        try:
            vol.download(stream, 0, 0, libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM)
            while True:
                data = stream.recvFlags(CHUNK, libvirt.VIR_STREAM_RECV_STOP_AT_HOLE)
                if data == -3:
                    hole = stream.recvHole(0)
                    if hole:
                        yield Segment(length=int(hole))
                    continue
                if isinstance(data, int):
                    raise HypervisorError(f"reading disk {disk.name} failed (stream returned {data})")
                if not data:
                    break
                yield Segment(length=len(data), data=data)
            stream.finish()
        except libvirt.libvirtError as err:
            _abort(stream)
            raise HypervisorError(f"reading disk {disk.name} ({disk.path}) failed: {err}") from err
        except BaseException:
            _abort(stream)
            raise

    # -- target side -------------------------------------------------------------------------------
    def default_storage(self) -> str:
        return "default"

    def _pool(self, name: str) -> Any:
        libvirt = _libvirt()
        try:
            pool = self.conn.storagePoolLookupByName(name)
        except libvirt.libvirtError as err:
            raise NotFound(f"storage pool {name!r} not found on {self.uri}", field="spec.targetStorageHint") from err
        if not pool.isActive():
            raise NotFound(f"storage pool {name!r} on {self.uri} is not active", field="spec.targetStorageHint")
        return pool

    def _volume(self, pool: str, volume: str) -> Any:
        libvirt = _libvirt()
        try:
            return self._pool(pool).storageVolLookupByName(volume)
        except libvirt.libvirtError as err:
            raise NotFound(f"volume {volume!r} not found in pool {pool!r}") from err

    def storage_exists(self, hint: str) -> bool:
        try:
            self._pool(hint)
        except NotFound:
            return False
        return True

    def volume_exists(self, storage: str, volume: str) -> bool:
        try:
            self._volume(storage, volume)
        except NotFound:
            return False
        return True

    def create_volume(self, storage: str, volume: str, fmt: str, capacity: int) -> str:
        libvirt = _libvirt()
        pool = self._pool(storage)
        xml = (f"<volume><name>{escape(volume)}</name><capacity unit='bytes'>{int(capacity)}</capacity>"
               f"<allocation unit='bytes'>0</allocation><target><format type='{escape(fmt)}'/></target></volume>")
        try:
            return pool.createXML(xml, 0).path()
        except libvirt.libvirtError as err:
            raise TargetCreationError(f"creating volume {volume} in pool {storage} failed: {err}") from err

    def write_volume(self, storage: str, volume: str, segments: Iterator[Segment], length: int) -> None:
        libvirt = _libvirt()
        vol = self._volume(storage, volume)
        stream = self.conn.newStream(0)
        try:
            vol.upload(stream, 0, length, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
            for seg in segments:
                if seg.data is None:
                    stream.sendHole(seg.length, 0)
                    continue
                data = seg.data if isinstance(seg.data, bytes) else bytes(seg.data)
                view = memoryview(data)
                while view:
                    sent = stream.send(data if len(view) == len(data) else view.tobytes())
                    if sent < 0:
                        raise HypervisorError(f"writing volume {volume} failed (stream returned {sent})")
                    view = view[sent:]
            stream.finish()
        except libvirt.libvirtError as err:
            _abort(stream)
            raise HypervisorError(f"writing volume {volume} in pool {storage} failed: {err}") from err
        except BaseException:
            _abort(stream)
            raise

    def local_volume_path(self, storage: str, volume: str) -> str | None:
        """The volume's file when libvirtd runs on this host and the file is writable here."""
        if not is_local_uri(self.uri):
            return None
        path = self._volume(storage, volume).path()
        return path if os.access(path, os.W_OK) else None

    def resize_volume(self, storage: str, volume: str, capacity: int) -> None:
        libvirt = _libvirt()
        try:
            self._volume(storage, volume).resize(int(capacity), 0)
        except libvirt.libvirtError as err:
            raise TargetCreationError(f"growing volume {volume} to {capacity} bytes failed: {err}") from err

    def delete_volume(self, storage: str, volume: str) -> bool:
        try:
            vol = self._volume(storage, volume)
        except NotFound:
            return False
        vol.delete(0)
        return True

    def define_vm(self, name: str, vcpus: int, memory_mib: int, disks: Sequence[TargetDisk],
                  networks: Sequence[NetworkHint]) -> None:
        libvirt = _libvirt()
        disk_xml = "".join(
            f"<disk type='volume' device='disk'><driver name='qemu' type='{escape(d.format)}'/>"
            f"<source pool='{escape(d.pool)}' volume='{escape(d.volume)}'/>"
            f"<target dev='{escape(d.name)}' bus='{escape(d.bus)}'/></disk>"
            for d in disks
        )
        nic_xml = ""
        for hint in networks:
            if hint.bridge:
                nic_xml += (f"<interface type='bridge'><source bridge='{escape(hint.bridge)}'/>"
                            f"<model type='virtio'/></interface>")
            elif hint.network:
                nic_xml += (f"<interface type='network'><source network='{escape(hint.network)}'/>"
                            f"<model type='virtio'/></interface>")
        xml = (f"<domain type='kvm'><name>{escape(name)}</name>"
               f"<memory unit='MiB'>{int(memory_mib)}</memory><vcpu>{int(vcpus)}</vcpu>"
               f"<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
               f"<features><acpi/></features><on_poweroff>destroy</on_poweroff>"
               f"<devices>{disk_xml}{nic_xml}<serial type='pty'/><console type='pty'/></devices></domain>")
        try:
            self.conn.defineXML(xml)
        except libvirt.libvirtError as err:
            raise TargetCreationError(f"defining VM {name} failed: {err}") from err

    def describe_vm(self, name: str) -> dict[str, Any]:
        info = self.get_vm(name)
        return {"name": info.name, "vcpus": info.vcpus, "memory_mib": info.memory_mib,
                "disks": [d.to_dict() for d in info.disks], "interfaces": list(info.interfaces),
                "running": info.running}

    def delete_vm(self, name: str, *, delete_storage: bool) -> bool:
        libvirt = _libvirt()
        try:
            dom = self._domain(name)
        except NotFound:
            return False
        disks = self.get_vm(name).disks if delete_storage else ()
        if dom.isActive():
            dom.destroy()
        flags = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        try:
            dom.undefineFlags(flags)
        except libvirt.libvirtError:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        for disk in disks:
            if disk.pool and disk.volume:
                self.delete_volume(disk.pool, disk.volume)
        return True


def _abort(stream: Any) -> None:
    try:
        stream.abort()
    except Exception:  # noqa: BLE001 - the stream may already be closed
        log.debug("aborting libvirt stream failed", exc_info=True)
