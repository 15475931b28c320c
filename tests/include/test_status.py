"""include/status.py: the guide's status document (phase, progress, conditions, message, disks)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as hst

from include import status as st
from include.status import Phase

GB = 1000**3
GIB = 1024**3


@pytest.fixture
def clock(monkeypatch):
    """Every now_iso() call returns the next second, so time changes are observable."""
    ticks = itertools.count(1)

    def fake_now() -> str:
        n = next(ticks)
        return f"2025-10-16T10:{n // 60:02d}:{n % 60:02d}Z"

    monkeypatch.setattr(st, "now_iso", fake_now)
    return fake_now


def cond(status: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    found = [c for c in status["conditions"] if c["type"] == ctype]
    assert len(found) <= 1, f"condition {ctype} appears {len(found)} times"
    return found[0] if found else None


def started() -> dict[str, Any]:
    status = st.new_status()
    st.enter_phase(status, Phase.VALIDATING)
    return status


# -- phases ---------------------------------------------------------------------------------------------

def test_the_eleven_phases_in_the_guides_order():
    assert [p.value for p in Phase] == ["Pending", "Validating", "Snapshotting", "Exporting", "Transferring",
                                        "Converting", "Importing", "Creating", "ValidatingTarget", "Ready", "Failed"]
    assert [p.index for p in Phase] == list(range(11))
    assert Phase("Transferring") is Phase.TRANSFERRING
    assert Phase.TRANSFERRING == "Transferring"  # str enum: serialises as its value


def test_every_working_phase_has_a_done_condition():
    working = [p for p in Phase if p not in (Phase.PENDING, Phase.READY, Phase.FAILED)]
    assert list(st.DONE_CONDITION) == working
    assert st.DONE_CONDITION[Phase.VALIDATING] == "Validated"
    assert st.DONE_CONDITION[Phase.SNAPSHOTTING] == "Snapshotted"
    assert st.DONE_CONDITION[Phase.EXPORTING] == "Exported"


def test_phase_start_is_increasing():
    starts = [st.PHASE_START[p] for p in Phase if p in st.PHASE_START]
    assert starts == sorted(starts)
    assert starts[0] == 0 and starts[-1] == 100


def test_new_status_is_pending():
    status = st.new_status()
    assert status == {"phase": "Pending", "progress": 0, "conditions": [], "disks": [],
                      "message": "Migration created, awaiting processing"}
    assert st.new_status() is not status  # a fresh document each time


# -- human_bytes and the progress message ----------------------------------------------------------------

@pytest.mark.parametrize(("n", "text"), [
    (0, "0B"), (1023, "1023B"), (1024, "1KiB"), (1536, "1.5KiB"), (4.5 * GIB, "4.5GiB"), (10 * GIB, "10GiB"),
    (1_050_000, "1MiB"),  # one decimal, trailing ".0" dropped
    (1_110_000, "1.1MiB"),
    (123.45 * GIB, "123.5GiB"),
    (1024**4, "1TiB"), (2 * 1024**5, "2048TiB"),  # TiB is the largest unit
    (512.9, "512B"),  # bytes are truncated to an integer
])
def test_human_bytes_uses_iec_units_and_one_decimal(n, text):
    assert st.human_bytes(n) == text


@given(hst.integers(0, 10**16))
def test_human_bytes_is_close_to_the_value(n):
    text = st.human_bytes(n)
    units = {"TiB": 1024**4, "GiB": 1024**3, "MiB": 1024**2, "KiB": 1024, "B": 1}
    unit = next(u for u in units if text.endswith(u) and (u != "B" or not text[-2].isalpha()))
    value = float(text[: -len(unit)])
    # rounded to one decimal of its unit
    assert abs(value * units[unit] - n) <= 0.05 * units[unit] + 1e-6 * n
    assert not text[: -len(unit)].endswith(".0")


def test_human_bytes_never_shows_1024_of_a_unit():
    assert st.human_bytes(1024 * 1024 - 10) == "1MiB"


def test_progress_message_matches_the_guide():
    # the guide's example, in the engine's one unit system (IEC)
    assert st.progress_message(Phase.TRANSFERRING, int(4.5 * GIB), 10 * GIB) == \
        "Uploading disk (45% complete, 4.5GiB/10GiB)"


@pytest.mark.parametrize(("phase", "verb"), [
    (Phase.EXPORTING, "Exporting disk"), (Phase.TRANSFERRING, "Uploading disk"),
    (Phase.CONVERTING, "Converting disk"), (Phase.IMPORTING, "Importing disk"), (Phase.CREATING, "Creating"),
])
def test_progress_message_verbs(phase, verb):
    assert st.progress_message(phase, 1 * GIB, 4 * GIB) == f"{verb} (25% complete, 1GiB/4GiB)"


def test_progress_message_details():
    assert st.progress_message(Phase.TRANSFERRING, 5 * GIB, 10 * GIB, disk="vda") == \
        "Uploading disk vda (50% complete, 5GiB/10GiB)"
    # percent is truncated, never rounded up to a completion that has not happened
    assert st.progress_message(Phase.TRANSFERRING, 999, 1000).startswith("Uploading disk (99% complete")
    # an empty disk is complete
    assert st.progress_message(Phase.EXPORTING, 0, 0) == "Exporting disk (100% complete, 0B/0B)"


# -- phase_progress ---------------------------------------------------------------------------------------

def test_phase_progress_spans():
    assert st.phase_progress(Phase.TRANSFERRING, 0.0) == 15
    assert st.phase_progress(Phase.TRANSFERRING, 0.5) == 35
    assert st.phase_progress(Phase.TRANSFERRING, 1.0) == 55
    assert st.phase_progress(Phase.TRANSFERRING, 7.0) == 55  # clamped
    assert st.phase_progress(Phase.TRANSFERRING, -1.0) == 15
    assert st.phase_progress(Phase.VALIDATING_TARGET, 1.0) == 99  # only Ready is 100
    assert st.phase_progress(Phase.READY, 0.0) == 100
    with pytest.raises(ValueError, match="keeps the progress"):
        st.phase_progress(Phase.FAILED, 0.5)


@given(hst.sampled_from([p for p in Phase if p not in (Phase.READY, Phase.FAILED)]),
       hst.floats(0, 1), hst.floats(0, 1))
def test_phase_progress_is_monotone_and_below_100(phase, a, b):
    lo, hi = sorted((a, b))
    assert 0 <= st.phase_progress(phase, lo) <= st.phase_progress(phase, hi) <= 99
    following = [p for p in Phase if p.index > phase.index and p in st.PHASE_START]
    assert st.phase_progress(phase, hi) <= st.phase_progress(following[0], 0.0) or following[0] is Phase.READY


# -- conditions ----------------------------------------------------------------------------------------------

def test_set_condition_keeps_last_transition_time_when_status_is_unchanged(clock):
    status = st.new_status()
    st.set_condition(status, "Validated", "True", reason="Succeeded", message="first")
    first = copy.deepcopy(cond(status, "Validated"))
    st.set_condition(status, "Validated", "True", reason="Succeeded", message="second")
    again = cond(status, "Validated")
    assert again["lastTransitionTime"] == first["lastTransitionTime"]
    assert again["message"] == "second"
    st.set_condition(status, "Validated", "False", reason="Broken")
    flipped = cond(status, "Validated")
    assert flipped["lastTransitionTime"] != first["lastTransitionTime"]
    assert flipped["status"] == "False"
    assert "message" not in flipped  # None drops the old message
    assert len(status["conditions"]) == 1


def test_remove_condition():
    status = st.new_status()
    st.set_condition(status, "A", "True")
    st.set_condition(status, "B", "True")
    st.remove_condition(status, "A")
    assert [c["type"] for c in status["conditions"]] == ["B"]


# -- enter / complete --------------------------------------------------------------------------------------------

def test_enter_phase_records_an_in_progress_condition_named_after_the_phase(clock):
    status = st.new_status()
    st.enter_phase(status, Phase.VALIDATING, message="Checking the source VM")
    assert status["phase"] == "Validating"
    assert status["message"] == "Checking the source VM"
    assert cond(status, "Validating") == {"type": "Validating", "status": "True", "reason": "InProgress",
                                          "message": "Checking the source VM",
                                          "lastTransitionTime": cond(status, "Validating")["lastTransitionTime"]}
    assert "startTime" in status
    assert status["attempts"] == 1
    assert [h["phase"] for h in status["phaseHistory"]] == ["Validating"]


def test_enter_phase_without_message_uses_the_phase_name():
    status = started()
    st.enter_phase(status, Phase.SNAPSHOTTING)
    assert status["message"] == "Snapshotting"
    assert "message" not in cond(status, "Snapshotting")


def test_complete_phase_turns_the_in_progress_condition_into_a_done_condition():
    status = started()
    st.complete_phase(status, Phase.VALIDATING, message="source and target are usable")
    assert cond(status, "Validating") is None
    done = cond(status, "Validated")
    assert (done["status"], done["reason"], done["message"]) == ("True", "Succeeded", "source and target are usable")
    assert status["progress"] == st.PHASE_START[Phase.SNAPSHOTTING]


def test_the_guides_status_example(clock):
    """Validated, Snapshotted, Exported, then Transferring with the guide's message (two 5 GiB disks)."""
    status = started()
    st.complete_phase(status, Phase.VALIDATING)
    st.enter_phase(status, Phase.SNAPSHOTTING)
    st.complete_phase(status, Phase.SNAPSHOTTING)
    for disk in ("vda", "vdb"):
        st.enter_phase(status, Phase.EXPORTING, disk=disk)
    st.complete_phase(status, Phase.EXPORTING, disk="vda", all_disks_done=False)
    assert cond(status, "Exported") is None  # vdb is still exporting
    assert cond(status, "Exporting")["status"] == "True"
    st.complete_phase(status, Phase.EXPORTING, disk="vdb", all_disks_done=True)
    st.report_bytes(status, Phase.TRANSFERRING, "vda", int(2.5 * GIB), 5 * GIB)
    st.report_bytes(status, Phase.TRANSFERRING, "vdb", 2 * GIB, 5 * GIB)
    assert status["phase"] == "Transferring"
    assert [c["type"] for c in status["conditions"]] == ["Validated", "Snapshotted", "Exported", "Transferring"]
    assert all(c["status"] == "True" and c["lastTransitionTime"] for c in status["conditions"])
    assert cond(status, "Transferring")["message"] == "Uploading disk (45% complete, 4.5GiB/10GiB)"
    assert status["message"] == "Uploading disk (45% complete, 4.5GiB/10GiB)"
    # the first report only knew vda (50%); progress never goes back, so it stays within the phase's span
    assert st.phase_progress(Phase.TRANSFERRING, 0.45) <= status["progress"] <= st.phase_progress(
        Phase.TRANSFERRING, 0.5)
    assert status["startTime"] < cond(status, "Transferring")["lastTransitionTime"]


def test_report_bytes_records_the_disk():
    status = started()
    st.report_bytes(status, Phase.TRANSFERRING, "vda", 5 * GIB, 10 * GIB, rate=123.9, eta=40.7)
    assert status["disks"] == [{"name": "vda", "phase": "Transferring", "bytesDone": 5 * GIB, "bytesTotal": 10 * GIB,
                                "rateBytesPerSecond": 123, "etaSeconds": 40}]
    # one disk: its name is in the message
    assert status["message"] == "Uploading disk vda (50% complete, 5GiB/10GiB)"
    assert status["progress"] == 35


def test_report_bytes_counts_disks_that_finished_the_phase():
    status = started()
    st.report_bytes(status, Phase.TRANSFERRING, "vda", 4 * GIB, 4 * GIB)
    st.complete_phase(status, Phase.TRANSFERRING, disk="vda", all_disks_done=False)
    st.report_bytes(status, Phase.TRANSFERRING, "vdb", 1 * GIB, 6 * GIB)
    assert status["message"] == "Uploading disk (50% complete, 5GiB/10GiB)"
    assert [d["phase"] for d in status["disks"]] == ["Transferred", "Transferring"]


def test_migration_phase_is_the_furthest_reached_and_each_disk_keeps_its_own():
    status = started()
    st.enter_phase(status, Phase.EXPORTING, disk="vda")
    st.enter_phase(status, Phase.EXPORTING, disk="vdb")
    st.complete_phase(status, Phase.EXPORTING, disk="vda", all_disks_done=False)
    st.report_bytes(status, Phase.TRANSFERRING, "vda", 1, 10)
    assert status["phase"] == "Transferring"
    progress = status["progress"]
    # vdb, still exporting, does not move the migration back nor its progress
    st.report_bytes(status, Phase.EXPORTING, "vdb", 9, 10)
    assert status["phase"] == "Transferring"
    assert status["progress"] == progress
    assert {d["name"]: d["phase"] for d in status["disks"]} == {"vda": "Transferring", "vdb": "Exporting"}
    assert [h["phase"] for h in status["phaseHistory"]] == ["Validating", "Exporting", "Transferring"]


def test_progress_is_monotonic_even_when_bytes_restart():
    status = started()
    st.report_bytes(status, Phase.TRANSFERRING, "vda", 8, 10)
    high = status["progress"]
    st.report_bytes(status, Phase.TRANSFERRING, "vda", 1, 10)  # a retried upload restarts from 0
    assert status["progress"] == high
    assert status["disks"][0]["bytesDone"] == 1


def test_phase_history_is_appended_only_on_change(clock):
    status = started()
    for done in range(0, 11):
        st.report_bytes(status, Phase.TRANSFERRING, "vda", done, 10)
    st.complete_phase(status, Phase.TRANSFERRING, disk="vda")
    st.enter_phase(status, Phase.IMPORTING, disk="vda")
    st.enter_phase(status, Phase.IMPORTING, disk="vda")
    assert [h["phase"] for h in status["phaseHistory"]] == ["Validating", "Transferring", "Importing"]
    times = [h["time"] for h in status["phaseHistory"]]
    assert times == sorted(times) and len(set(times)) == 3


def test_enter_validating_starts_a_fresh_run_and_counts_attempts():
    status = started()
    st.report_bytes(status, Phase.TRANSFERRING, "vda", 5, 10)
    st.fail(status, Phase.TRANSFERRING, "StorageError", "disk full")
    st.enter_phase(status, Phase.VALIDATING)
    assert status["phase"] == "Validating"
    assert status["attempts"] == 2
    assert status["progress"] == 0
    assert status["disks"] == []
    assert "failedPhase" not in status
    assert [c["type"] for c in status["conditions"]] == ["Validating"]


@pytest.mark.parametrize("finish", ["ready", "failed"])
def test_a_finished_migration_ignores_late_phase_entries(finish):
    status = started()
    if finish == "ready":
        st.mark_ready(status, "done")
    else:
        st.fail(status, Phase.VALIDATING, "NotFound", "no such VM")
    before = copy.deepcopy(status)
    st.enter_phase(status, Phase.EXPORTING, disk="vda")
    assert status == before


# -- fail / ready ---------------------------------------------------------------------------------------------

def test_fail_keeps_progress_and_records_why(clock):
    status = started()
    st.complete_phase(status, Phase.VALIDATING)
    st.report_bytes(status, Phase.TRANSFERRING, "vda", 3, 10)
    progress = status["progress"]
    st.fail(status, Phase.TRANSFERRING, "StorageAuthenticationFailed", "Storage authentication failed")
    assert status["phase"] == "Failed"
    assert status["progress"] == progress
    assert status["failedPhase"] == "Transferring"
    assert status["message"] == "Storage authentication failed"
    assert "completionTime" in status
    assert cond(status, "Transferring") is None  # no longer in progress
    failed = cond(status, "Failed")
    assert (failed["status"], failed["reason"], failed["message"]) == (
        "True", "StorageAuthenticationFailed", "Storage authentication failed")
    transferred = cond(status, "Transferred")
    assert (transferred["status"], transferred["reason"]) == ("False", "StorageAuthenticationFailed")
    assert cond(status, "Validated")["status"] == "True"  # what succeeded stays recorded
    assert status["phaseHistory"][-1]["phase"] == "Failed"


def test_fail_in_a_phase_without_done_condition():
    status = st.new_status()
    st.fail(status, Phase.PENDING, "MigrationFailed", "could not start")
    assert [c["type"] for c in status["conditions"]] == ["Failed"]
    assert status["failedPhase"] == "Pending"
    assert status["progress"] == 0


def test_mark_ready():
    status = started()
    st.report_bytes(status, Phase.IMPORTING, "vda", 10, 10)
    st.mark_ready(status, "VM migrated-vm is ready on default/vsphere-prod")
    assert status["phase"] == "Ready"
    assert status["progress"] == 100
    assert status["message"] == "VM migrated-vm is ready on default/vsphere-prod"
    ready = cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Succeeded")
    assert "completionTime" in status
    assert [h["phase"] for h in status["phaseHistory"]] == ["Validating", "Importing", "Ready"]


def test_a_failed_migration_stays_failed_when_another_disk_reports_bytes():
    status = started()
    st.report_bytes(status, Phase.TRANSFERRING, "vda", 1, 10)
    st.report_bytes(status, Phase.TRANSFERRING, "vdb", 1, 10)
    st.fail(status, Phase.TRANSFERRING, "StorageError", "vda upload failed")
    st.report_bytes(status, Phase.TRANSFERRING, "vdb", 5, 10)
    assert status["phase"] == "Failed"
    assert cond(status, "Transferring") is None


# -- property: whatever the order of events, progress never goes back and stays in 0..100 -----------------

_events = hst.lists(hst.one_of(
    hst.tuples(hst.just("enter"), hst.sampled_from(list(st.DONE_CONDITION)[1:]), hst.sampled_from(["vda", "vdb"])),
    hst.tuples(hst.just("complete"), hst.sampled_from(list(st.DONE_CONDITION)), hst.sampled_from(["vda", "vdb"]),
               hst.booleans()),
    hst.tuples(hst.just("bytes"), hst.sampled_from(list(st.PHASE_VERB)), hst.sampled_from(["vda", "vdb"]),
               hst.integers(0, 100), hst.integers(1, 100)),
), max_size=40)


@given(_events)
def test_progress_never_decreases(events):
    status = started()
    seen = [status["progress"]]
    for event in events:
        if event[0] == "enter":
            st.enter_phase(status, event[1], disk=event[2])
        elif event[0] == "complete":
            st.complete_phase(status, event[1], disk=event[2], all_disks_done=event[3])
        else:
            _, phase, disk, done, total = event
            st.report_bytes(status, phase, disk, min(done, total), total)
        seen.append(status["progress"])
        assert status["phase"] in Phase._value2member_map_
        history = [h["phase"] for h in status["phaseHistory"]]
        assert all(a != b for a, b in zip(history, history[1:]))  # only changes are recorded
    assert seen == sorted(seen)
    assert all(0 <= p <= 99 for p in seen)
    st.mark_ready(status, "ok")
    assert status["progress"] == 100


# -- per-disk checksum, virtual size, the run summary --------------------------------------------------------

def test_a_disk_records_its_virtual_size_beside_the_data_that_moves():
    status = started()
    st.report_bytes(status, Phase.TRANSFERRING, "vda", 1 * GIB, 3 * GIB, virtual=10 * GIB)
    disk = status["disks"][0]
    assert (disk["bytesDone"], disk["bytesTotal"], disk["virtualBytes"]) == (GIB, 3 * GIB, 10 * GIB)
    assert status["message"] == "Uploading disk vda (33% complete, 1GiB/3GiB)"


def test_checksum_is_pending_from_transferring_until_verified_and_never_reset_after():
    status = started()
    st.enter_phase(status, Phase.EXPORTING, disk="vda")
    assert "checksum" not in status["disks"][0]
    st.enter_phase(status, Phase.TRANSFERRING, disk="vda")
    assert status["disks"][0]["checksum"] == st.CHECKSUM_PENDING
    st.set_checksum(status, "vda", st.CHECKSUM_VERIFIED)
    st.enter_phase(status, Phase.TRANSFERRING, disk="vda")  # a retried upload of a verified disk
    assert status["disks"][0]["checksum"] == st.CHECKSUM_VERIFIED


def test_the_run_summary_adds_up_disks_times_and_rates(monkeypatch):
    status = started()
    status["startTime"] = "2026-12-04T10:00:00Z"
    status["disks"] = [{"name": "vda", "startTime": "2026-12-04T10:00:05Z", "completionTime": "2026-12-04T10:00:45Z",
                        "checksum": "verified"},
                       {"name": "vdb", "startTime": "2026-12-04T10:00:05Z", "checksum": "failed"}]
    status["completionTime"] = "2026-12-04T10:01:00Z"
    summary = st.run_summary(status, [
        {"name": "vda", "virtualBytes": 10 * GIB, "allocatedBytes": 2 * GIB, "bytesMoved": 2 * GIB},
        {"name": "vdb", "virtualBytes": GIB, "allocatedBytes": 0, "bytesMoved": 0},
        {"name": "vdc", "virtualBytes": GIB, "allocatedBytes": 0, "bytesMoved": None}])  # never started
    vda, vdb, vdc = summary["disks"]
    assert (vda["seconds"], vda["rateBytesPerSecond"], vda["checksum"]) == (40.0, 2 * GIB // 40, "verified")
    assert (vdb["seconds"], vdb["rateBytesPerSecond"], vdb["checksum"]) == (55.0, None, "failed")  # to the run's end
    assert (vdc["seconds"], vdc["bytesMoved"], vdc["checksum"]) == (None, 0, "pending")
    assert (summary["seconds"], summary["bytesMoved"], summary["virtualBytes"]) == (60.0, 2 * GIB, 12 * GIB)
    assert summary["rateBytesPerSecond"] == 2 * GIB // 60
    lines = st.summary_lines(summary)
    assert lines[0].split() == ["disk", "virtual", "allocated", "moved", "checksum", "time", "rate"]
    assert lines[1].split() == ["vda", "10GiB", "2GiB", "2GiB", "verified", "40s", "51.2MiB/s"]
    assert lines[-1].split() == ["total", "12GiB", "2GiB", "60s", "34.1MiB/s"]


def test_a_summary_without_times_has_no_rate():
    summary = st.run_summary({"phase": "Failed"}, [{"name": "vda", "virtualBytes": 1, "allocatedBytes": 1,
                                                    "bytesMoved": 1}])
    assert summary["seconds"] is None and summary["rateBytesPerSecond"] is None
    assert st.summary_lines(summary)[1].split()[-2:] == ["-", "-"]
