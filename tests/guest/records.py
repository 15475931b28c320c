"""Checker of the records the test guest (tests/guest/init) writes to its data disk (/dev/vdb).

On-disk format (512-byte sectors, all text ASCII, ``\\n`` line ends, the rest of each sector NUL bytes):

* sector 0, the header::

      VMMHDR1 next=<next sequence, 10 digits> boot=<boot id>\\n
      sha256=<64 lowercase hex digits: sha256 of line 1 including its \\n>\\n
      <NUL padding up to 512 bytes>

* sector N (N >= 1), the record with sequence number N::

      VMMREC1 seq=<N, 10 digits> boot=<boot id> up=<guest uptime in s, e.g. 12.34>\\n
      sha256=<64 lowercase hex digits: sha256 of line 1 including its \\n>\\n
      <NUL padding up to 512 bytes>

The boot id is the guest's /proc/sys/kernel/random/uuid at boot (36 characters). Sequence numbers start at 1
on a fresh (zeroed) disk and record N is always at sector N. The guest writes record N (fsync), then the
header with next=N+1 (fsync), so records reach the disk in order and the header never runs ahead of them. A
guest that boots on a disk that already holds records continues after them (from the header, rolled forward
over records newer than the header), so a migrated copy appends with a new boot id.

A record is *valid* when line 1 matches the grammar above with seq equal to its sector, the checksum
matches and every byte after line 2 is NUL. The disk is *consistent* when sectors 1..highest hold valid
records (no hole, no corrupt or misplaced record before the last valid one), each boot id forms one
contiguous run of sequence numbers, and a valid header does not claim more records than there are.
Anything after the last valid record (zeros, a torn or truncated sector) is the tail and is allowed.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

SECTOR = 512
RECORD_MAGIC = b"VMMREC1"
HEADER_MAGIC = b"VMMHDR1"
_RECORD_RE = re.compile(rb"VMMREC1 seq=(\d{10}) boot=([0-9a-f-]{36}) up=(\d+(?:\.\d+)?)\n\Z")
_HEADER_RE = re.compile(rb"VMMHDR1 next=(\d{10}) boot=([0-9a-f-]{36})\n\Z")
_SUM_RE = re.compile(rb"sha256=([0-9a-f]{64})\n\Z")


@dataclass(frozen=True)
class Record:
    seq: int
    boot_id: str
    uptime: float


@dataclass
class Report:
    sectors: int = 0                      # whole sectors in the image (a partial last sector is not counted)
    header_next: int | None = None        # next= of a valid header, None if the header is missing/invalid
    header_boot_id: str | None = None
    valid: int = 0                        # number of valid records anywhere on the disk
    highest: int = 0                      # highest sequence of a valid record (0: none)
    contiguous: int = 0                   # records 1..contiguous are all valid
    boot_ids: list[str] = field(default_factory=list)   # in order of first appearance
    boot_runs: list[tuple[str, int, int]] = field(default_factory=list)  # (boot id, first seq, last seq)
    first_bad: int | None = None          # first sector in 1..highest that is not a valid record
    bad: dict[int, str] = field(default_factory=dict)   # sector -> reason, for sectors 1..highest (first 20)
    tail: str = "empty"                   # what follows the last valid record: empty|zeros|torn|truncated|end
    truncated: bool = False               # the image ends inside a sector

    @property
    def complete(self) -> bool:
        """Every record 1..highest is present and intact."""
        return self.first_bad is None and self.contiguous == self.highest


def _parse_sector(sector: bytes, magic: bytes, line_re: re.Pattern[bytes]) -> tuple[re.Match[bytes] | None, str]:
    if not sector.startswith(magic):
        return None, "zeros" if not sector.strip(b"\0") else "no magic"
    nl1 = sector.find(b"\n")
    nl2 = sector.find(b"\n", nl1 + 1) if nl1 >= 0 else -1
    if nl2 < 0:
        return None, "torn (no checksum line)"
    line1, line2, rest = sector[: nl1 + 1], sector[nl1 + 1 : nl2 + 1], sector[nl2 + 1 :]
    m = line_re.match(line1)
    if not m:
        return None, "malformed first line"
    s = _SUM_RE.match(line2)
    if not s:
        return None, "malformed checksum line"
    if hashlib.sha256(line1).hexdigest().encode() != s.group(1):
        return None, "checksum mismatch"
    if rest.strip(b"\0"):
        return None, "garbage after the checksum"
    return m, ""


def parse_record(sector: bytes, index: int | None = None) -> tuple[Record | None, str]:
    """Parse one 512-byte sector as a record; returns (record, "") or (None, reason)."""
    if len(sector) != SECTOR:
        return None, f"truncated ({len(sector)} bytes)"
    m, why = _parse_sector(sector, RECORD_MAGIC, _RECORD_RE)
    if m is None:
        return None, why
    rec = Record(int(m.group(1)), m.group(2).decode(), float(m.group(3)))
    if index is not None and rec.seq != index:
        return None, f"sequence {rec.seq} at sector {index}"
    return rec, ""


def format_record(seq: int, boot_id: str, uptime: str = "0.00") -> bytes:
    """The sector the guest writes for record `seq` (used by the tests to make synthetic disks)."""
    line = f"VMMREC1 seq={seq:010d} boot={boot_id} up={uptime}\n".encode()
    return (line + b"sha256=" + hashlib.sha256(line).hexdigest().encode() + b"\n").ljust(SECTOR, b"\0")


def format_header(next_seq: int, boot_id: str) -> bytes:
    line = f"VMMHDR1 next={next_seq:010d} boot={boot_id}\n".encode()
    return (line + b"sha256=" + hashlib.sha256(line).hexdigest().encode() + b"\n").ljust(SECTOR, b"\0")


def parse(data: bytes) -> Report:
    """Parse a raw image of the data disk (header + records)."""
    rep = Report(sectors=len(data) // SECTOR, truncated=len(data) % SECTOR != 0)
    if rep.sectors >= 1:
        m, _ = _parse_sector(data[:SECTOR], HEADER_MAGIC, _HEADER_RE)
        if m:
            rep.header_next, rep.header_boot_id = int(m.group(1)), m.group(2).decode()
    records: dict[int, Record] = {}
    reasons: dict[int, str] = {}
    for i in range(1, rep.sectors):
        sector = data[i * SECTOR : (i + 1) * SECTOR]
        if not sector.strip(b"\0"):
            reasons[i] = "zeros"
            continue
        rec, why = parse_record(sector, i)
        if rec is None:
            reasons[i] = why
        else:
            records[i] = rec
    rep.valid = len(records)
    rep.highest = max(records, default=0)
    while rep.contiguous + 1 in records:
        rep.contiguous += 1
    bad = [i for i in range(1, rep.highest) if i not in records]
    rep.first_bad = bad[0] if bad else None
    rep.bad = {i: reasons.get(i, "?") for i in bad[:20]}
    for seq in sorted(records):
        boot = records[seq].boot_id
        if boot not in rep.boot_ids:
            rep.boot_ids.append(boot)
        if rep.boot_runs and rep.boot_runs[-1][0] == boot and rep.boot_runs[-1][2] == seq - 1:
            rep.boot_runs[-1] = (boot, rep.boot_runs[-1][1], seq)
        else:
            rep.boot_runs.append((boot, seq, seq))
    after = rep.highest + 1
    if rep.highest == 0 and not data[SECTOR:].strip(b"\0"):
        rep.tail = "empty"
    elif after >= rep.sectors:
        rep.tail = "truncated" if rep.truncated else "end"
    elif reasons.get(after) == "zeros" and not data[after * SECTOR :].strip(b"\0"):
        rep.tail = "zeros"
    else:
        rep.tail = "torn"
    return rep


def scan(source: str | os.PathLike[str] | BinaryIO) -> Report:
    """Parse a raw image from a path or a binary file object (reading a running VM's raw disk is fine)."""
    if hasattr(source, "read"):
        return parse(source.read())  # type: ignore[union-attr]
    with open(source, "rb") as f:
        return parse(f.read())


def scan_image(path: str | os.PathLike[str], fmt: str | None = None) -> Report:
    """Parse any image qemu-img can read (qcow2, raw, ...): converts it to a temporary raw file first.

    `-U` (no locking) lets it read the disk of a running VM; the snapshot is then only crash-consistent
    per cluster, which is what a migration of a running VM gets too.
    """
    if fmt == "raw":
        return scan(path)
    with tempfile.TemporaryDirectory(prefix="vmmig-records-") as tmp:
        raw = Path(tmp) / "disk.raw"
        cmd = ["qemu-img", "convert", "-U", "-O", "raw"]
        if fmt:
            cmd += ["-f", fmt]
        subprocess.run([*cmd, os.fspath(path), os.fspath(raw)], check=True, capture_output=True)
        return scan(raw)


def check_consistent(report: Report, min_records: int = 1) -> None:
    """Raise AssertionError with a readable message unless the disk is consistent (see the module doc)."""
    problems = []
    if report.highest < min_records:
        problems.append(f"only {report.highest} record(s), expected at least {min_records}")
    if report.first_bad is not None:
        shown = ", ".join(f"sector {s}: {why}" for s, why in report.bad.items())
        problems.append(f"records 1..{report.highest} are not all intact: first bad sector {report.first_bad} "
                        f"({len(report.bad)}{'+' if len(report.bad) == 20 else ''} bad: {shown})")
    seen: dict[str, int] = {}
    for boot, first, last in report.boot_runs:
        if boot in seen:
            problems.append(f"boot id {boot} appears in two separate runs (second from seq {first} to {last})")
        seen[boot] = first
    if report.header_next is not None and report.header_next - 1 > report.highest:
        problems.append(f"header claims next={report.header_next} but the highest valid record is {report.highest}")
    if problems:
        raise AssertionError("guest data disk is inconsistent: " + "; ".join(problems) + f" [{summary(report)}]")


def summary(report: Report) -> str:
    runs = ", ".join(f"{b[:8]}:{f}-{t}" for b, f, t in report.boot_runs)
    return (f"valid={report.valid} highest={report.highest} contiguous={report.contiguous} "
            f"header_next={report.header_next} first_bad={report.first_bad} tail={report.tail} boots=[{runs}]")
