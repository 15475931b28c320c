"""The benchmark runs end to end on a small disk and reports every field. No timing is asserted: the only
number checked is bytes sent vs allocated, a correctness property of sparse handling, not a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = {"sha256", "boto3_upload", "qemu_img_convert", "qemu_img_convert_fsync", "export_to_s3", "s3_to_import",
         "whole_migration"}
PHASES = {"validate", "snapshot", "export_disk", "transfer_disk", "convert_disk", "import_disk", "create_vm",
          "validate_target", "finalize"}

pytestmark = pytest.mark.e2e


def test_benchmark_runs_and_reports_every_field(tmp_path, libvirt_uri):
    env = {**os.environ, "VMMIGRATION_ALLOW_LOOPBACK": "true"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "transfer_bench.py"), "--size-mib", "256", "--json",
         "--workdir", str(tmp_path / "bench")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)

    steps = {s["step"]: s for s in report["steps"]}
    assert set(steps) == STEPS
    for s in steps.values():
        assert s["seconds"] > 0 and s["mibPerSecond"] > 0, s
    for name, kind in (("export_to_s3", "speed"), ("s3_to_import", "time"), ("whole_migration", "time")):
        assert steps[name]["ratio"] > 0 and steps[name]["ratioKind"] == kind, steps[name]
    assert steps["export_to_s3"]["baseline"] == "boto3_upload"
    assert steps["whole_migration"]["baseline"] == "qemu_img_convert"
    assert isinstance(steps["whole_migration"]["pass"], bool)

    assert set(report["phases"]) == PHASES
    for phase in report["phases"].values():
        assert {"seconds", "cpuSeconds", "serverCpuSeconds", "peakRssMiB"} <= set(phase), phase

    rss = report["rss"]
    assert rss["oursPeakMiB"] > 0 and rss["boto3PeakMiB"] > 0 and rss["targetMiB"] == 256
    assert isinstance(rss["pass"], bool)

    sent = report["bytes"]
    assert sent["allocated"] == 128 * 1024 * 1024  # half of 256 MiB is random data
    assert 0 < sent["sent"] <= 1.05 * sent["allocated"], sent
    assert sent["pass"] is True

    assert report["targetIdenticalToSource"] is True
    assert isinstance(report["missed"], list)
    assert not (tmp_path / "bench" / "world").exists()  # cleaned up without --keep


def test_live_benchmark_reads_the_point_in_time_as_qemu_img_does(libvirt_uri):
    """The live-export benchmark runs on a small disk; the one thing checked is that ours and qemu-img read the
    same bytes from the same point in time (no timing is asserted)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "live_bench.py"), "--size-mib", "128", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["same_sha256"] is True
    assert report["ours"]["data_bytes"] == 64 * 1024 * 1024  # every other 64 MiB block: only data is read
    assert {"ratio_vs_qemu_img_convert", "ratio_vs_qemu_img_convert_plus_sha256", "begin_seconds"} <= set(report)
