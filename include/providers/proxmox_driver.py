"""Proxmox VE through its REST API (proxmoxer) and SSH (paramiko) for the disk bytes.

Source: the VM by name (or VMID) on whichever node of the cluster it lives (``/cluster/resources``); its disks on
scsi, virtio, sata and ide (CD-ROMs, cloud-init drives, EFI vars and TPM state are not migrated and are named in the
log), NICs, cores and memory; a snapshot; each disk read from the shut-off VM's volume file over SFTP
(``pvesm path`` on the node tells where it is), streamed into the transfer engine without a temporary copy,
zero blocks left out. A running VM is read from a PVE snapshot taken for the run while it runs (the point-in-time
port): a qcow2 on a file storage at its internal snapshot (include.qcow2 reads the snapshot's own tables over
SFTP); other disks of a running VM are refused; the snapshot is removed after.

Target (``ProxmoxTargetSession``): each disk is uploaded to a storage with content ``import`` (PVE 8.4 and later)
and attached with ``import-from`` when the VM is created on the VMID ``/cluster/nextid`` gives (recorded before the
create, taken again when another migration got it first); the VM's description carries the owner tag and the disk
names; the import volumes are removed afterwards. Rollback destroys the VMID this run created (with its disks,
which only it owns) and the import volumes the ledger lists.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from include import qcow2
from include.diskio import Segment
from include.errors import (
    HypervisorError,
    InvalidMigration,
    NotFound,
    PlanChanged,
    TargetCreationError,
    UnsupportedDiskFormat,
)
from include.providers.base import DiskInfo, HypervisorDriver, NicInfo, PointInTime, TargetDisk, VMInfo
from include.providers.proxmox_api import TASK_TIMEOUT, Proxmox, RandomReader, TaskFailed, stream_file
from include.spec import NetworkHint

if TYPE_CHECKING:
    from include.inventory import ProviderInfo
    from include.model import TargetPlan
    from include.providers.session import Ownership, TargetSession

log = logging.getLogger(__name__)

DISK_KEY = re.compile(r"^(scsi|virtio|sata|ide)(\d+)$")
NET_KEY = re.compile(r"^net(\d+)$")
#: the line of a VM's description that carries the owner tag, and the one that names its disks
OWNER_LINE = "vmmigration-owner: "
DISKS_LINE = "vmmigration-disks: "
_NIC_MODELS = ("virtio", "e1000", "e1000e", "vmxnet3", "rtl8139")
#: storage types that keep volumes as files (qcow2, raw, vmdk); the others hold raw block volumes
FILE_STORAGES = ("dir", "nfs", "cifs", "glusterfs", "cephfs")
#: the Provider annotation that says how disks reach a target node: "auto" (the default: an upload to an
#: ``import`` storage on PVE 8.4 and later, else ``qm importdisk`` over SSH), "upload" or "ssh"
IMPORT_ANNOTATION = "vmmigration.virtrigaud.io/proxmox-disk-import"
IMPORT_METHODS = ("auto", "upload", "ssh")
#: where a disk is put on the node for ``qm importdisk`` (a 0700 folder of the run's inside it)
NODE_STAGE_ROOT = "/var/tmp"


def parse_prop(value: str) -> dict[str, str]:
    """A PVE property string: ``local-lvm:vm-100-disk-0,size=32G`` -> {"file": ..., "size": "32G"}."""
    out: dict[str, str] = {}
    for i, part in enumerate(str(value).split(",")):
        key, sep, val = part.partition("=")
        if not sep and i == 0:
            out["file"] = part
        elif sep:
            out[key] = val
    return out


def parse_size(text: str | None) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", (text or "").strip())
    if not m:
        return 0
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)])


def _letters(n: int) -> str:
    out, n = "", n + 1
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(ord("a") + r) + out
    return out


def _format_of(volid: str) -> str:
    for fmt in ("qcow2", "vmdk", "raw"):
        if volid.endswith(f".{fmt}"):
            return fmt
    return "raw"  # LVM, LVM-thin, ZFS, Ceph volumes are raw block devices


class VmidTaken(TargetCreationError):
    """The node refused a create because its VMID is in use (another migration got it first)."""


class ProxmoxDriver(HypervisorDriver):
    vmdk_subformat = "monolithicSparse"
    DEFAULT_NIC_MODEL = "virtio"

    def __init__(self, endpoint: str, credentials: Mapping[str, str] | None = None, *,
                 api: Proxmox | None = None) -> None:
        self.endpoint = endpoint
        self.pve = api or Proxmox(endpoint, credentials)
        self.defaults: dict[str, Any] = {}

    @classmethod
    def for_provider(cls, endpoint: str, credentials: Mapping[str, str] | None) -> ProxmoxDriver:
        return cls(endpoint, credentials)

    @classmethod
    def from_hook(cls, hook: Any) -> ProxmoxDriver:
        return cls(hook.endpoint, api=hook.pve)

    def configure(self, provider: ProviderInfo) -> None:
        if provider.insecure_skip_verify:
            self.pve.insecure = True
        self.defaults = dict(provider.defaults or {})

    @classmethod
    def plan_options(cls, provider: ProviderInfo) -> dict[str, str]:
        """How disks reach the node, from the Provider's annotation :data:`IMPORT_ANNOTATION` (pinned)."""
        value = (provider.annotations.get(IMPORT_ANNOTATION) or "auto").strip().lower()
        if value not in IMPORT_METHODS:
            raise InvalidMigration(f"Provider {provider.ref} annotation {IMPORT_ANNOTATION}={value!r}: use one of "
                                   f"{', '.join(IMPORT_METHODS)}", field="spec.targetProviderRef")
        return {"diskImport": value}

    # -- planning -------------------------------------------------------------------------------------------
    @classmethod
    def target_volume_name(cls, vm: str, disk: str, fmt: str) -> str:
        """The import volume a disk is uploaded as (PVE names the VM's own volume itself, vm-<vmid>-disk-<n>)."""
        return f"{vm}-{disk}.{fmt}"

    @classmethod
    def snapshot_disks(cls, disks: Sequence[DiskInfo]) -> list[str]:
        """None for a shut-off VM: its disks are read from its volumes (in their own format), and a PVE snapshot
        would only get in the way (on a storage with volume chains, PVE 9, the volume id then names a new, empty
        overlay). The VM stays shut off, which Exporting and Transferring check. A running VM gets a PVE snapshot
        of its own through the point-in-time port (begin_point_in_time)."""
        return []

    @classmethod
    def disk_bus(cls, source_bus: str) -> str:
        """virtio-blk and PVE's own buses stay; any SCSI controller becomes scsi (virtio-scsi-single); nvme and
        anything else scsi."""
        return source_bus if source_bus in ("virtio", "scsi", "sata", "ide") else "scsi"

    @classmethod
    def nic_model(cls, source_model: str | None) -> str:
        model = (source_model or "").lower()
        return model if model in _NIC_MODELS else cls.DEFAULT_NIC_MODEL

    # -- connection -----------------------------------------------------------------------------------------
    def check(self) -> str:
        version = self.pve.call("reading the version", lambda api: api.version.get())
        return f"Proxmox VE {version.get('version')} at {self.endpoint}"

    def identity(self) -> str:
        nodes = self.pve.call("listing nodes", lambda api: api.nodes.get())
        return "pve:" + ",".join(sorted(n["node"] for n in nodes))

    #: the node a run's target session pinned at Validating (its plan's ``node`` option)
    pinned_node: str | None = None

    def _node(self) -> str:
        """The node a migrated VM is created on: the one the plan pinned, else the Provider's
        ``spec.defaults.cluster`` where set (PVE has no cluster object; one Provider is one cluster), else the
        first online node."""
        if self.pinned_node:
            return self.pinned_node
        nodes = self.pve.call("listing nodes", lambda api: api.nodes.get())
        wanted = self.defaults.get("cluster")
        online = sorted(n["node"] for n in nodes if n.get("status", "online") == "online")
        if wanted:
            if wanted not in online:
                raise NotFound(f"node {wanted!r} is not an online node of {self.endpoint}",
                               field="spec.defaults.cluster")
            return str(wanted)
        if not online:
            raise HypervisorError(f"no online node at {self.endpoint}")
        return online[0]

    # -- source ---------------------------------------------------------------------------------------------
    def _find(self, name: str) -> tuple[str, int]:
        """(node, vmid) of the VM named ``name`` (or whose VMID ``name`` is)."""
        found = self.pve.call("listing VMs", lambda api: api.cluster.resources.get(type="vm"))
        vms = [r for r in found if r.get("type") == "qemu" and (r.get("name") == name or str(r.get("vmid")) == name)]
        if not vms:
            raise NotFound(f"VM {name!r} not found on Proxmox VE {self.endpoint}")
        if len(vms) > 1:
            raise InvalidMigration(f"{len(vms)} VMs are named {name!r} on {self.endpoint}; name it by its VMID",
                                   field="spec.sourceName")
        return str(vms[0]["node"]), int(vms[0]["vmid"])

    def _config(self, node: str, vmid: int) -> dict[str, Any]:
        return self.pve.call(f"reading VM {vmid}", lambda api: api.nodes(node).qemu(vmid).config.get())

    def get_vm(self, name: str) -> VMInfo:
        """The VM as its config describes it; its qcow2 and vmdk disks checked on the node with ``qemu-img info``
        (an overlay is refused: a linked clone's or a volume chain's top alone is not the disk) and sized by
        their files (what has to move)."""
        node, vmid = self._find(name)
        info = self._vm_info(node, vmid)
        return dataclasses.replace(info, disks=self._checked_disks(node, info.disks))

    def _checked_disks(self, node: str, disks: Sequence[DiskInfo]) -> tuple[DiskInfo, ...]:
        images = [d for d in disks if d.format in ("qcow2", "vmdk")]
        if not images:
            return tuple(disks)
        client = self.pve.ssh(self._node_host(node))
        sizes: dict[str, int] = {}
        try:
            for d in images:
                path = self.pve.run(client, ["pvesm", "path", d.volume or d.path], f"locating {d.path}").strip()
                out = self.pve.run(client, ["qemu-img", "info", "-U", "--output=json", "-f", d.format, path],
                                   f"reading the image of disk {d.name}")
                image = json.loads(out)
                if image.get("backing-filename"):
                    raise UnsupportedDiskFormat(
                        f"disk {d.name} ({d.path}) is an overlay on {image['backing-filename']} (a linked clone, "
                        f"or a snapshot on a volume-chain storage); migrate a full clone, or remove the snapshot",
                        field="spec.sourceName")
                if image.get("actual-size"):
                    sizes[d.name] = int(image["actual-size"])
        finally:
            client.close()
        return tuple(dataclasses.replace(d, allocation=sizes[d.name]) if d.name in sizes else d for d in disks)

    def _vm_info(self, node: str, vmid: int) -> VMInfo:
        config = self._config(node, vmid)
        status = self.pve.call(f"reading VM {vmid}", lambda api: api.nodes(node).qemu(vmid).status.current.get())
        names = _described_disks(config.get("description", ""))
        disks, counters, skipped = [], {"vd": 0, "sd": 0, "hd": 0}, []
        for key in sorted((k for k in config if DISK_KEY.match(k)),
                          key=lambda k: (("virtio", "scsi", "sata", "ide").index(DISK_KEY.match(k).group(1)),
                                         int(DISK_KEY.match(k).group(2)))):
            prop = parse_prop(config[key])
            volid = prop.get("file", "")
            if "cloudinit" in volid:
                skipped.append(f"{key} ({volid}): the cloud-init drive (PVE makes it from the VM's cloud-init "
                               f"settings; set them again on the target)")
                continue
            if prop.get("media") == "cdrom" or volid in ("none", "cdrom"):
                skipped.append(f"{key} ({volid}): a CD-ROM drive (its ISO stays where it is)")
                continue
            bus = DISK_KEY.match(key).group(1)
            prefix = {"virtio": "vd", "ide": "hd"}.get(bus, "sd")
            auto = prefix + _letters(counters[prefix])
            counters[prefix] += 1
            size = parse_size(prop.get("size"))
            storage = volid.split(":", 1)[0]
            disks.append(DiskInfo(name=names.get(key, auto), format=_format_of(volid), capacity=size,
                                  allocation=size, path=volid, pool=storage, volume=volid, bus=bus))
        for key, what in (("efidisk0", "the UEFI variables (the target boots with fresh ones: set its firmware "
                                        "to UEFI, and the boot entry may need adding again)"),
                          ("tpmstate0", "the TPM state (keys sealed to it, such as BitLocker's, do not come along)")):
            if key in config:
                skipped.append(f"{key} ({parse_prop(config[key]).get('file', '')}): {what}")
        for item in skipped:
            log.warning("VM %s: not migrated: %s", vmid, item)
        nics = []
        for key in sorted((k for k in config if NET_KEY.match(k)), key=lambda k: int(NET_KEY.match(k).group(1))):
            prop = parse_prop(config[key])
            # "virtio=MAC,bridge=..." as a node writes it, or "virtio,bridge=..." / "model=virtio,..." as sent
            model = next((m for m in _NIC_MODELS if m in prop), prop.get("model") or prop.get("file"))
            nics.append(NicInfo(bridge=prop.get("bridge"), model=model, mac=prop.get(model or "", None)))
        cores = int(config.get("cores", 1)) * int(config.get("sockets", 1))
        return VMInfo(name=str(config.get("name", vmid)), running=status.get("status") != "stopped", vcpus=cores,
                      memory_mib=int(str(config.get("memory", 512)).split(",")[0]), disks=tuple(disks),
                      interfaces=tuple(nics), id=f"{node}/{vmid}", skipped=tuple(skipped))

    def vm_id(self, name: str) -> str | None:
        try:
            node, vmid = self._find(name)
        except NotFound:
            return None
        return f"{node}/{vmid}"

    @staticmethod
    def _split(vm_id: str) -> tuple[str, int]:
        node, _, vmid = vm_id.partition("/")
        return node, int(vmid)

    def _exists(self, vm_id: str) -> bool:
        node, vmid = self._split(vm_id)
        found = self.pve.call("listing VMs", lambda api: api.cluster.resources.get(type="vm"))
        return any(str(r.get("vmid")) == str(vmid) and r.get("node") == node for r in found)

    def describe_vm(self, vm_id: str) -> VMInfo:
        if not self._exists(vm_id):
            raise NotFound(f"VM {vm_id} not found on {self.endpoint}")
        return self._vm_info(*self._split(vm_id))

    def vm_owner(self, vm_id: str) -> str | None:
        if not self._exists(vm_id):
            return None
        description = self._config(*self._split(vm_id)).get("description", "")
        return next((line[len(OWNER_LINE):].strip() for line in description.splitlines()
                     if line.startswith(OWNER_LINE)), None)

    def storage_exists(self, hint: str) -> bool:
        node = self._node()
        stores = self.pve.call("listing storages", lambda api: api.nodes(node).storage.get())
        return any(s.get("storage") == hint and s.get("active", 1) and "images" in str(s.get("content", ""))
                   for s in stores)

    def default_storage(self) -> str:
        if self.defaults.get("datastore"):
            return str(self.defaults["datastore"])
        return "local-lvm"

    def file_storage(self, node: str, storage: str) -> bool:
        """Whether the storage keeps volumes as files (any format) rather than as raw block devices."""
        stores = self.pve.call("listing storages", lambda api: api.nodes(node).storage.get())
        kind = next((str(s.get("type")) for s in stores if s.get("storage") == storage), "dir")
        return kind in FILE_STORAGES

    @classmethod
    def format_matches(cls, planned: str, found: str) -> bool:
        """A disk planned as qcow2 or vmdk is raw on a block storage: PVE converts it on import."""
        return planned == found or found == "raw"

    def node_version(self, node: str) -> tuple[int, int]:
        answer = self.pve.call(f"reading the version of node {node}", lambda api: api.nodes(node).version.get())
        found = re.match(r"(\d+)\.(\d+)", str(answer.get("version", "")))
        return (int(found.group(1)), int(found.group(2))) if found else (0, 0)

    def import_method(self, node: str, wanted: str = "auto") -> str:
        """"upload" (to an ``import`` storage, attached with ``import-from``: PVE 8.4 and later) or "ssh" (the
        disk copied to the node over SFTP and imported with ``qm importdisk``), for the plan's ``diskImport``."""
        if wanted == "ssh":
            return "ssh"
        version = self.node_version(node)
        if version < (8, 4):
            if wanted == "upload":
                raise InvalidMigration(f"node {node} runs Proxmox VE {version[0]}.{version[1]}: uploading a disk "
                                       f"image to an import storage needs 8.4 or later; remove the annotation "
                                       f"{IMPORT_ANNOTATION}", field="spec.targetProviderRef")
            return "ssh"
        if wanted == "upload" or self._import_storage(node) is not None:
            return "upload"
        log.info("node %s has no storage with content 'import': disks go over SSH (qm importdisk)", node)
        return "ssh"

    def _import_storage(self, node: str) -> str | None:
        stores = self.pve.call("listing storages", lambda api: api.nodes(node).storage.get())
        return next((str(s["storage"]) for s in stores
                     if "import" in str(s.get("content", "")).split(",") and s.get("active", 1)), None)

    def import_storage(self, node: str) -> str:
        """A storage of the node that takes content ``import`` (the upload's destination)."""
        found = self._import_storage(node)
        if found is not None:
            return found
        raise NotFound(f"no storage of node {node} takes content 'import' (PVE 8.4 and later: add it to a "
                       f"directory storage's content)", field="spec.targetProviderRef")

    def bridge_exists(self, bridge: str) -> bool:
        node = self._node()
        found = self.pve.call("listing bridges", lambda api: api.nodes(node).network.get(type="any_bridge"))
        return any(n.get("iface") == bridge for n in found)

    # -- snapshots ------------------------------------------------------------------------------------------
    @staticmethod
    def snapname(name: str) -> str:
        """The plan's snapshot name as PVE takes one (``[a-z][a-z0-9_]+``, at most 40 characters)."""
        text = re.sub(r"[^a-z0-9_]", "_", name.lower())
        text = text if text[:1].isalpha() else f"s{text}"
        return text[:40]

    def create_snapshot(self, vm: str, snapshot: str, disks: Sequence[DiskInfo], *,
                        exists_ok: bool = False) -> list[str]:
        node, vmid = self._find(vm)
        if self.has_snapshot(vm, snapshot):
            if exists_ok:
                return [d.name for d in disks]
            raise InvalidMigration(f"VM {vm} already has a snapshot named {self.snapname(snapshot)!r}",
                                   field="spec.sourceName")
        upid = self.pve.call(f"snapshotting VM {vmid}", lambda api: api.nodes(node).qemu(vmid).snapshot.post(
            snapname=self.snapname(snapshot), description="taken by the VM migration engine before export"))
        self.pve.wait(node, upid, f"snapshot {snapshot} of VM {vm}")
        return [d.name for d in disks]

    def delete_snapshot(self, vm: str, snapshot: str) -> bool:
        if not self.has_snapshot(vm, snapshot):
            return False
        node, vmid = self._find(vm)
        upid = self.pve.call(f"deleting snapshot {snapshot}",
                             lambda api: api.nodes(node).qemu(vmid).snapshot(self.snapname(snapshot)).delete())
        self.pve.wait(node, upid, f"deleting snapshot {snapshot} of VM {vm}")
        return True

    def has_snapshot(self, vm: str, snapshot: str) -> bool:
        try:
            node, vmid = self._find(vm)
        except NotFound:
            return False
        snaps = self.pve.call("listing snapshots", lambda api: api.nodes(node).qemu(vmid).snapshot.get())
        return any(s.get("name") == self.snapname(snapshot) for s in snaps)

    def read_disk(self, disk: DiskInfo, *, vm: str | None = None, snapshot: str | None = None) -> Iterator[Segment]:
        """The shut-off VM's volume file, over SFTP from the node the VM is on (zero chunks as holes)."""
        node = self._find(vm)[0] if vm else self._node()
        client = self.pve.ssh(self._node_host(node))
        try:
            path = self.pve.run(client, ["pvesm", "path", disk.volume or disk.path], f"locating {disk.path}").strip()
            yield from stream_file(client, path, f"reading disk {disk.name} ({disk.path})")
        finally:
            client.close()

    # -- a running source: a PVE snapshot of the running VM, read while it runs ------------------------------
    live_export = True
    live_format = "raw"

    def _storage_types(self, node: str) -> dict[str, str]:
        stores = self.pve.call("listing storages", lambda api: api.nodes(node).storage.get())
        return {str(s.get("storage")): str(s.get("type")) for s in stores}

    def _snapshot_read(self, disk: DiskInfo, types: Mapping[str, str]) -> str | None:
        """How a disk is read at a PVE snapshot: "qcow2" (a qcow2 on a file storage: its internal snapshot, over
        SFTP), "lvm" (LVM-thin: the snapshot's own thin volume, activated and read over SFTP); None when we
        cannot. Other block storages are refused: a real node's ``pvesm export`` ignores ``--snapshot`` on Ceph
        RBD (it exports the running image), and ZFS snapshots are not read yet."""
        kind = types.get(disk.pool or "", "")
        if kind in FILE_STORAGES:
            return "qcow2" if disk.format == "qcow2" else None
        return "lvm" if kind == "lvmthin" else None

    def live_export_refusal(self, vm: VMInfo | None = None) -> str | None:
        """A running VM is read from a PVE snapshot: every disk must be one :meth:`_snapshot_read` reads (a qcow2
        on a file storage, or on LVM-thin), and the EFI vars and TPM state PVE snapshots with it one PVE can
        snapshot."""
        if vm is None or not vm.id:
            return None
        node, vmid = self._split(vm.id)
        types = self._storage_types(node)
        bad = [f"{d.name} ({d.volume}, {d.format} on {types.get(d.pool or '', '?')} storage {d.pool})"
               for d in vm.disks if self._snapshot_read(d, types) is None]
        config = self._config(node, vmid)
        for key in ("efidisk0", "tpmstate0"):
            volid = parse_prop(str(config.get(key, ""))).get("file", "")
            store = volid.split(":", 1)[0]
            if volid and not (types.get(store) in FILE_STORAGES and volid.endswith(".qcow2")
                              or types.get(store) == "lvmthin"):
                bad.append(f"{key} ({volid} on {types.get(store, '?')} storage {store})")
        if bad:
            return (f"it is read from a PVE snapshot taken while it runs, and the engine reads a snapshot of qcow2 "
                    f"volumes on file storages and of LVM-thin volumes only, not of {', '.join(bad)}; shut the VM "
                    f"down")
        return None

    def point_in_time_handle(self, workdir: str) -> dict[str, Any]:
        """The snapshot's name, from the run's fresh folder (known before it is taken, unique per run)."""
        return {"snapshot": self.snapname(f"vmmigration_live_{os.path.basename(os.path.normpath(workdir))}")}

    def begin_point_in_time(self, vm: str, disks: Sequence[DiskInfo], workdir: str) -> PointInTime:
        """A PVE snapshot of the running VM without its RAM (``vmstate`` 0); PVE freezes the guest's filesystems
        for it through the QEMU guest agent when the VM's config enables the agent."""
        handle = self.point_in_time_handle(workdir)
        node, vmid = self._find(vm)
        agent = [p.strip() for p in str(self._config(node, vmid).get("agent", "0")).split(",")]
        enabled = agent[0] in ("1", "true") or any(p in ("enabled=1", "enabled=true") for p in agent)
        taken = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        upid = self.pve.call(f"snapshotting the running VM {vmid}", lambda api: api.nodes(node).qemu(vmid)
                             .snapshot.post(snapname=handle["snapshot"], vmstate=0,
                                            description="point in time of the VM migration engine"))
        self.pve.wait(node, upid, f"snapshot {handle['snapshot']} of the running VM {vm}")
        detail = ("the VM's guest agent is enabled: PVE asked it to freeze the filesystems for the snapshot (the "
                  "task log says whether the guest did)" if enabled else
                  "the VM's guest agent is not enabled: nothing was quiesced")
        return PointInTime(handle={**handle, "node": node, "vmid": vmid}, disks=tuple(d.name for d in disks),
                           consistency="crash-consistent", detail=detail, taken_at=taken)

    def _held(self, handle: Mapping[str, Any], vm: str | None = None) -> tuple[str, int] | None:
        """(node, vmid) of a point in time that still exists; a handle recorded before it was taken names no VM
        yet, and then it is the VM named (which the caller checked is still the VM validated)."""
        try:
            node, vmid = (str(handle["node"]), int(handle["vmid"])) if handle.get("vmid") else self._find(vm or "")
        except NotFound:
            return None
        try:
            snaps = self.pve.call("listing snapshots", lambda api: api.nodes(node).qemu(vmid).snapshot.get())
        except NotFound:
            return None
        return (node, vmid) if any(s.get("name") == handle.get("snapshot") for s in snaps) else None

    def point_in_time_active(self, vm: str, handle: Mapping[str, Any]) -> bool:
        return self._held(handle, vm) is not None

    def read_point_in_time(self, handle: Mapping[str, Any], disk: DiskInfo) -> tuple[Iterator[Segment], int, int]:
        held = self._held(handle)
        if held is None:
            raise NotFound(f"the point in time {handle.get('snapshot')} is gone; run the migration again",
                           field="spec.sourceName")
        how = self._snapshot_read(disk, self._storage_types(held[0]))
        if how is None:
            raise UnsupportedDiskFormat(f"disk {disk.name} ({disk.volume}) cannot be read at a PVE snapshot",
                                        field="spec.sourceName")
        return self._read_at(held[0], disk, str(handle["snapshot"]), how), disk.capacity, disk.allocation

    def _read_at(self, node: str, disk: DiskInfo, snapshot: str, how: str) -> Iterator[Segment]:
        """The disk's guest data at the snapshot, streamed over SSH without a temporary copy on the node: a qcow2's
        internal snapshot read through its own tables over SFTP (allocated, non-zero clusters only), or an
        LVM-thin snapshot volume activated, read over SFTP (zero chunks as holes) and deactivated."""
        client = self.pve.ssh(self._node_host(node))
        try:
            what = f"reading disk {disk.name} ({disk.volume}) at snapshot {snapshot}"
            if how == "lvm":
                yield from self._read_lvm_snapshot(client, disk, snapshot, what)
                return
            path = self.pve.run(client, ["pvesm", "path", disk.volume or disk.path], f"locating {disk.path}")
            sftp = client.open_sftp()
            try:
                with sftp.open(path.strip(), "rb") as fh:
                    reader = RandomReader(fh)
                    try:
                        image = qcow2.read_header(reader)
                        size = qcow2.snapshot_size(image, qcow2.find_snapshot(image, snapshot))
                        if size != disk.capacity:
                            raise PlanChanged(f"{what}: the disk was {size} bytes at the snapshot, {disk.capacity} "
                                              f"at Validating (resized meanwhile); run the migration again",
                                              field="spec.sourceName")
                        yield from qcow2.segments(reader, snapshot, image=image)
                    except qcow2.Qcow2Error as err:
                        raise UnsupportedDiskFormat(f"{what}: {err}", field="spec.sourceName") from None
            finally:
                sftp.close()
        finally:
            client.close()

    def _read_lvm_snapshot(self, client: Any, disk: DiskInfo, snapshot: str, what: str) -> Iterator[Segment]:
        """PVE names an LVM-thin snapshot's volume ``snap_<volume>_<snapname>`` in the storage's volume group; it
        is skipped from activation, so ``lvchange -ay -Ky`` it, read its device, and deactivate it again."""
        config = self.pve.call(f"reading storage {disk.pool}", lambda api: api.storage(disk.pool).get())
        vg = config.get("vgname")
        volname = (disk.volume or disk.path).split(":", 1)[-1]
        if not vg or not re.fullmatch(r"[\w.+-]+", volname):
            raise UnsupportedDiskFormat(f"{what}: storage {disk.pool} names no volume group", field="spec.sourceName")
        lv = f"{vg}/snap_{volname}_{snapshot}"
        self.pve.run(client, ["lvchange", "-ay", "-Ky", lv], f"activating the snapshot volume {lv}")
        try:
            path = self.pve.run(client, ["lvs", "--noheadings", "-o", "lv_path", lv], f"locating {lv}").strip()
            done = 0
            for seg in stream_file(client, path, what):
                take = min(seg.length, disk.capacity - done)
                if take <= 0:
                    break  # the LV ends on an extent boundary; the disk is its configured size
                yield seg if take == seg.length else Segment(length=take, data=None if seg.data is None
                                                             else seg.data[:take])
                done += take
            if done < disk.capacity:
                raise HypervisorError(f"{what}: the snapshot volume {lv} ends after {done} of {disk.capacity} bytes")
        finally:
            try:
                self.pve.run(client, ["lvchange", "-an", lv], f"deactivating the snapshot volume {lv}")
            except Exception as err:  # noqa: BLE001 - the read's outcome is what the phase reports
                log.warning("could not deactivate %s on the node (PVE removes it with the snapshot): %s", lv, err)

    def end_point_in_time(self, vm: str, handle: Mapping[str, Any]) -> bool:
        held = self._held(handle, vm)
        if held is None:
            return False
        node, vmid = held
        upid = self.pve.call(f"removing snapshot {handle['snapshot']}", lambda api: api.nodes(node).qemu(vmid)
                             .snapshot(str(handle["snapshot"])).delete())
        self.pve.wait(node, upid, f"removing the point-in-time snapshot {handle['snapshot']} of VM {vm}")
        return True

    def _node_host(self, node: str) -> str | None:
        """Where to reach a node over SSH: the Secret's ``sshHost.<node>`` where set, else the API's host."""
        return self.pve.creds.get(f"sshHost.{node}") or None

    # -- target volumes (the import storage) ---------------------------------------------------------------
    def node_time(self, node: str) -> float:
        """The node's clock (what its volumes' ctime is on), as a POSIX time."""
        answer = self.pve.call("reading the node's time", lambda api: api.nodes(node).time.get())
        return float(answer.get("time") or 0)

    @staticmethod
    def volume_ctime(key: str) -> float | None:
        """The ctime recorded in a volume key (``volid;size=...;ctime=...``)."""
        for part in key.split(";"):
            if part.startswith("ctime=") and part[6:] not in ("", "None"):
                return float(part[6:])
        return None

    def volume_key(self, storage: str, volume: str) -> str | None:
        node = self._node()
        volid = volume if ":" in volume else f"{storage}:import/{volume}"
        found = self.pve.call("listing volumes", lambda api: api.nodes(node).storage(storage).content.get())
        for v in found:
            if v.get("volid") == volid:
                return f"{volid};size={v.get('size')};ctime={v.get('ctime')}"
        return None

    def create_volume(self, storage: str, volume: str, fmt: str, capacity: int) -> str:
        raise TargetCreationError("Proxmox VE volumes are made by the VM's create (import-from)")

    def write_volume(self, storage: str, volume: str, segments: Iterator[Segment], length: int) -> None:
        self.upload_volume(storage, volume, segments, length)

    def upload_volume(self, storage: str, volume: str, segments: Iterator[Segment], length: int, *,
                      sha256: str | None = None) -> None:
        """Upload an import volume; with ``sha256`` the node checks the file it received against it before it
        keeps it (PVE's upload ``checksum``), so bytes damaged between here and the node's disk are refused."""
        node = self._node()
        upid = self.pve.upload(node, storage, volume, segments, length, sha256=sha256)
        self.pve.wait(node, upid, f"uploading {volume} to {storage}")

    def resize_volume(self, storage: str, volume: str, capacity: int) -> None:
        raise TargetCreationError("a Proxmox VE disk is grown through its VM (resize), after Creating")

    def delete_volume(self, storage: str, volume: str, *, key: str, owner: str | None = None) -> bool:
        if self.volume_key(storage, volume) != key:
            return False
        node = self._node()
        volid = key.split(";", 1)[0]
        upid = self.pve.call(f"deleting {volid}", lambda api: api.nodes(node).storage(storage).content(volid).delete())
        if upid:
            self.pve.wait(node, str(upid), f"deleting {volid}")
        return True

    # -- the VM -------------------------------------------------------------------------------------------------
    def begin_target(self, plan: TargetPlan, owned: Ownership) -> TargetSession:
        from include.providers.proxmox_session import ProxmoxTargetSession

        return ProxmoxTargetSession(self, plan, owned)

    def define_vm(self, name: str, vcpus: int, memory_mib: int, disks: Sequence[TargetDisk],
                  networks: Sequence[NetworkHint], *, nic_models: Sequence[str] = (),
                  owner: str | None = None) -> str:
        raise TargetCreationError("a Proxmox VE VM is created by its target session (ProxmoxTargetSession.commit)")

    @staticmethod
    def disk_keys(disks: Sequence[TargetDisk]) -> list[str]:
        """The config key each disk gets on the target (``scsi0``, ``virtio1``...), in order, per bus."""
        counters: dict[str, int] = {}
        keys = []
        for disk in disks:
            bus = disk.bus if disk.bus in ("virtio", "scsi", "sata", "ide") else "scsi"
            keys.append(f"{bus}{counters.get(bus, 0)}")
            counters[bus] = counters.get(bus, 0) + 1
        return keys

    def create_vm(self, node: str, vmid: int, name: str, vcpus: int, memory_mib: int,
                  disks: Sequence[tuple[TargetDisk, str | None]], networks: Sequence[NetworkHint],
                  nic_models: Sequence[str], owner: str) -> str:
        """Create VM ``vmid`` with each disk imported from its import volume (``(disk, import volid)``); a disk
        without one is only named in the description (the SSH path imports and attaches it afterwards)."""
        params: dict[str, Any] = {"vmid": vmid, "name": name, "cores": int(vcpus), "memory": int(memory_mib),
                                  "scsihw": "virtio-scsi-single", "ostype": "l26"}
        keys = list(zip(self.disk_keys([d for d, _v in disks]), (d.name for d, _v in disks), strict=True))
        for (key, _name), (disk, import_volid) in zip(keys, disks, strict=True):
            if import_volid is None:  # imported after the create (qm importdisk) and attached then
                continue
            # file storages keep the planned format; block storages (LVM-thin, ZFS, Ceph) hold raw volumes only
            fmt = f",format={disk.format}" if self.file_storage(node, disk.pool) else ""
            params[key] = f"{disk.pool}:0,import-from={import_volid}{fmt}"
        for index, hint in enumerate(networks):
            if not (hint.bridge or hint.network):
                continue
            model = self.nic_model(nic_models[index] if index < len(nic_models) else None)
            params[f"net{index}"] = f"{model},bridge={hint.bridge or hint.network}"
        if keys and all(volid for _d, volid in disks):
            params["boot"] = f"order={keys[0][0]}"
        params["description"] = (f"Migrated by the VM migration engine\n{OWNER_LINE}{owner}\n"
                                 f"{DISKS_LINE}{','.join(f'{k}={n}' for k, n in keys)}")
        try:
            upid = self.pve.call(f"creating VM {vmid}", lambda api: api.nodes(node).qemu.post(**params))
        except HypervisorError as err:
            if "already exists" in str(err):
                raise VmidTaken(str(err)) from None
            raise
        try:
            self.pve.wait(node, upid, f"creating VM {name} ({vmid})")
        except TaskFailed as err:
            raise TargetCreationError(str(err)) from None
        return f"{node}/{vmid}"

    def grow_disk(self, vm_id: str, disk_name: str, capacity: int) -> None:
        node, vmid = self._split(vm_id)
        key = next((k for k, n in _described_disks(self._config(node, vmid).get("description", "")).items()
                    if n == disk_name), None)
        if key is None:
            raise TargetCreationError(f"VM {vm_id} has no disk {disk_name}")
        upid = self.pve.call(f"growing {key} of VM {vmid}", lambda api: api.nodes(node).qemu(vmid).resize.put(
            disk=key, size=str(capacity)))
        if upid:
            self.pve.wait(node, str(upid), f"growing {key} of VM {vmid}")

    # -- the SSH import path (PVE before 8.4, or no import storage): files in a folder of the run's on the node --
    def _sftp(self, node: str) -> tuple[Any, Any]:
        client = self.pve.ssh(self._node_host(node))
        try:
            return client, client.open_sftp()
        except BaseException:
            client.close()
            raise

    def node_mkdir(self, node: str, path: str) -> bool:
        """Make ``path`` (0700) on the node; False when it exists already (somebody else's: never taken)."""
        client, sftp = self._sftp(node)
        try:
            try:
                sftp.stat(path)
                return False
            except FileNotFoundError:
                pass
            try:
                sftp.mkdir(path, mode=0o700)
            except OSError as err:
                raise HypervisorError(f"making {path} on node {node}: {err}") from None
            return True
        finally:
            client.close()

    def node_write(self, node: str, path: str, segments: Iterator[Segment], length: int) -> str:
        """Write a new file (exclusive) on the node, holes left as holes; returns its key (size and mtime)."""
        client, sftp = self._sftp(node)
        try:
            try:
                fh = sftp.open(path, "wx")
            except OSError as err:
                raise HypervisorError(f"creating {path} on node {node}: {err}") from None
            with fh:
                fh.set_pipelined(True)
                pos = 0
                for seg in segments:
                    if seg.data is None:
                        fh.seek(pos + seg.length)
                    else:
                        fh.seek(pos)
                        fh.write(seg.data)
                    pos += seg.length
                if pos != length:
                    raise HypervisorError(f"the disk's stream ended after {pos} of {length} bytes")
                fh.truncate(length)  # a trailing hole
            st = sftp.stat(path)
            return f"size={st.st_size};mtime={st.st_mtime}"
        finally:
            client.close()

    def node_file_key(self, node: str, path: str) -> str | None:
        client, sftp = self._sftp(node)
        try:
            try:
                st = sftp.stat(path)
            except FileNotFoundError:
                return None
            return f"size={st.st_size};mtime={st.st_mtime}"
        finally:
            client.close()

    def node_remove(self, node: str, path: str, *, key: str | None = None, folder: bool = False) -> str:
        """Remove a file this run wrote (only while it is the one recorded: ``key``), or its folder when empty:
        "removed", "gone" (it was not there) or "kept" (another file, not empty, or the node refused; logged)."""
        client, sftp = self._sftp(node)
        try:
            try:
                st = sftp.stat(path)
            except FileNotFoundError:
                return "gone"
            try:
                if folder:
                    sftp.rmdir(path)
                    return "removed"
                if key is not None and f"size={st.st_size};mtime={st.st_mtime}" != key:
                    log.warning("kept %s on node %s: not the file this run wrote", path, node)
                    return "kept"
                sftp.remove(path)
                return "removed"
            except OSError as err:
                log.warning("could not remove %s on node %s: %s", path, node, err)
                return "kept"
        finally:
            client.close()

    def qm_importdisk(self, node: str, vmid: int, path: str, storage: str, fmt: str) -> str:
        """``qm importdisk`` the file into a new volume of VM ``vmid`` (as an unused disk); its volume id."""
        before = set(self._config(node, vmid))
        command = ["qm", "importdisk", str(vmid), path, storage]
        if self.file_storage(node, storage):
            command += ["--format", fmt]
        client = self.pve.ssh(self._node_host(node))
        try:
            self.pve.run(client, command, f"importing {path} into VM {vmid}", timeout=TASK_TIMEOUT)
        except TimeoutError:
            raise HypervisorError(f"qm importdisk of {path} into VM {vmid} said nothing for {TASK_TIMEOUT:.0f} s"
                                  ) from None
        finally:
            client.close()
        config = self._config(node, vmid)
        new = [k for k in config if k.startswith("unused") and k not in before]
        if len(new) != 1:
            raise TargetCreationError(f"qm importdisk of {path} left {len(new)} new unused disks on VM {vmid}")
        return parse_prop(str(config[new[0]])).get("file", str(config[new[0]]))

    def attach_disks(self, node: str, vmid: int, disks: Mapping[str, str], boot: str | None) -> None:
        """Attach imported volumes (config key -> volid) and set the boot disk."""
        params: dict[str, Any] = dict(disks)
        if boot:
            params["boot"] = f"order={boot}"
        upid = self.pve.call(f"attaching the disks of VM {vmid}",
                             lambda api: api.nodes(node).qemu(vmid).config.post(**params))
        if upid:
            self.pve.wait(node, str(upid), f"attaching the disks of VM {vmid}")

    def next_vmid(self) -> int:
        return int(self.pve.call("asking for a free VMID", lambda api: api.cluster.nextid.get()))

    def delete_vm(self, vm_id: str) -> bool:
        """Destroy the VM with its disks (the VM's own volumes: a migrated VM's disks belong to its VMID only)."""
        if not self._exists(vm_id):
            return False
        node, vmid = self._split(vm_id)
        status = self.pve.call(f"reading VM {vmid}", lambda api: api.nodes(node).qemu(vmid).status.current.get())
        if status.get("status") == "running":
            self.pve.wait(node, self.pve.call(f"stopping VM {vmid}",
                                              lambda api: api.nodes(node).qemu(vmid).status.stop.post()),
                          f"stopping VM {vmid}")
        # its referenced volumes only: destroy-unreferenced-disks would also take any vm-<vmid>-* volume someone
        # left on a storage before this VMID was handed out
        upid = self.pve.call(f"destroying VM {vmid}", lambda api: api.nodes(node).qemu(vmid).delete(purge=1))
        self.pve.wait(node, upid, f"destroying VM {vmid}")
        return True

    def delete_source_vm(self, vm_id: str, volumes: Sequence[tuple[str, str]]) -> list[str]:
        """Destroy the source VM with its disks, only when every disk it has now is one the plan lists."""
        from include.errors import PlanChanged

        if not self._exists(vm_id):
            return []
        info = self._vm_info(*self._split(vm_id))
        planned = {volume for _pool, volume in volumes}
        config = self._config(*self._split(vm_id))
        # every volume the VM references is destroyed with it: unused disks, EFI vars, TPM state, cloud-init too
        referenced = [parse_prop(v).get("file", "") for k, v in config.items()
                      if re.match(r"^(scsi|virtio|sata|ide|unused|efidisk|tpmstate)\d+$", k)
                      and "media=cdrom" not in str(v)]
        extra = [v for v in referenced if ":" in v and v not in planned]
        if extra:
            raise PlanChanged(f"deleteSource: VM {vm_id} now has disks the validated plan does not name "
                              f"({', '.join(str(e) for e in extra)}); it is kept",
                              field="spec.cleanupPolicy.deleteSource")
        self.delete_vm(vm_id)
        return [f"VM {info.name} ({vm_id}) with its disks {', '.join(sorted(planned))}"]


def _described_disks(description: str) -> dict[str, str]:
    """config key -> disk name, from the description line the engine writes."""
    for line in str(description).splitlines():
        if line.startswith(DISKS_LINE):
            return dict(p.split("=", 1) for p in line[len(DISKS_LINE):].split(",") if "=" in p)
    return {}
