"""The test guest: the record checker on synthetic disks, and the real guest booted under libvirt."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.guest import records
from tests.guest.virt import virt_type

HERE = Path(__file__).resolve().parent
BOOT_A = "11111111-2222-3333-4444-555555555555"
BOOT_B = "66666666-7777-8888-9999-aaaaaaaaaaaa"
MARKER = b"VMMIGRATION-GUEST-BOOTED"


def disk(n: int, sectors: int = 64, boot: str = BOOT_A, header: bool = True) -> bytearray:
    data = bytearray(sectors * records.SECTOR)
    if header:
        data[: records.SECTOR] = records.format_header(n + 1, boot)
    for seq in range(1, n + 1):
        data[seq * records.SECTOR : (seq + 1) * records.SECTOR] = records.format_record(seq, boot, f"{seq / 10:.2f}")
    return data


# ---- records.py on synthetic data ----

def test_intact():
    rep = records.parse(bytes(disk(10)))
    assert (rep.valid, rep.highest, rep.contiguous, rep.header_next) == (10, 10, 10, 11)
    assert rep.complete and rep.first_bad is None and rep.tail == "zeros"
    assert rep.boot_ids == [BOOT_A] and rep.boot_runs == [(BOOT_A, 1, 10)]
    records.check_consistent(rep, min_records=10)
    assert records.scan(io.BytesIO(bytes(disk(3)))).highest == 3


def test_empty_disk():
    rep = records.parse(bytes(64 * records.SECTOR))
    assert (rep.valid, rep.highest, rep.header_next, rep.tail) == (0, 0, None, "empty")
    records.check_consistent(rep, min_records=0)
    with pytest.raises(AssertionError, match="only 0 record"):
        records.check_consistent(rep)


def test_hole():
    data = disk(10)
    data[4 * 512 : 5 * 512] = bytes(512)
    rep = records.parse(bytes(data))
    assert (rep.valid, rep.highest, rep.contiguous, rep.first_bad) == (9, 10, 3, 4)
    assert rep.bad == {4: "zeros"} and not rep.complete
    with pytest.raises(AssertionError, match="first bad sector 4"):
        records.check_consistent(rep)


def test_corrupt_record():
    data = disk(10)
    data[6 * 512 + 20] ^= 0x01        # one flipped bit in the first line of record 6
    rep = records.parse(bytes(data))
    assert rep.first_bad == 6 and rep.bad[6] in ("checksum mismatch", "malformed first line")
    with pytest.raises(AssertionError, match="first bad sector 6"):
        records.check_consistent(rep)
    data = disk(10)
    data[7 * 512 + 300] = 0x41        # garbage in the padding
    assert records.parse(bytes(data)).bad == {7: "garbage after the checksum"}


def test_misplaced_record():
    data = disk(10)
    data[5 * 512 : 6 * 512] = records.format_record(4, BOOT_A)
    rep = records.parse(bytes(data))
    assert rep.first_bad == 5 and "sequence 4 at sector 5" in rep.bad[5]


def test_truncated_and_torn_tail():
    data = bytes(disk(10, sectors=11))[: 10 * 512 + 100]   # image ends inside record 10
    rep = records.parse(data)
    assert rep.truncated and rep.highest == 9 and rep.tail == "truncated" and rep.sectors == 10
    with pytest.raises(AssertionError, match="header claims next=11"):
        records.check_consistent(rep)   # the header says record 10 was written: the copy lost it
    records.check_consistent(records.parse(records.format_header(10, BOOT_A) + data[512:]))
    data = disk(10)
    data[10 * 512 + 60 : 11 * 512] = bytes(452)               # torn last record: a tail, allowed
    rep = records.parse(bytes(data))
    assert rep.highest == 9 and rep.first_bad is None and rep.tail == "torn"
    with pytest.raises(AssertionError, match="header claims next=11"):
        records.check_consistent(rep)
    data[:512] = records.format_header(10, BOOT_A)            # the header written before record 10
    records.check_consistent(records.parse(bytes(data)))


def test_two_boots_and_interleaving():
    data = disk(10)
    for seq in range(11, 16):
        data[seq * 512 : (seq + 1) * 512] = records.format_record(seq, BOOT_B)
    data[:512] = records.format_header(16, BOOT_B)
    rep = records.parse(bytes(data))
    assert rep.boot_ids == [BOOT_A, BOOT_B] and rep.boot_runs == [(BOOT_A, 1, 10), (BOOT_B, 11, 15)]
    records.check_consistent(rep)
    data[3 * 512 : 4 * 512] = records.format_record(3, BOOT_B)  # B overwrote an old record of A
    with pytest.raises(AssertionError, match="two separate runs"):
        records.check_consistent(records.parse(bytes(data)))


def test_scan_image_qcow2(tmp_path):
    if not shutil.which("qemu-img"):
        pytest.skip("no qemu-img")
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(disk(7)))
    qcow = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
    rep = records.scan_image(qcow)
    assert rep.highest == 7 and rep.complete


# ---- the real guest ----

@pytest.fixture(scope="module")
def guest_image() -> Path:
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(HERE / "build_guest.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"build_guest.sh failed:\n{proc.stderr[-3000:]}")
    path = Path(proc.stdout.strip().splitlines()[-1])
    print(f"guest image {path} ({time.monotonic() - t0:.2f} s)")
    assert path.is_file() and (path.parent / ".complete").exists()
    return path


def test_build_is_cached(guest_image):
    t0 = time.monotonic()
    out = subprocess.run(["bash", str(HERE / "build_guest.sh")], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(guest_image)
    assert time.monotonic() - t0 < 2
    assert guest_image.stat().st_size <= 64 * 1024 * 1024


def domain_xml(name: str, folder: Path, virt: str) -> str:
    return f"""<domain type='{virt}'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{folder}/boot.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>
      <source file='{folder}/data.raw'/><target dev='vdb' bus='virtio'/></disk>
    <serial type='file'><source path='{folder}/serial.log'/><target port='0'/></serial>
    <console type='file'><source path='{folder}/serial.log'/><target type='serial' port='0'/></console>
    <channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>"""


def wait_booted(folder: Path, timeout: float = 120) -> float:
    t0 = time.monotonic()
    log = folder / "serial.log"
    while time.monotonic() - t0 < timeout:
        if log.exists() and MARKER in log.read_bytes():
            return time.monotonic() - t0
        time.sleep(0.05)
    tail = log.read_bytes()[-2000:].decode(errors="replace") if log.exists() else "(no serial log)"
    raise AssertionError(f"guest did not print {MARKER.decode()} within {timeout} s; serial log:\n{tail}")


def wait_records(data: Path, above: int, timeout: float = 30) -> records.Report:
    t0 = time.monotonic()
    while True:
        rep = records.scan(data)
        if rep.highest > above or time.monotonic() - t0 > timeout:
            return rep
        time.sleep(0.1)


@pytest.fixture
def guest_folder():
    base = "/var/lib/libvirt/images" if os.access("/var/lib/libvirt/images", os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="vmmig-guest-test-", dir=base))
    folder.chmod(0o755)   # QEMU runs as libvirt-qemu
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_guest_boots_writes_and_freezes(guest_image, guest_folder, libvirt_uri):
    libvirt = pytest.importorskip("libvirt")
    libvirt_qemu = pytest.importorskip("libvirt_qemu")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(guest_image), str(guest_folder / "boot.qcow2")],
                   check=True)
    data = guest_folder / "data.raw"
    with open(data, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    for p in guest_folder.iterdir():
        p.chmod(0o644)
    name = f"vmmig-guest-test-{uuid.uuid4().hex[:8]}"
    virt = virt_type()
    conn = libvirt.open(libvirt_uri)
    dom = None
    try:
        t0 = time.monotonic()
        dom = conn.createXML(domain_xml(name, guest_folder, virt), 0)
        boot = wait_booted(guest_folder)
        print(f"{name} ({virt}): marker after {boot:.2f} s ({time.monotonic() - t0:.2f} s incl. createXML)")

        first = wait_records(data, 0)
        records.check_consistent(first)
        time.sleep(1)
        second = records.scan(data)
        records.check_consistent(second)
        assert second.highest > first.highest, (records.summary(first), records.summary(second))
        print(f"write rate {second.highest - first.highest} records/s")
        assert len(second.boot_ids) == 1

        reply = libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 10, 0)
        assert reply.replace(" ", "") == '{"return":{}}'
        assert dom.fsFreeze() == 1
        status = libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-fsfreeze-status"}', 10, 0)
        assert "frozen" in status
        frozen = records.scan(data)
        time.sleep(1)
        still = records.scan(data)
        records.check_consistent(still)
        assert still.highest == frozen.highest, "records were written while frozen"
        assert still.header_next == still.highest + 1, "the writer paused between a record and its header"
        assert dom.fsThaw() == 1
        thawed = wait_records(data, still.highest, timeout=10)
        assert thawed.highest > still.highest, "no records after thaw"
        records.check_consistent(thawed)

        serial = (guest_folder / "serial.log").read_text(errors="replace").splitlines()
        print("\n".join(ln for ln in serial if "vmmig-agent" in ln))

        # a second boot on the same data disk (what a migrated copy does) continues the sequence
        dom.destroy()
        dom = None
        before = records.scan(data)
        records.check_consistent(before)
        (guest_folder / "serial.log").unlink(missing_ok=True)
        dom = conn.createXML(domain_xml(name, guest_folder, virt), 0)
        wait_booted(guest_folder)
        after = wait_records(data, before.highest)
        records.check_consistent(after)
        assert after.highest > before.highest and len(after.boot_ids) == 2, records.summary(after)
        assert after.boot_runs[0][1:] == (1, before.highest)   # nothing of the first boot was overwritten
        print(records.summary(after))
    finally:
        if dom is not None:
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass
        conn.close()
