"""The annotations of the boot check and of deleting a running source: every bad one named."""

from __future__ import annotations

from include.bootcheck import (
    BOOT_CHECK,
    BOOT_MARKER,
    BOOT_TIMEOUT,
    DELETE_RUNNING,
    BootCheckPlan,
    boot_check_from,
    delete_running_from,
)


def test_no_annotation_no_check():
    assert boot_check_from({}) == (None, [])


def test_serial_with_marker_and_timeout():
    plan, errors = boot_check_from({BOOT_CHECK: "Serial", BOOT_MARKER: "login:", BOOT_TIMEOUT: "30"})
    assert errors == [] and plan == BootCheckPlan(mode="serial", marker="login:", timeout=30.0)


def test_guest_agent_defaults():
    plan, _ = boot_check_from({BOOT_CHECK: "guest-agent"})
    assert plan is not None and plan.mode == "guest-agent" and plan.timeout == 120.0


def test_every_bad_annotation_is_named():
    plan, errors = boot_check_from({BOOT_CHECK: "ping", BOOT_MARKER: "a\nb", BOOT_TIMEOUT: "soon"})
    assert plan is None
    fields = [e.field for e in errors]
    assert fields == [f"metadata.annotations[{BOOT_CHECK}]", f"metadata.annotations[{BOOT_MARKER}]",
                      f"metadata.annotations[{BOOT_TIMEOUT}]"]
    assert "'ping' is not a boot check" in str(errors[0])


def test_timeout_bounds():
    assert boot_check_from({BOOT_CHECK: "serial", BOOT_TIMEOUT: "0"})[1]
    assert boot_check_from({BOOT_CHECK: "serial", BOOT_TIMEOUT: "7200"})[1]


def test_delete_running_is_true_or_false():
    assert delete_running_from({}) == (False, [])
    assert delete_running_from({DELETE_RUNNING: "true"}) == (True, [])
    ok, errors = delete_running_from({DELETE_RUNNING: "yes"})
    assert not ok and errors[0].field == f"metadata.annotations[{DELETE_RUNNING}]"
