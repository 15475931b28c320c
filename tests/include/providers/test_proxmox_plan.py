"""What the Proxmox VE adapter decides without a connection: buses, NIC models, snapshot names, property strings,
sizes, and that a block storage's raw volume satisfies a plan for qcow2."""

from __future__ import annotations

from include.providers.proxmox_driver import ProxmoxDriver, _described_disks, parse_prop, parse_size


def test_buses_nics_and_formats():
    assert [ProxmoxDriver.disk_bus(b) for b in ("virtio", "scsi", "sata", "ide", "pvscsi", "lsilogic", "nvme")] == \
        ["virtio", "scsi", "sata", "ide", "scsi", "scsi", "scsi"]
    assert [ProxmoxDriver.nic_model(m) for m in ("virtio", "e1000", "vmxnet3", None, "ne2k_pci")] == \
        ["virtio", "e1000", "vmxnet3", "virtio", "virtio"]
    assert ProxmoxDriver.format_matches("qcow2", "qcow2") and ProxmoxDriver.format_matches("qcow2", "raw")
    assert not ProxmoxDriver.format_matches("raw", "qcow2")
    assert ProxmoxDriver.target_volume_name("web", "vda", "qcow2") == "web-vda.qcow2"


def test_snapshot_names_are_what_pve_takes():
    import re

    for name in ("vmmigration-proxmox-to-kvm", "vmmigration-" + "x" * 60, "9-lives"):
        snap = ProxmoxDriver.snapname(name)
        assert re.fullmatch(r"[a-z][a-z0-9_]+", snap) and len(snap) <= 40


def test_property_strings_and_sizes():
    assert parse_prop("local-lvm:vm-100-disk-0,iothread=1,size=32G") == {
        "file": "local-lvm:vm-100-disk-0", "iothread": "1", "size": "32G"}
    assert [parse_size(s) for s in ("32G", "512M", "1.5G", "1073741824", "", None)] == \
        [32 << 30, 512 << 20, 3 << 29, 1 << 30, 0, 0]
    description = ("Migrated by the VM migration engine\nvmmigration-owner: a/b r1\n"
                   "vmmigration-disks: scsi0=vda,scsi1=vdb")
    assert _described_disks(description) == {"scsi0": "vda", "scsi1": "vdb"}
