"""What the vSphere adapter decides without a connection: names, buses, NIC models, the upload choice pinned
in the plan and the VMDK subformat it implies, the OVF of an import, datastore paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from include.errors import InvalidMigration
from include.inventory import BundleInventory, resolve
from include.plan import build_plan
from include.providers.base import DiskInfo, NicInfo, VMInfo
from include.providers.vsphere_driver import VSphereDriver, carrier_ovf, split_ds_path
from include.spec import API_VERSION, parse_vmmigration
from include.store import index_documents

GB = 1 << 30


def resolved(annotations: dict[str, str] | None = None) -> Any:
    target_meta: dict[str, Any] = {"name": "vc", "namespace": "apps"}
    if annotations is not None:
        target_meta["annotations"] = annotations
    docs = [
        {"apiVersion": API_VERSION, "kind": "VMMigration", "metadata": {"name": "m", "namespace": "apps"},
         "spec": {"sourceName": "web", "targetProviderRef": {"name": "vc"}, "targetName": "web-vc",
                  "targetNetworkHints": [{"name": "eth0", "network": "VM Network"},
                                         {"name": "eth1", "network": "VM Network 2"}],
                  "storage": {"type": "nfs", "path": "/mnt/share", "endpoint": "nfs.local"}}},
        {"apiVersion": API_VERSION, "kind": "VirtualMachine", "metadata": {"name": "web", "namespace": "apps"},
         "spec": {"providerRef": {"name": "kvm"}}, "status": {"id": "web"}},
        {"apiVersion": API_VERSION, "kind": "Provider", "metadata": {"name": "kvm", "namespace": "apps"},
         "spec": {"type": "libvirt", "endpoint": "qemu:///system"}},
        {"apiVersion": API_VERSION, "kind": "Provider", "metadata": target_meta,
         "spec": {"type": "vsphere", "endpoint": "https://vc.example.com/sdk"}},
    ]
    index = index_documents([(Path("b.yaml"), docs)])
    return resolve(parse_vmmigration(index.migrations["apps/m"].doc), BundleInventory(index.objects))


VM = VMInfo(name="web", running=False, vcpus=2, memory_mib=2048,
            disks=(DiskInfo(name="vda", format="qcow2", capacity=10 * GB, allocation=GB, path="/p/vda.qcow2"),
                   DiskInfo(name="vdb", format="raw", capacity=GB, allocation=GB, path="/p/vdb.raw", bus="sata")),
            interfaces=(NicInfo(network="default", model="virtio"), NicInfo(network="lan", model="e1000")))


def test_libvirt_to_vsphere_plan():
    plan = build_plan(resolved(), VM, target_storage="datastore1")
    vda, vdb = plan.disks
    assert (vda.target_format, vda.transit_format, vda.conversion.value) == ("vmdk", "qcow2", "target")
    assert vda.target_volume == "web-vc/web-vc-vda.vmdk"
    assert (vda.target_bus, vdb.target_bus) == ("pvscsi", "sata")
    assert plan.target.nic_models == ("vmxnet3", "e1000")
    assert plan.target.options == {"upload": "nfc"}
    assert VSphereDriver.vmdk_subformat_for(plan.target.options) == "streamOptimized"


def test_the_datastore_upload_is_chosen_by_the_providers_annotation_and_pinned():
    plan = build_plan(resolved({"vmmigration.virtrigaud.io/vsphere-disk-upload": "datastore"}), VM,
                      target_storage="datastore1")
    assert plan.target.options == {"upload": "datastore"}
    assert VSphereDriver.vmdk_subformat_for(plan.target.options) == "monolithicSparse"
    assert type(plan).from_dict(plan.to_dict()).target.options == {"upload": "datastore"}


def test_a_bad_upload_annotation_names_the_provider():
    with pytest.raises(InvalidMigration, match=r"spec.targetProviderRef: Provider apps/vc annotation .*'ftp'"):
        build_plan(resolved({"vmmigration.virtrigaud.io/vsphere-disk-upload": "ftp"}), VM, target_storage="ds")


def test_buses_and_nics_from_elsewhere():
    assert [VSphereDriver.disk_bus(b) for b in ("virtio", "scsi", "sata", "ide", "nvme", "lsilogic")] == \
        ["pvscsi", "pvscsi", "sata", "ide", "nvme", "lsilogic"]
    assert [VSphereDriver.nic_model(m) for m in ("virtio", "e1000", "E1000E", None, "rtl8139")] == \
        ["vmxnet3", "e1000", "e1000e", "vmxnet3", "vmxnet3"]


def test_datastore_paths_and_the_import_descriptor():
    assert split_ds_path("[datastore1] web/web-vda.vmdk") == ("datastore1", "web/web-vda.vmdk")
    ovf = carrier_ovf('a"b<c', 10 * GB, 12345)
    assert 'ovf:capacity="10737418240"' in ovf and 'ovf:size="12345"' in ovf
    import xml.etree.ElementTree as ET

    system = ET.fromstring(ovf).find("{http://schemas.dmtf.org/ovf/envelope/1}VirtualSystem")
    assert system.get("{http://schemas.dmtf.org/ovf/envelope/1}id") == 'a"b<c'  # quoted, never spliced in raw
