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
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any
from urllib.parse import quote, urlsplit

from include.diskio import CHUNK, Segment
from include.errors import HypervisorError, NotFound, TargetCreationError, UnsupportedDiskFormat
from include.providers import libvirt_live
from include.providers.base import (
    BootResult,
    DiskInfo,
    HypervisorDriver,
    NicInfo,
    PointInTime,
    TargetDisk,
    VMInfo,
)
from include.spec import NetworkHint

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("qcow2", "raw", "vmdk")
#: the XML namespace of the owner tag the engine writes into the domains it defines
OWNER_NS = "urn:virtrigaud:vmmigration:owner"
#: the extended attribute that tags the volume files the engine creates on this host
OWNER_XATTR = "user.vmmigration.owner"


#: the domain type of the VMs the engine defines: kvm, or qemu (software emulation) on a host whose KVM
#: cannot run guests (some nested setups)
VIRT_TYPE_ENV = "VMMIGRATION_LIBVIRT_VIRT_TYPE"


def virt_type() -> str:
    value = (os.environ.get(VIRT_TYPE_ENV) or "kvm").strip().lower()
    if value not in ("kvm", "qemu"):
        raise TargetCreationError(f"{VIRT_TYPE_ENV}={value!r}: use kvm or qemu")
    return value


def _libvirt():
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors surface as exceptions
    return libvirt


def is_local_uri(uri: str) -> bool:
    """Whether a libvirt URI names the daemon on this host (``qemu:///system``, ``qemu+unix:///...``);
    ``qemu://host/system`` is a remote daemon even if the same path exists here."""
    parts = urlsplit(uri)
    return parts.scheme in ("qemu", "qemu+unix") and not parts.hostname


def check_endpoint(uri: str) -> None:
    """Refuse a libvirt URI before anything connects: only the allowlisted forms of
    :func:`include.endpoints.check_provider_endpoint` (never ``qemu+ext://...?command=``), and a host the
    address policy allows, resolved now (libvirt connects from C code, which the connect-time audit hook
    of :mod:`include.netpolicy` does not see; ssh and TLS resolve the name again themselves, as host
    key and certificate checks need the name).

    :raises InvalidMigration: the URI is not an allowed form (``field`` is ``spec.endpoint``).
    :raises AddressRefused: its host is, or resolves to, a refused address.
    :raises HypervisorError: its host does not resolve.
    """
    from include.endpoints import check_provider_address, check_provider_endpoint
    from include.errors import InvalidMigration, StorageError

    why = check_provider_endpoint("libvirt", uri)
    if why is not None:
        raise InvalidMigration(f"libvirt endpoint refused: {why}", field="spec.endpoint")
    try:
        check_provider_address(uri)
    except StorageError as err:
        raise HypervisorError(f"cannot connect to libvirt at {_shown(uri)}: {err}") from err


def _shown(uri: str) -> str:
    from include.endpoints import redact

    return redact(uri.split("?", 1)[0])


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


def open_connection(endpoint: str, credentials: Mapping[str, str] | None = None) -> Any:
    """A ``libvirt.virConnect`` to a Provider's endpoint: the URI is checked before libvirt runs anything
    for it, and a ``qemu+ssh`` private key from the Secret is written only now and removed as soon as ssh
    has connected with it."""
    libvirt = _libvirt()
    check_endpoint(endpoint)
    uri, keyfile = connection_uri(endpoint, credentials)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise HypervisorError(f"cannot connect to libvirt at {_shown(endpoint)}: {err}") from err
    finally:
        if keyfile:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(keyfile)


class LibvirtDriver(HypervisorDriver):
    def __init__(self, uri: str, *, credentials: Mapping[str, str] | None = None,
                 connect: Callable[[], Any] | None = None) -> None:
        self.uri = uri
        self._credentials = credentials
        self._connect = connect

    @classmethod
    def for_provider(cls, endpoint: str, credentials: Mapping[str, str] | None) -> LibvirtDriver:
        return cls(endpoint, credentials=credentials)

    @classmethod
    def from_hook(cls, hook: Any) -> LibvirtDriver:
        """A driver on the connection of an Airflow hook (``LibvirtHook``: ``uri`` and ``get_conn()``)."""
        return cls(hook.uri, connect=hook.get_conn)

    @classmethod
    def snapshot_disks(cls, disks: Sequence[DiskInfo]) -> list[str]:
        """libvirt takes an internal snapshot only when every disk is qcow2."""
        return [d.name for d in disks] if all(d.format == "qcow2" for d in disks) else []

    @classmethod
    def disk_bus(cls, source_bus: str) -> str:
        """QEMU's buses as they are; another hypervisor's SCSI controllers (lsilogic, pvscsi, buslogic)
        become scsi; anything else (nvme, a bus QEMU does not name) virtio."""
        if source_bus in ("virtio", "scsi", "sata", "ide", "usb"):
            return source_bus
        return "scsi" if source_bus in ("lsilogic", "lsilogicsas", "pvscsi", "buslogic") else "virtio"

    @classmethod
    def nic_model(cls, source_model: str | None) -> str:
        """QEMU's emulated NICs as they are (e1000 stays e1000, so the guest's driver still binds); another
        hypervisor's paravirtual NIC (vmxnet3, Hyper-V's netvsc) or one QEMU does not name becomes virtio."""
        model = (source_model or "").lower()
        return model if model in ("virtio", "e1000", "e1000e", "rtl8139", "ne2k_pci", "pcnet") else "virtio"

    def local_disk_path(self, disk: DiskInfo) -> str | None:
        """The disk's file when libvirtd runs on this host (``qemu:///...``) and the file is here."""
        return disk.path if is_local_uri(self.uri) and os.path.exists(disk.path) else None

    @cached_property
    def conn(self) -> Any:
        return self._connect() if self._connect is not None else open_connection(self.uri, self._credentials)

    def close(self) -> None:
        if "conn" in self.__dict__:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - closing a dead connection is not an error worth raising
                log.debug("closing libvirt connection failed", exc_info=True)
            del self.__dict__["conn"]

    def identity(self) -> str:
        """The host's UUID from libvirt's capabilities: the same hypervisor whatever URI reaches it."""
        uuid = ET.fromstring(self.conn.getCapabilities()).findtext("./host/uuid")
        return f"host-uuid:{uuid}" if uuid else self.uri.split("?", 1)[0]

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

    def get_vm(self, name: str) -> VMInfo:
        return self._vm_info(self._domain(name))

    def _vm_info(self, dom: Any) -> VMInfo:
        root = ET.fromstring(dom.XMLDesc(0))
        state, _max_mem, mem_kib, vcpus, _cpu = dom.info()
        libvirt = _libvirt()
        disks = tuple(self._disk_info(el) for el in root.findall("./devices/disk")
                      if el.get("device", "disk") == "disk")
        interfaces = []
        for el in root.findall("./devices/interface"):
            src, model, mac = el.find("source"), el.find("model"), el.find("mac")
            interfaces.append(NicInfo(network=src.get("network") if src is not None else None,
                                      bridge=src.get("bridge") if src is not None else None,
                                      model=model.get("type") if model is not None else None,
                                      mac=mac.get("address") if mac is not None else None))
        # only a shut-off VM has stable disks: shutting down, suspended, crashed or unknown all count as running
        return VMInfo(name=dom.name(), running=state != libvirt.VIR_DOMAIN_SHUTOFF,
                      vcpus=int(vcpus), memory_mib=int(mem_kib) // 1024, disks=disks,
                      interfaces=tuple(interfaces), id=dom.UUIDString())

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

    def create_snapshot(self, vm: str, snapshot: str, disks: Sequence[DiskInfo], *,
                        exists_ok: bool = False) -> list[str]:
        """Internal snapshot of a shut-off VM whose disks are all qcow2; returns the disks covered.

        libvirt only takes an internal snapshot when every disk can hold one, so a VM with a raw disk
        gets none (and the pipeline relies on the VM staying shut off, which Exporting re-checks). A
        snapshot of that name that exists already is used only with ``exists_ok``; otherwise libvirt's
        create fails on it, so one made by someone else in between is never taken for a new one.
        """
        libvirt = _libvirt()
        dom = self._domain(vm)
        if not disks or any(d.format != "qcow2" for d in disks):
            return []
        covered = [d.name for d in disks]
        if exists_ok:
            try:
                dom.snapshotLookupByName(snapshot)
                return covered
            except libvirt.libvirtError:
                pass
        root = ET.Element("domainsnapshot")
        _sub(root, "name", text=snapshot)
        _sub(root, "description", text="taken by the VM migration engine before export")
        disks_el = _sub(root, "disks")
        for d in disks:
            _sub(disks_el, "disk", name=d.name, snapshot="internal")
        xml = _to_xml(root)
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

    def read_disk(self, disk: DiskInfo, *, vm: str | None = None, snapshot: str | None = None) -> Iterator[Segment]:
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

    # -- a running source: a pull-mode backup job, read over NBD ---------------------------------------
    live_export = True

    def live_export_refusal(self, vm: VMInfo | None = None) -> str | None:
        """The NBD export is a unix socket on the libvirt host: read here only when libvirtd runs here."""
        if not is_local_uri(self.uri):
            return (f"a running VM on {_shown(self.uri)} is exported through a unix socket on that host, which a "
                    f"worker elsewhere cannot read; run the worker on that host, or shut the VM down")
        return None

    def point_in_time_handle(self, workdir: str) -> dict[str, Any]:
        return libvirt_live.handle_for(workdir)

    def begin_point_in_time(self, vm: str, disks: Sequence[DiskInfo], workdir: str) -> PointInTime:
        return libvirt_live.begin(self._domain(vm), disks, workdir)

    def _active_domain(self, vm: str) -> Any | None:
        """The source domain by name; the phases check it is the VM validated (its UUID) before calling."""
        try:
            return self._domain(vm)
        except NotFound:
            return None

    def point_in_time_active(self, vm: str, handle: Mapping[str, Any]) -> bool:
        return libvirt_live.active(self._active_domain(vm), handle)

    def read_point_in_time(self, handle: Mapping[str, Any], disk: DiskInfo) -> tuple[Iterator[Segment], int, int]:
        return libvirt_live.read(handle, disk)

    def end_point_in_time(self, vm: str, handle: Mapping[str, Any]) -> bool:
        return libvirt_live.end(self._active_domain(vm), handle)

    def recover_point_in_time(self, vm: str, handle: Mapping[str, Any]) -> str | None:
        return libvirt_live.thaw_if_frozen(self._active_domain(vm))

    # -- target side -------------------------------------------------------------------------------
    def boot_check_refusal(self) -> str | None:
        return None

    def boot_check(self, vm_id: str, *, mode: str, marker: str, timeout: float) -> BootResult:
        dom = self._domain_by_id(vm_id)
        if dom is None:
            raise NotFound(f"VM {vm_id} not found on {self.uri}")
        return libvirt_live.boot(self.conn, dom, mode=mode, marker=marker, timeout=timeout)

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

    def create_volume(self, storage: str, volume: str, fmt: str, capacity: int) -> str:
        libvirt = _libvirt()
        pool = self._pool(storage)
        root = ET.Element("volume")
        _sub(root, "name", text=volume)
        _sub(root, "capacity", text=str(int(capacity)), unit="bytes")
        _sub(root, "allocation", text="0", unit="bytes")
        _sub(_sub(root, "target"), "format", type=fmt)
        xml = _to_xml(root)
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

    def local_storage_path(self, storage: str) -> str | None:
        """A directory-like pool's folder when libvirtd runs on this host and the folder is writable here."""
        if not is_local_uri(self.uri):
            return None
        root = ET.fromstring(self._pool(storage).XMLDesc(0))
        path = root.findtext("./target/path")
        if root.get("type") not in ("dir", "fs", "netfs") or not path:
            return None
        return path if os.access(path, os.W_OK) else None

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

    def volume_key(self, storage: str, volume: str) -> str | None:
        try:
            return self._volume(storage, volume).key()
        except NotFound:
            return None

    def volume_created_at(self, storage: str, volume: str) -> float | None:
        """When the volume's file last changed status (its ctime): never earlier than its creation."""
        try:
            vol = self._volume(storage, volume)
        except NotFound:
            return None
        ctime = ET.fromstring(vol.XMLDesc(0)).findtext("./target/timestamps/ctime")
        try:
            return float(ctime) if ctime else None
        except ValueError:
            return None

    def mark_volume(self, storage: str, volume: str, owner: str) -> bool:
        """Tag the volume's file with its owner (an extended attribute), when the file is on this host."""
        path = self.local_volume_path(storage, volume)
        if path is None:
            return False
        try:
            os.setxattr(path, OWNER_XATTR, owner.encode(), follow_symlinks=False)
        except OSError:
            return False  # a filesystem without user xattrs: the key alone identifies it
        return True

    def volume_owner(self, storage: str, volume: str) -> str | None:
        path = self.local_volume_path(storage, volume)
        if path is None:
            return None
        try:
            return os.getxattr(path, OWNER_XATTR, follow_symlinks=False).decode()
        except OSError:
            return None

    def delete_volume(self, storage: str, volume: str, *, key: str, owner: str | None = None) -> bool:
        try:
            vol = self._volume(storage, volume)
        except NotFound:
            return False
        if vol.key() != key:
            log.warning("volume %s/%s is not the one this migration created (key %s, recorded %s): kept",
                        storage, volume, vol.key(), key)
            return False
        if owner is not None and self.volume_owner(storage, volume) != owner:
            log.warning("volume %s/%s does not carry this migration's owner tag (it was made again by someone "
                        "else): kept", storage, volume)
            return False
        vol.delete(0)
        return True

    def define_vm(self, name: str, vcpus: int, memory_mib: int, disks: Sequence[TargetDisk],
                  networks: Sequence[NetworkHint], *, nic_models: Sequence[str] = (),
                  owner: str | None = None) -> str:
        libvirt = _libvirt()
        # built as a tree, never by formatting strings: a quote or "<" in a value stays in that value
        root = ET.Element("domain", type=virt_type())
        _sub(root, "name", text=name)
        if owner:
            # who defined it: lets a retry recognise its own VM if it died before recording it
            ET.SubElement(_sub(root, "metadata"), f"{{{OWNER_NS}}}owner").text = owner
        _sub(root, "memory", text=str(int(memory_mib)), unit="MiB")
        _sub(root, "vcpu", text=str(int(vcpus)))
        os_el = _sub(root, "os")
        _sub(os_el, "type", text="hvm", arch="x86_64", machine="pc")
        _sub(os_el, "boot", dev="hd")
        _sub(_sub(root, "features"), "acpi")
        _sub(root, "on_poweroff", text="destroy")
        devices = _sub(root, "devices")
        for d in disks:
            disk_el = _sub(devices, "disk", type="volume", device="disk")
            _sub(disk_el, "driver", name="qemu", type=d.format)
            _sub(disk_el, "source", pool=d.pool, volume=d.volume)
            _sub(disk_el, "target", dev=d.name, bus=d.bus)
        for index, hint in enumerate(networks):
            if hint.bridge:
                nic = _sub(devices, "interface", type="bridge")
                _sub(nic, "source", bridge=hint.bridge)
            elif hint.network:
                nic = _sub(devices, "interface", type="network")
                _sub(nic, "source", network=hint.network)
            else:
                continue
            _sub(nic, "model", type=self.nic_model(nic_models[index] if index < len(nic_models) else None))
        _sub(devices, "serial", type="pty")
        _sub(devices, "console", type="pty")
        # the guest agent's channel, as virt-install adds it: the boot check and a later freeze talk to it
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name=libvirt_live.AGENT_CHANNEL)
        xml = _to_xml(root)
        try:
            return self.conn.defineXML(xml).UUIDString()
        except libvirt.libvirtError as err:
            raise TargetCreationError(f"defining VM {name} failed: {err}") from err

    def describe_vm(self, vm_id: str) -> VMInfo:
        dom = self._domain_by_id(vm_id)
        if dom is None:
            raise NotFound(f"VM {vm_id} not found on {self.uri}")
        return self._vm_info(dom)

    def vm_owner(self, vm_id: str) -> str | None:
        """The owner tag ``define_vm`` wrote into the VM's metadata, if any."""
        libvirt = _libvirt()
        dom = self._domain_by_id(vm_id)
        if dom is None:
            return None
        try:
            xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, OWNER_NS, 0)
        except libvirt.libvirtError:
            return None
        return (ET.fromstring(xml).text or "").strip() or None

    def vm_id(self, name: str) -> str | None:
        try:
            return self._domain(name).UUIDString()
        except NotFound:
            return None

    def _domain_by_id(self, vm_id: str) -> Any | None:
        libvirt = _libvirt()
        try:
            return self.conn.lookupByUUIDString(vm_id)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"looking up VM {vm_id} on {self.uri} failed: {err}") from err

    def _undefine(self, dom: Any) -> None:
        libvirt = _libvirt()
        if dom.isActive():
            dom.destroy()
        flags = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        try:
            dom.undefineFlags(flags)
        except libvirt.libvirtError:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)

    def delete_vm(self, vm_id: str) -> bool:
        dom = self._domain_by_id(vm_id)
        if dom is None:
            return False
        self._undefine(dom)
        return True

    def _paths_in_use(self, except_id: str) -> dict[str, str]:
        """Disk file paths of every other domain on this host -> a domain using it."""
        used: dict[str, str] = {}
        for dom in self.conn.listAllDomains(0):
            if dom.UUIDString() == except_id:
                continue
            root = ET.fromstring(dom.XMLDesc(0))
            for src in root.findall("./devices/disk/source"):
                path = src.get("file") or src.get("dev")
                if src.get("pool") and src.get("volume"):
                    try:
                        path = self._volume(src.get("pool"), src.get("volume")).path()
                    except NotFound as err:  # fail closed: a use that cannot be resolved keeps every volume
                        raise HypervisorError(f"deleteSource: cannot tell which file VM {dom.name()} uses for "
                                              f"{src.get('pool')}/{src.get('volume')}; nothing deleted") from err
                if path:
                    used[os.path.realpath(path)] = dom.name()
        return used

    def delete_source_vm(self, vm_id: str, volumes: Sequence[tuple[str, str]]) -> list[str]:
        dom = self._domain_by_id(vm_id)
        if dom is None:
            return []
        targets = []
        for pool, volume in volumes:
            try:
                targets.append((pool, volume, self._volume(pool, volume)))
            except NotFound:
                log.warning("deleteSource: volume %s/%s is already gone", pool, volume)
        used = self._paths_in_use(vm_id)  # before the undefine, so nothing can slip in between
        name = dom.name()
        self._undefine(dom)
        removed = [f"VM {name} ({vm_id})"]
        for pool, volume, vol in targets:
            other = used.get(os.path.realpath(vol.path()))
            if other:
                log.warning("deleteSource: volume %s/%s is also used by VM %s: kept", pool, volume, other)
                continue
            vol.delete(0)
            removed.append(f"volume {pool}/{volume}")
        return removed


def _sub(parent: ET.Element, tag: str, *, text: str | None = None, **attrib: str) -> ET.Element:
    """A child element; attribute values and text are escaped by ElementTree (quotes included)."""
    el = ET.SubElement(parent, tag, {k: _xml_text(v) for k, v in attrib.items()})
    if text is not None:
        el.text = _xml_text(text)
    return el


def _xml_text(value: Any) -> str:
    text = str(value)
    # characters XML 1.0 cannot hold at all (escaping cannot help): refuse rather than send libvirt
    # a document it would misparse
    if any((ord(c) < 0x20 and c not in "\t\n\r") or c in "\ufffe\uffff" or 0xD800 <= ord(c) <= 0xDFFF
           for c in text):
        raise TargetCreationError(f"value {text!r} holds a character XML cannot carry")
    return text


def _to_xml(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def _abort(stream: Any) -> None:
    try:
        stream.abort()
    except Exception:  # noqa: BLE001 - the stream may already be closed
        log.debug("aborting libvirt stream failed", exc_info=True)
