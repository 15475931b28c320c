"""include/plan.py: transit formats, where conversions happen, and the plan document."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest

from include.errors import InvalidMigration
from include.inventory import BundleInventory, resolve
from include.model import Plan
from include.plan import GIB as GB
from include.plan import STAGING_ENV, build_plan, choose_formats, describe, snapshot_name, staging_root
from include.providers.base import DiskInfo, NicInfo, VMInfo
from include.spec import API_VERSION, parse_vmmigration
from include.store import index_documents

FORMATS = ("qcow2", "raw", "vmdk")


# -- choose_formats -------------------------------------------------------------------------------------------

EXPECTED_FORMATS = {
    ("qcow2", "qcow2"): ("qcow2", "none"),
    ("qcow2", "raw"): ("raw", "source"),
    ("qcow2", "vmdk"): ("qcow2", "target"),
    ("raw", "qcow2"): ("qcow2", "source"),
    ("raw", "raw"): ("raw", "none"),
    ("raw", "vmdk"): ("vmdk", "source"),
    ("vmdk", "qcow2"): ("vmdk", "target"),
    ("vmdk", "raw"): ("raw", "source"),
    ("vmdk", "vmdk"): ("vmdk", "none"),
}


@pytest.mark.parametrize(("source", "target"), list(itertools.product(FORMATS, FORMATS)))
def test_choose_formats_all_combinations(source, target):
    transit, side = choose_formats(source, target)
    assert (transit, side) == EXPECTED_FORMATS[(source, target)]
    # the rule: same -> none; raw on either side -> at the source, to the target format (a compact
    # source bound for raw leaves as its guest data, holes left out); else travel as source
    if source == target:
        assert (transit, side) == (source, "none")
    elif "raw" in (source, target):
        assert (transit, side) == (target, "source")
    else:
        assert (transit, side) == (source, "target")
    # raw travels only when raw is what the target wants (and then only its data: holes never travel)
    assert transit != "raw" or target == "raw"


def test_all_nine_combinations_are_covered():
    assert set(EXPECTED_FORMATS) == set(itertools.product(FORMATS, FORMATS))


# -- fixtures -------------------------------------------------------------------------------------------------------

def bundle(**spec: Any) -> list[dict[str, Any]]:
    body = {
        "sourceName": "web",
        "targetProviderRef": {"name": "kvm-target"},
        "targetName": "web-new",
        "storage": {"type": "nfs", "path": "/mnt/share", "endpoint": "nfs.local"},
    }
    body.update(spec)
    provider = {"type": "libvirt", "endpoint": "qemu:///system"}
    return [
        {"apiVersion": API_VERSION, "kind": "VMMigration", "metadata": {"name": "move-web", "namespace": "apps"},
         "spec": body},
        {"apiVersion": API_VERSION, "kind": "VirtualMachine", "metadata": {"name": "web", "namespace": "apps"},
         "spec": {"providerRef": {"name": "kvm-source"}}, "status": {"id": "web-domain"}},
        {"apiVersion": API_VERSION, "kind": "Provider", "metadata": {"name": "kvm-source", "namespace": "apps"},
         "spec": {**provider, "endpoint": "qemu+ssh://kvm1/system"}},
        {"apiVersion": API_VERSION, "kind": "Provider", "metadata": {"name": "kvm-target", "namespace": "apps"},
         "spec": provider},
    ]


def resolved_for(**spec: Any):
    index = index_documents([(Path("bundle.yaml"), bundle(**spec))])
    return resolve(parse_vmmigration(index.migrations["apps/move-web"].doc), BundleInventory(index.objects))


VDA = DiskInfo(name="vda", format="qcow2", capacity=10 * GB, allocation=3 * GB,
               path="/var/lib/libvirt/images/web.qcow2", pool="default", volume="web.qcow2")
VDB = DiskInfo(name="vdb", format="raw", capacity=20 * GB, allocation=1 * GB, path="/dev/vg/web-data", bus="scsi")
VM = VMInfo(name="web-domain", running=False, vcpus=2, memory_mib=2048, disks=(VDA, VDB))


# -- build_plan --------------------------------------------------------------------------------------------------------

def test_plan_header():
    plan = build_plan(resolved_for(), VM, target_storage="fast-pool").to_dict()
    assert plan["migration"] == "apps/move-web"
    assert plan["dagId"] == "vmmigration__apps__move-web"
    assert plan["source"] == {"provider": "apps/kvm-source", "type": "libvirt", "endpoint": "qemu+ssh://kvm1/system",
                              "vm": "web-domain", "vmId": None, "running": False, "vcpus": 2, "memoryMiB": 2048,
                              "skipped": []}
    assert plan["target"] == {"provider": "apps/kvm-target", "type": "libvirt", "endpoint": "qemu:///system",
                              "vm": "web-new", "storage": "fast-pool", "vcpus": 2, "memoryMiB": 2048,
                              "networks": [], "nicModels": [], "options": {}}
    assert plan["storage"] == {"type": "nfs", "prefix": "apps/move-web", "compression": None,
                               "spec": {"type": "nfs", "bucket": None, "endpoint": plan["storage"]["spec"]["endpoint"],
                                        "region": None, "path": plan["storage"]["spec"]["path"]},
                               "effectiveEndpoint": plan["storage"]["spec"]["endpoint"]}
    assert set(plan["pin"]) == {"spec", "source", "target", "storage"}
    assert plan["phases"] == ["Validating", "Snapshotting", "Exporting", "Transferring", "Converting", "Importing",
                              "Creating", "ValidatingTarget", "Ready"]
    assert plan["cleanup"] == {"deleteIntermediate": True, "deleteSnapshot": True, "deleteSource": False,
                               "deleteRunningSource": False}


def test_plan_disks_with_native_target_format():
    plan = build_plan(resolved_for(), VM, target_storage="fast-pool").to_dict()
    vda, vdb = plan["disks"]
    # libvirt's native format is qcow2
    assert vda == {
        "name": "vda", "sizeBytes": 10 * GB, "allocatedBytes": 3 * GB, "sourceFormat": "qcow2",
        "sourcePath": "/var/lib/libvirt/images/web.qcow2", "sourcePool": "default", "sourceVolume": "web.qcow2",
        "bus": "virtio", "transitFormat": "qcow2", "conversion": "none", "targetFormat": "qcow2",
        "objectKey": "apps/move-web/vda.qcow2", "targetStorage": "fast-pool", "targetVolume": "web-new-vda.qcow2",
        "targetCapacity": 10 * GB, "targetBus": "virtio", "live": False,
    }
    # raw source: converted to qcow2 before it leaves
    assert (vdb["transitFormat"], vdb["conversion"], vdb["targetFormat"]) == ("qcow2", "source", "qcow2")
    assert vdb["objectKey"] == "apps/move-web/vdb.qcow2"
    assert vdb["targetVolume"] == "web-new-vdb.qcow2"
    assert (vdb["sourcePool"], vdb["sourceVolume"], vdb["bus"], vdb["targetBus"]) == (None, None, "scsi", "scsi")


def test_the_target_hypervisor_maps_the_disk_bus():
    from include.providers.libvirt_driver import LibvirtDriver

    assert [LibvirtDriver.disk_bus(b) for b in ("virtio", "sata", "pvscsi", "lsilogic", "nvme")] == \
        ["virtio", "sata", "scsi", "scsi", "virtio"]


@pytest.mark.parametrize("target_fmt", FORMATS)
def test_plan_follows_target_disk_format(target_fmt):
    plan = build_plan(resolved_for(targetDiskFormat=target_fmt), VM, target_storage="pool").to_dict()
    for disk, source in zip(plan["disks"], VM.disks):
        transit, conversion = choose_formats(source.format, target_fmt)
        assert (disk["transitFormat"], disk["conversion"], disk["targetFormat"]) == (transit, conversion, target_fmt)
        assert disk["objectKey"] == f"apps/move-web/{source.name}.{transit}"
        assert disk["targetVolume"] == f"web-new-{source.name}.{target_fmt}"


def test_target_name_defaults_to_source_name_in_volume_names():
    body_without_target_name = {"targetName": None}
    plan = build_plan(resolved_for(**body_without_target_name), VM, target_storage="pool").to_dict()
    assert plan["target"]["vm"] == "web"
    assert [d["targetVolume"] for d in plan["disks"]] == ["web-vda.qcow2", "web-vdb.qcow2"]


def test_resource_and_network_hints():
    resolved = resolved_for(targetResourceHints={"cpu": 4, "memory": 8192, "disk": 100},
                            targetNetworkHints=[{"name": "eth0", "bridge": "virbr0"},
                                                {"name": "eth1", "network": "VM Network"}])
    plan = build_plan(resolved, VM, target_storage="pool").to_dict()
    assert (plan["target"]["vcpus"], plan["target"]["memoryMiB"]) == (4, 8192)
    assert plan["target"]["networks"] == [{"name": "eth0", "bridge": "virbr0"},
                                          {"name": "eth1", "network": "VM Network"}]
    # the disk hint grows the first disk only
    assert [d["targetCapacity"] for d in plan["disks"]] == [100 * GB, 20 * GB]
    assert [d["sizeBytes"] for d in plan["disks"]] == [10 * GB, 20 * GB]


def test_disk_hint_equal_to_the_disk_is_fine():
    plan = build_plan(resolved_for(targetResourceHints={"disk": 10}), VM, target_storage="pool").to_dict()
    assert plan["disks"][0]["targetCapacity"] == 10 * GB


def test_disk_hint_smaller_than_the_source_disk_is_refused():
    with pytest.raises(InvalidMigration) as info:
        build_plan(resolved_for(targetResourceHints={"disk": 5}), VM, target_storage="pool")
    err = info.value
    assert err.field == "spec.targetResourceHints.disk"
    assert str(err) == "spec.targetResourceHints.disk: 5 GiB is smaller than disk vda (10GiB); disks are never shrunk"
    assert err.permanent is True
    assert err.reason == "ValidationFailed"


def test_snapshot_covers_disks_only_when_all_are_qcow2():
    mixed = build_plan(resolved_for(), VM, target_storage="pool").to_dict()
    assert mixed["snapshot"] == {"name": "vmmigration-move-web", "disks": [], "mode": "snapshot"}
    all_qcow2 = VMInfo(name="web-domain", running=False, vcpus=1, memory_mib=512,
                       disks=(VDA, DiskInfo(name="vdc", format="qcow2", capacity=GB, allocation=GB, path="/x.qcow2")))
    plan = build_plan(resolved_for(), all_qcow2, target_storage="pool").to_dict()
    assert plan["snapshot"] == {"name": "vmmigration-move-web", "disks": ["vda", "vdc"], "mode": "snapshot"}
    assert snapshot_name("move-web") == "vmmigration-move-web"


def test_vm_without_disks():
    plan = build_plan(resolved_for(targetResourceHints={"disk": 1}), VMInfo("empty", False, 1, 256, ()),
                      target_storage="pool")
    assert plan.disks == ()
    assert plan.snapshot.disks == ()
    assert "disks (0):" in describe(plan)


def test_cleanup_policy_is_copied():
    plan = build_plan(resolved_for(cleanupPolicy={"deleteIntermediate": False, "deleteSource": True}), VM,
                      target_storage="pool").to_dict()
    assert plan["cleanup"] == {"deleteIntermediate": False, "deleteSnapshot": True, "deleteSource": True,
                               "deleteRunningSource": False}


def test_staging_root(monkeypatch, tmp_path):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path))
    assert staging_root() == tmp_path
    monkeypatch.delenv(STAGING_ENV)
    import tempfile

    # each migration stages in a private mkdtemp folder inside it, never in a predictable path
    assert staging_root() == Path(tempfile.gettempdir())


# -- describe -------------------------------------------------------------------------------------------------------

def test_describe_mentions_disks_conversions_phases_and_cleanup():
    resolved = resolved_for(targetDiskFormat="vmdk", targetNetworkHints=[{"name": "eth0", "bridge": "virbr0"},
                                                                         {"name": "eth1", "network": "VM Network"}])
    text = describe(build_plan(resolved, VM, target_storage="datastore1"), storage_location="nfs.local:/mnt/share")
    lines = text.splitlines()
    assert lines[0] == "Migration apps/move-web  (DAG vmmigration__apps__move-web)"
    assert "source: VM web-domain on libvirt provider apps/kvm-source (qemu+ssh://kvm1/system), 2 vCPU, 2048 MiB" \
        in text
    assert "target: VM web-new on libvirt provider apps/kvm-target (qemu:///system), storage datastore1" in text
    assert "nic eth0 -> bridge virbr0" in text
    assert "nic eth1 -> network VM Network" in text
    assert "storage: nfs at nfs.local:/mnt/share" in text
    assert "disks (2):" in text
    vda_line = next(line for line in lines if line.strip().startswith("vda:"))
    assert "10GiB virtual, 3GiB allocated, qcow2" in vda_line
    assert "convert qcow2 -> vmdk after download" in vda_line
    assert "travels as qcow2 (apps/move-web/vda.qcow2)" in vda_line
    assert "lands as datastore1/web-new-vda.vmdk" in vda_line
    vdb_line = next(line for line in lines if line.strip().startswith("vdb:"))
    assert "convert raw -> vmdk before upload" in vdb_line
    assert "travels as vmdk (apps/move-web/vdb.vmdk)" in vdb_line
    assert ("phases: Validating -> Snapshotting -> Exporting -> Transferring -> Converting -> Importing -> Creating "
            "-> ValidatingTarget -> Ready") in text
    assert "snapshot: vmmigration-move-web of no disk (the source hypervisor cannot snapshot these disks)" in text
    assert "cleanup after success: delete intermediate files, delete the snapshot, keep the source VM" in text
    assert lines[-1] == "  after a failure: the partial target is removed, the source VM is always kept"


def test_describe_without_conversion_and_with_dangerous_cleanup():
    resolved = resolved_for(cleanupPolicy={"deleteIntermediate": False, "deleteSnapshot": False,
                                           "deleteSource": True})
    vm = VMInfo(name="web-domain", running=False, vcpus=1, memory_mib=512, disks=(VDA,))
    text = describe(build_plan(resolved, vm, target_storage="pool"))
    assert "no conversion" in text
    assert "storage: nfs at apps/move-web" in text  # the prefix when no location is given
    assert "snapshot: vmmigration-move-web of vda" in text
    assert "keep intermediate files, keep the snapshot, DELETE THE SOURCE VM" in text


# -- the typed plan as stored ------------------------------------------------------------------------------------

def test_plan_reads_back_typed_from_its_stored_form():
    """What Validating saves (JSON, camelCase) reads back as the same typed plan every later phase uses."""
    import json

    from include.model import Conversion, Plan

    resolved = resolved_for(targetNetworkHints=[{"name": "eth0", "bridge": "virbr0"}])
    plan = build_plan(resolved, VM, target_storage="pool")
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert again.disk("vdb").conversion is Conversion.SOURCE
    assert again.target.networks[0].bridge == "virbr0"
    assert again.source.scope == "libvirt:qemu+ssh://kvm1/system"


def test_a_plan_missing_a_field_is_refused_naming_it():
    from include.errors import InvalidMigration
    from include.model import Plan

    stored = build_plan(resolved_for(), VM, target_storage="pool").to_dict()
    del stored["disks"][1]["objectKey"]
    with pytest.raises(InvalidMigration, match="no 'objectKey' in its DiskPlan"):
        Plan.from_dict(stored)
    with pytest.raises(InvalidMigration, match="disk 'vdz' is not in the plan"):
        build_plan(resolved_for(), VM, target_storage="pool").disk("vdz")


def test_a_plan_saved_before_the_bus_was_mapped_still_reads():
    """A run validated by the previous version goes on (and can be rolled back) after an upgrade."""
    from include.model import Plan

    stored = build_plan(resolved_for(), VM, target_storage="pool").to_dict()
    for d in stored["disks"]:
        del d["targetBus"]
    del stored["disks"][0]["bus"]
    del stored["specFiles"]
    plan = Plan.from_dict(stored)
    assert [(d.bus, d.target_bus) for d in plan.disks] == [("virtio", "virtio"), ("scsi", "scsi")]
    assert plan.spec_files == ()


def test_the_target_hypervisor_maps_each_nic_model():
    """The plan gives each network hint the model of the source NIC in its place, as the target maps it."""
    from include.providers.libvirt_driver import LibvirtDriver

    assert [LibvirtDriver.nic_model(m) for m in ("virtio", "e1000", "E1000E", "vmxnet3", "netvsc", None)] == \
        ["virtio", "e1000", "e1000e", "virtio", "virtio", "virtio"]
    vm = dataclasses.replace(VM, interfaces=(NicInfo(network="VM Network", model="vmxnet3"),
                                             NicInfo(network="Backup", model="e1000")))
    hints = [{"name": "eth0", "network": "default"}, {"name": "eth1", "network": "backup"},
             {"name": "eth2", "bridge": "br0"}]
    plan = build_plan(resolved_for(targetNetworkHints=hints), vm, target_storage="pool")
    assert plan.target.nic_models == ("virtio", "e1000", "virtio")
    assert plan.to_dict()["target"]["nicModels"] == ["virtio", "e1000", "virtio"]
    assert Plan.from_dict(plan.to_dict()).target.nic_models == plan.target.nic_models


# -- a running source --------------------------------------------------------------------------------------------------

RUNNING = VMInfo(name="web-domain", running=True, vcpus=2, memory_mib=2048, disks=(VDA, VDB))


def test_a_running_vm_is_planned_from_one_point_in_time():
    plan = build_plan(resolved_for(), RUNNING, target_storage="pool")
    assert plan.snapshot.live and plan.snapshot.disks == ("vda", "vdb")
    # every disk leaves as its guest data, converted on arrival when the target is not raw
    assert [(d.live, d.transit_format, d.conversion.value, d.target_format) for d in plan.disks] == [
        (True, "raw", "target", "qcow2"), (True, "raw", "target", "qcow2")]
    text = describe(plan)
    assert "exported live from the point in time" in text and "keeps running" in text


def test_a_running_vm_bound_for_raw_is_not_converted():
    plan = build_plan(resolved_for(targetDiskFormat="raw"), RUNNING, target_storage="pool")
    assert [(d.transit_format, d.conversion.value) for d in plan.disks] == [("raw", "none"), ("raw", "none")]


def test_boot_check_annotations_are_planned_and_bad_ones_refused():
    index = index_documents([(Path("bundle.yaml"), bundle())])
    doc = index.migrations["apps/move-web"].doc
    doc["metadata"]["annotations"] = {"vmmigration.virtrigaud.io/boot-check": "serial",
                                      "vmmigration.virtrigaud.io/boot-check-timeout": "45"}
    resolved = resolve(parse_vmmigration(doc), BundleInventory(index.objects))
    plan = build_plan(resolved, VM, target_storage="pool")
    assert plan.boot_check is not None and plan.boot_check.timeout == 45.0
    assert Plan.from_dict(plan.to_dict()).boot_check == plan.boot_check
    assert "boot check: the target boots once with NIC links down" in describe(plan)
    doc["metadata"]["annotations"]["vmmigration.virtrigaud.io/boot-check"] = "maybe"
    resolved = resolve(parse_vmmigration(doc), BundleInventory(index.objects))
    with pytest.raises(InvalidMigration, match=r"metadata.annotations\[vmmigration.virtrigaud.io/boot-check\]"):
        build_plan(resolved, VM, target_storage="pool")
