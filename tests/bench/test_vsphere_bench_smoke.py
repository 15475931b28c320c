"""The vSphere benchmark leg runs end to end on a small disk and reports its fields (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_vsphere_benchmark_runs_and_reports(vcsim):
    env = {**os.environ, "VMMIGRATION_ALLOW_LOOPBACK": "true"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "vsphere_bench.py"), "--size-mib", "64",
                           "--no-libvirt", "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    for leg in ("plain", "ours"):
        assert report[leg]["seconds"] > 0 and report[leg]["mibPerSecond"] > 0, report
    # both legs moved the whole export (the streamOptimized file), nothing more
    assert report["ours"]["bytes"] == report["plain"]["bytes"] > 0
    assert report["ratio"] > 0 and report["libvirt"] is None
