"""The VMMigration status of the user guide: phase, progress, conditions, message and per-disk details.

``MigrationStatus`` is a plain dict-backed document (what ``kubectl get vmmigration -o yaml`` shows
under ``status``). The helpers here are the only place that decide how a phase change, a byte
count or a failure turns into that document, so that every sink (a file here, the Kubernetes
status subresource later) writes the same thing.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    """The eleven phases of the guide, in order."""

    PENDING = "Pending"
    VALIDATING = "Validating"
    SNAPSHOTTING = "Snapshotting"
    EXPORTING = "Exporting"
    TRANSFERRING = "Transferring"
    CONVERTING = "Converting"
    IMPORTING = "Importing"
    CREATING = "Creating"
    VALIDATING_TARGET = "ValidatingTarget"
    READY = "Ready"
    FAILED = "Failed"

    @property
    def index(self) -> int:
        return list(Phase).index(self)


#: Condition type recorded when a phase completes (the guide: Validated, Snapshotted, Exported, ...).
DONE_CONDITION = {
    Phase.VALIDATING: "Validated",
    Phase.SNAPSHOTTING: "Snapshotted",
    Phase.EXPORTING: "Exported",
    Phase.TRANSFERRING: "Transferred",
    Phase.CONVERTING: "Converted",
    Phase.IMPORTING: "Imported",
    Phase.CREATING: "Created",
    Phase.VALIDATING_TARGET: "TargetValidated",
}

#: Overall progress (percent) at the start of each phase; the byte-moving phases get the widest spans.
PHASE_START = {
    Phase.PENDING: 0,
    Phase.VALIDATING: 0,
    Phase.SNAPSHOTTING: 2,
    Phase.EXPORTING: 5,
    Phase.TRANSFERRING: 15,
    Phase.CONVERTING: 55,
    Phase.IMPORTING: 65,
    Phase.CREATING: 92,
    Phase.VALIDATING_TARGET: 96,
    Phase.READY: 100,
}

#: What the message says while a per-disk phase moves bytes.
PHASE_VERB = {
    Phase.EXPORTING: "Exporting disk",
    Phase.TRANSFERRING: "Uploading disk",
    Phase.CONVERTING: "Converting disk",
    Phase.IMPORTING: "Importing disk",
}


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_bytes(n: float) -> str:
    """IEC units, one decimal (``4.5GiB/10GiB``): one unit system across the plan, the logs and the status (the
    guide's own example writes decimal units; the engine never mixes them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if round(abs(n), 1) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)}B"
            text = f"{n:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
        n /= 1024.0
    raise AssertionError("unreachable")


def progress_message(phase: Phase, done: int, total: int, *, disk: str | None = None) -> str:
    """``Uploading disk (45% complete, 4.5GiB/10GiB)``; the disk name is added when known."""
    percent = int(done * 100 / total) if total else 100
    verb = PHASE_VERB.get(phase, phase.value)
    if disk:
        verb = f"{verb} {disk}"
    return f"{verb} ({percent}% complete, {human_bytes(done)}/{human_bytes(total)})"


def phase_progress(phase: Phase, fraction: float) -> int:
    """Overall progress for ``fraction`` (0..1) of the way through ``phase``."""
    if phase in (Phase.READY,):
        return 100
    if phase is Phase.FAILED:
        raise ValueError("a failed migration keeps the progress it had")
    start = PHASE_START[phase]
    following = [p for p in Phase if p.index > phase.index and p in PHASE_START]
    end = PHASE_START[following[0]] if following else 100
    fraction = min(max(fraction, 0.0), 1.0)
    return min(99, int(start + (end - start) * fraction))


def new_status() -> dict[str, Any]:
    return {"phase": Phase.PENDING.value, "progress": 0, "conditions": [], "disks": [],
            "message": "Migration created, awaiting processing"}


def set_condition(status: dict[str, Any], ctype: str, cstatus: str, *, reason: str | None = None,
                  message: str | None = None) -> None:
    """Add or update a condition; lastTransitionTime changes only when the status value changes."""
    conditions = status.setdefault("conditions", [])
    for cond in conditions:
        if cond["type"] == ctype:
            if cond["status"] != cstatus:
                cond["lastTransitionTime"] = now_iso()
            cond["status"] = cstatus
            _set_or_drop(cond, "reason", reason)
            _set_or_drop(cond, "message", message)
            return
    cond = {"type": ctype, "status": cstatus, "lastTransitionTime": now_iso()}
    _set_or_drop(cond, "reason", reason)
    _set_or_drop(cond, "message", message)
    conditions.append(cond)


def remove_condition(status: dict[str, Any], ctype: str) -> None:
    status["conditions"] = [c for c in status.get("conditions", []) if c["type"] != ctype]


def _set_or_drop(cond: dict[str, Any], key: str, value: str | None) -> None:
    if value is None:
        cond.pop(key, None)
    else:
        cond[key] = value


def disk_entry(status: dict[str, Any], name: str) -> dict[str, Any]:
    for disk in status.setdefault("disks", []):
        if disk["name"] == name:
            return disk
    disk = {"name": name}
    status["disks"].append(disk)
    return disk


#: ``disks[].checksum``: the disk's sha256 is computed on its way out (Transferring) and checked when it is read
#: back (Converting, Importing)
CHECKSUM_PENDING, CHECKSUM_VERIFIED, CHECKSUM_FAILED = "pending", "verified", "failed"


def set_checksum(status: dict[str, Any], disk: str, state: str) -> None:
    disk_entry(status, disk)["checksum"] = state


def enter_phase(status: dict[str, Any], phase: Phase, *, message: str | None = None,
                disk: str | None = None) -> None:
    """Mark ``phase`` as in progress (for one disk, or the whole migration)."""
    if status.get("phase") in (Phase.READY.value, Phase.FAILED.value) and phase is not Phase.VALIDATING:
        # a finished migration only starts over from Validating (a new run)
        return
    if phase is Phase.VALIDATING:
        _restart(status)
    status.setdefault("startTime", now_iso())
    if disk is not None:
        entry = disk_entry(status, disk)
        entry["phase"] = phase.value
        entry.setdefault("startTime", now_iso())
        if phase is Phase.TRANSFERRING and entry.get("checksum") != CHECKSUM_VERIFIED:
            entry["checksum"] = CHECKSUM_PENDING
    _advance(status, phase, message or f"{phase.value}")
    set_condition(status, phase.value, "True", reason="InProgress", message=message)


def complete_phase(status: dict[str, Any], phase: Phase, *, message: str | None = None,
                   disk: str | None = None, all_disks_done: bool = True) -> None:
    """Record the end of ``phase``; for per-disk phases pass ``all_disks_done`` for the last disk."""
    if status.get("phase") in (Phase.READY.value, Phase.FAILED.value):
        return
    if disk is not None:
        entry = disk_entry(status, disk)
        entry["phase"] = DONE_CONDITION.get(phase, phase.value)
        done = entry.setdefault("completed", [])
        if phase.value not in done:
            done.append(phase.value)
        if phase is Phase.IMPORTING:
            entry["completionTime"] = now_iso()
    if not all_disks_done:
        return
    remove_condition(status, phase.value)
    set_condition(status, DONE_CONDITION[phase], "True", reason="Succeeded", message=message)
    status["progress"] = max(status.get("progress", 0), phase_progress(phase, 1.0))


def report_bytes(status: dict[str, Any], phase: Phase, disk: str, done: int, total: int,
                 *, rate: float | None = None, eta: float | None = None, virtual: int | None = None) -> None:
    """Record per-disk byte progress (``done`` of ``total`` bytes of data: what really moves, holes are not
    counted) and recompute the overall progress and message; ``virtual`` is the disk's virtual size."""
    if status.get("phase") in (Phase.READY.value, Phase.FAILED.value):
        return  # a late report from a disk still copying must not revive a finished migration
    entry = disk_entry(status, disk)
    entry["phase"] = phase.value
    entry["bytesDone"] = int(done)
    entry["bytesTotal"] = int(total)
    if virtual is not None:
        entry["virtualBytes"] = int(virtual)
    if rate is not None:
        entry["rateBytesPerSecond"] = int(rate)
    if eta is not None:
        entry["etaSeconds"] = int(eta)
    in_phase = [d for d in status["disks"] if d.get("phase") == phase.value and d.get("bytesTotal")]
    done_all = sum(d.get("bytesDone", 0) for d in in_phase)
    total_all = sum(d.get("bytesTotal", 0) for d in in_phase)
    # disks that already finished this phase count as complete
    finished = [d for d in status["disks"]
                if phase.value in d.get("completed", []) and d.get("phase") != phase.value and d.get("bytesTotal")]
    done_all += sum(d["bytesTotal"] for d in finished)
    total_all += sum(d["bytesTotal"] for d in finished)
    message = progress_message(phase, done_all, total_all) if len(status["disks"]) > 1 else \
        progress_message(phase, done, total, disk=disk)
    _advance(status, phase, message, fraction=(done_all / total_all) if total_all else 1.0)
    set_condition(status, phase.value, "True", reason="InProgress", message=message)


def fail(status: dict[str, Any], phase: Phase, reason: str, message: str) -> None:
    """Move to Failed, recording which phase failed and why (the guide's troubleshooting reasons)."""
    remove_condition(status, phase.value)
    if phase in DONE_CONDITION:
        set_condition(status, DONE_CONDITION[phase], "False", reason=reason, message=message)
    set_condition(status, Phase.FAILED.value, "True", reason=reason, message=message)
    status["phase"] = Phase.FAILED.value
    _note_phase(status)
    status["failedPhase"] = phase.value
    status["message"] = message
    status["completionTime"] = now_iso()


def _note_phase(status: dict[str, Any]) -> None:
    """Append the current phase to ``phaseHistory`` when it changed (what ``describe`` shows as events)."""
    history = status.setdefault("phaseHistory", [])
    if not history or history[-1]["phase"] != status["phase"]:
        history.append({"phase": status["phase"], "time": now_iso()})


def mark_ready(status: dict[str, Any], message: str) -> None:
    set_condition(status, Phase.READY.value, "True", reason="Succeeded", message=message)
    status["phase"] = Phase.READY.value
    _note_phase(status)
    status["progress"] = 100
    status["message"] = message
    status["completionTime"] = now_iso()


def _restart(status: dict[str, Any]) -> None:
    """A new run of the same migration starts a fresh status, keeping the history count."""
    runs = status.get("attempts", 0)
    status.clear()
    status.update(new_status())
    status["attempts"] = runs + 1
    status["startTime"] = now_iso()


def _advance(status: dict[str, Any], phase: Phase, message: str, *, fraction: float = 0.0) -> None:
    """Move the migration's phase forward (never back: with disks in parallel it shows the furthest
    phase reached, each disk's own phase is in ``disks[].phase``) and recompute progress."""
    current = status.get("phase", Phase.PENDING.value)
    current_phase = Phase(current) if current in Phase._value2member_map_ else Phase.PENDING
    if phase.index >= current_phase.index or current_phase in (Phase.READY, Phase.FAILED):
        status["phase"] = phase.value
    _note_phase(status)
    status["message"] = message
    if status["phase"] == phase.value:
        status["progress"] = max(status.get("progress", 0), phase_progress(phase, fraction))


def _seconds(start: Any, end: Any) -> float | None:
    try:
        a = dt.datetime.strptime(str(start), "%Y-%m-%dT%H:%M:%SZ")
        b = dt.datetime.strptime(str(end), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return max((b - a).total_seconds(), 0.0)


def run_summary(status: dict[str, Any], disks: list[dict[str, Any]]) -> dict[str, Any]:
    """The end of a run in numbers, for ``status.summary``, the log, and the asset event's extra: per disk its
    virtual size, allocated bytes, bytes moved, checksum state, time and rate; and the totals. ``disks`` gives
    per disk ``name``, ``virtualBytes``, ``allocatedBytes``, ``bytesMoved`` (from the plan and the run state)."""
    entries = {d.get("name"): d for d in status.get("disks", [])}
    out: list[dict[str, Any]] = []
    for disk in disks:
        entry = entries.get(disk["name"], {})
        seconds = _seconds(entry.get("startTime"), entry.get("completionTime") or status.get("completionTime"))
        moved = int(disk.get("bytesMoved") or 0)
        out.append({"name": disk["name"], "virtualBytes": int(disk.get("virtualBytes") or 0),
                    "allocatedBytes": int(disk.get("allocatedBytes") or 0), "bytesMoved": moved,
                    "checksum": entry.get("checksum") or CHECKSUM_PENDING,
                    "seconds": seconds, "rateBytesPerSecond": int(moved / seconds) if seconds and moved else None})
    seconds = _seconds(status.get("startTime"), status.get("completionTime"))
    moved = sum(d["bytesMoved"] for d in out)
    return {"phase": status.get("phase"), "seconds": seconds, "bytesMoved": moved,
            "virtualBytes": sum(d["virtualBytes"] for d in out),
            "rateBytesPerSecond": int(moved / seconds) if seconds else None, "disks": out}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as the lines of a table (the task log)."""
    def secs(v: Any) -> str:
        return f"{v:.0f}s" if isinstance(v, (int, float)) else "-"

    def rate(v: Any) -> str:
        return f"{human_bytes(v)}/s" if v else "-"

    lines = [f"{'disk':<12} {'virtual':>10} {'allocated':>10} {'moved':>10} {'checksum':>9} {'time':>7} {'rate':>12}"]
    for d in summary.get("disks", []):
        lines.append(f"{d['name']:<12} {human_bytes(d['virtualBytes']):>10} {human_bytes(d['allocatedBytes']):>10} "
                     f"{human_bytes(d['bytesMoved']):>10} {d['checksum']:>9} {secs(d['seconds']):>7} "
                     f"{rate(d['rateBytesPerSecond']):>12}")
    lines.append(f"{'total':<12} {human_bytes(summary.get('virtualBytes') or 0):>10} {'':>10} "
                 f"{human_bytes(summary.get('bytesMoved') or 0):>10} {'':>9} {secs(summary.get('seconds')):>7} "
                 f"{rate(summary.get('rateBytesPerSecond')):>12}")
    return lines
