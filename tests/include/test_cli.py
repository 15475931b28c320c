"""include/cli.py: bad input (not UTF-8, not YAML, anchors and aliases, repeated keys, bad names) is an error
naming the file and the field, with a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from include.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _spec(name: str = "mig", **spec) -> str:
    body = {"sourceName": "src-vm", "targetProviderRef": {"name": "kvm-target"},
            "storage": {"type": "nfs", "path": "/mnt/share"}, **spec}
    return yaml.safe_dump({"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
                           "metadata": {"name": name, "namespace": "default"}, "spec": body}, sort_keys=False)


CASES = {
    "latin1": (_spec(targetName="café").replace("\\xE9", "é").encode("latin-1"), 2, "not UTF-8 text"),
    "unclosed": (b"kind: VMMigration\nmetadata: [unclosed\n", 2, "not readable YAML"),
    "alias": (("base: &b {type: nfs}\n" + _spec()).encode(), 2, "line 1: YAML anchors (&b) are not allowed"),
    "dup": ((_spec(cleanupPolicy={"deleteSource": False}) + "    deleteSource: true\n").encode(), 2,
            "duplicate key 'deleteSource' (spec.cleanupPolicy.deleteSource)"),
    "slash": (_spec("web/x").encode(), 1, "a VMMigration was ignored: metadata.name 'web/x' is not a valid name"),
    "backoff": (_spec(retryPolicy={"backoffDuration": "99999999999h"}).encode(), 1,
                "spec.retryPolicy.backoffDuration: '99999999999h' is longer than the maximum 24h"),
    "hint": (_spec(targetNetworkHints=[{"name": "eth0", "bridge": 'br0"/><x'}]).encode(), 1,
             "spec.targetNetworkHints[0].bridge: 'br0\"/><x' is not a valid interface or bridge name"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_reports_bad_input_without_a_traceback(tmp_path, capsys, case):
    data, code, message = CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(data)
    assert main(["validate", str(path)]) == code
    out = capsys.readouterr()
    text = out.out + out.err
    assert message in text, text
    assert "Traceback" not in text
    if code == 2:
        assert out.err.startswith(f"error: {path}: ")


def test_plan_reports_bad_input_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "alias.yaml"
    path.write_bytes(CASES["alias"][0])
    assert main(["plan", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: line 1: YAML anchors (&b) are not allowed\n"


def test_bad_inventory_file_is_named(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(_spec())
    inventory = tmp_path / "inv"
    inventory.mkdir()
    (inventory / "bad.yaml").write_bytes(b"\xff\xfe")
    assert main(["validate", str(good), "--inventory", str(inventory)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {inventory / 'bad.yaml'}: not UTF-8 text")


@pytest.mark.parametrize("name", ["../../etc/passwd", "default/a/b", "default/Bad"])
def test_status_refuses_names_that_are_not_kubernetes_names(tmp_path, capsys, name):
    assert main(["status", name, "--store", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {name}: not NAMESPACE/NAME: ")


@pytest.mark.parametrize("case", ["latin1", "alias", "dup"])
def test_real_cli_exits_non_zero_naming_the_file(tmp_path, case):
    data, code, message = CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(data)
    proc = subprocess.run([sys.executable, "-m", "include", "validate", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code
    assert "Traceback" not in proc.stderr
    assert str(path) in proc.stderr and message in proc.stderr
