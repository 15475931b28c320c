"""A running Proxmox VE VM read at a PVE snapshot, against the test server (its API and a real sshd): a qcow2 on
the directory storage through its internal snapshot, a raw volume on LVM-thin through its snapshot volume
(activated, read, deactivated), while the guest writes to both right after the snapshot; what is read is the
disk at the snapshot, holes as holes, and ending the point in time removes the snapshot."""

from __future__ import annotations

import json

from include.providers.proxmox_driver import ProxmoxDriver
from tests.e2e import pve_world as pw
from tests.e2e.vsphere_world import pattern_disk


def _driver(pve) -> ProxmoxDriver:
    creds = pw.provider_docs(pve, "pve")[1]["stringData"]
    return ProxmoxDriver(pve.url, creds)


def test_each_disk_is_read_as_it_was_at_the_snapshot(pve, tmp_path):
    raws, disks = {}, []
    for index, (key, storage, fmt, size) in enumerate((("scsi0", "local", "qcow2", 12), ("scsi1", "local-lvm",
                                                                                       "raw", 8))):
        raw = tmp_path / f"{key}.raw"
        pattern_disk(raw, size, seed=index + 71)
        raws[key] = raw
        disks.append((key, storage, fmt, 2 * size * pw.MiB, raw))  # its second half never written: a hole
    pve.add_vm("pve1", 110, "live", disks=disks, running=True)
    pve.guest_writes(110)
    driver = _driver(pve)
    vm = driver.get_vm("live")
    assert driver.live_export_refusal(vm) is None
    pit = driver.begin_point_in_time("live", vm.disks, str(tmp_path / "vmm-abc"))
    assert driver.point_in_time_active("live", pit.handle)
    for disk, key in zip(vm.disks, ("scsi0", "scsi1"), strict=True):
        stream, length, _data = driver.read_point_in_time(pit.handle, disk)
        got, sent = bytearray(), 0
        for seg in stream:
            got += bytes(seg.length) if seg.data is None else bytes(seg.data)
            sent += 0 if seg.data is None else seg.length
        assert len(got) == length == disk.capacity
        assert bytes(got) == raws[key].read_bytes().ljust(length, b"\0"), f"{key} is not the disk at the snapshot"
        assert sent < length, f"{key}: its holes were sent"
        current = pve.disk_files(110)[key]
        assert current.read_bytes()[:16] != raws[key].read_bytes()[:16] or disk.format == "qcow2", \
            "the guest wrote to the volume after the snapshot"
    assert json.loads((pve.workdir / "lvm-active.json").read_text()) == [], "the snapshot volume is deactivated"
    assert driver.end_point_in_time("live", pit.handle)
    assert not driver.point_in_time_active("live", pit.handle)
    assert [s["name"] for s in pve.proxmox().nodes("pve1").qemu(110).snapshot.get()] == ["current"]


def test_a_running_vm_on_a_storage_we_cannot_read_at_a_snapshot_is_refused_naming_the_disk(pve):
    pve.add_vm("pve1", 111, "rawdir", disks=[("scsi0", "local", "raw", 4 << 20)], running=True)
    driver = _driver(pve)
    refusal = driver.live_export_refusal(driver.get_vm("rawdir"))
    assert refusal and "sda (local:111/vm-111-disk-0.raw, raw on dir storage local)" in refusal, refusal
