"""Property test: generated and mutated VMMigration specs never break the validate CLI or the DAG factory.

Each example starts from a valid spec and mutates fields (wrong types, huge or odd strings, unicode, ``/``,
newlines, huge numbers, durations, unknown keys), then maybe its YAML text (a repeated key, an anchor and an
alias, a byte that is not UTF-8, a cut). Every example goes through ``python -m include validate``'s function
in-process (a few through the real command): no traceback, and every error names its field or its file. Then
all of them are laid out in a few spec stores, each beside one valid migration, and parsed by a ``DagBag`` of
the dags folder: vmmigrations.py never fails to import, the valid migration keeps its DAG, every entry that
``include.store.dag_entries`` accepts gets its DAG and every problem names its file.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from include.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = 1000
STORES = 4  # DagBag parses: the examples are spread over this many spec stores

BASE: dict[str, Any] = {
    "apiVersion": "infra.virtrigaud.io/v1beta1",
    "kind": "VMMigration",
    "metadata": {"name": "fuzz", "namespace": "default", "labels": {"wave": "1"}},
    "spec": {
        "sourceName": "src-vm",
        "sourceNamespace": "default",
        "targetProviderRef": {"name": "kvm-target", "namespace": "default"},
        "targetName": "src-vm-migrated",
        "targetStorageHint": "default",
        "targetDiskFormat": "raw",
        "targetNetworkHints": [{"name": "eth0", "bridge": "virbr0"}, {"name": "eth1", "network": "VM Network"}],
        "targetResourceHints": {"cpu": 2, "memory": 512, "disk": 10},
        "storage": {"type": "nfs", "path": "/mnt/share", "endpoint": "nfs.local"},
        "cleanupPolicy": {"deleteIntermediate": True, "deleteSnapshot": True, "deleteSource": False},
        "retryPolicy": {"maxAttempts": 2, "backoffDuration": "5s", "maxBackoffDuration": "10s"},
    },
}
FIELDS: list[tuple[Any, ...]] = [
    ("apiVersion",), ("kind",), ("metadata",), ("metadata", "name"), ("metadata", "namespace"),
    ("metadata", "labels"), ("metadata", "annotations"), ("spec",), ("status",),
    *[("spec", k) for k in BASE["spec"]],
    ("spec", "targetProviderRef", "name"), ("spec", "targetProviderRef", "namespace"),
    ("spec", "targetNetworkHints", 0), ("spec", "targetNetworkHints", 0, "name"),
    ("spec", "targetNetworkHints", 0, "bridge"), ("spec", "targetNetworkHints", 1, "network"),
    ("spec", "targetNetworkHints", 2, "bridge"),
    *[("spec", "targetResourceHints", k) for k in ("cpu", "memory", "disk")],
    *[("spec", "storage", k) for k in ("type", "bucket", "endpoint", "region", "path", "credentialsSecretRef")],
    ("spec", "storage", "credentialsSecretRef", "name"),
    *[("spec", "cleanupPolicy", k) for k in ("deleteIntermediate", "deleteSnapshot", "deleteSource")],
    *[("spec", "retryPolicy", k) for k in ("maxAttempts", "backoffDuration", "maxBackoffDuration")],
]
ODD = ["a/b", "web\nx", "web.plan", "..", "../../etc", "x" * 300, "n" * 253, "s" * 95, "s" * 63, "99999999999h",
       "24h", "24h0m1s", "0s", "-5m", "1e400h", "1.5h", "9" * 400 + "ms", "café", "\u202eevil", "<x>", "'", '"',
       "a b", "{{ var }}", "%s", "${HOME}", "\x00", "\t", "VM Network", "datastore1 (1)", "local-lvm", "s3", "nfs",
       "http", "qcow2", "vhd", "true", "null", "~", "", " ", "UPPER", "under_score", "-lead", "trail-"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**15, max_value=10**40),
    st.integers(min_value=-(10**40), max_value=-1), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODD), st.text(max_size=20), st.text(min_size=200, max_size=400),
    st.from_regex(r"\A[0-9]{1,15}(ms|s|m|h)([0-9]{1,3}(s|m))?\Z"),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.one_of(st.text(max_size=10), st.sampled_from(ODD)), inner, max_size=3),
                      max_leaves=6)
FIELD_ERROR = re.compile(r"^(spec|metadata|apiVersion|kind|status)(\.|\[|:|$)|^\(document\)|^\[")


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = doc
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(part, int):
            if not isinstance(node, list):
                return
            while len(node) <= part:
                node.append({})
            if last:
                node[part] = value
            else:
                if not isinstance(node[part], (dict, list)):
                    node[part] = {}
                node = node[part]
        else:
            if not isinstance(node, dict):
                return
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = [] if isinstance(path[i + 1], int) else {}
                node = node[part]


@st.composite
def mutated_specs(draw: st.DrawFn) -> bytes:
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        if draw(st.booleans()):
            _set(doc, draw(st.sampled_from(FIELDS)), draw(VALUES))
        else:  # an unknown key somewhere
            parent = draw(st.sampled_from([(), ("metadata",), ("spec",), ("spec", "storage"),
                                           ("spec", "retryPolicy"), ("spec", "targetNetworkHints", 0)]))
            _set(doc, (*parent, draw(st.one_of(st.text(max_size=12), st.sampled_from(ODD)))), draw(VALUES))
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=draw(st.booleans()))
    raw = draw(st.sampled_from(["none"] * 6 + ["duplicate", "alias", "latin1", "bad-byte", "cut"]))
    lines = text.splitlines(keepends=True)
    if raw == "duplicate":
        keyed = [i for i, line in enumerate(lines) if re.match(r"^\s*[A-Za-z]+: \S", line)]
        if keyed:
            i = draw(st.sampled_from(keyed))
            indent, key = re.match(r"^(\s*)([A-Za-z]+):", lines[i]).groups()
            lines.insert(i + 1, f"{indent}{key}: {draw(st.sampled_from(['true', 'false', '1', 'x', '{}']))}\n")
    elif raw == "alias":
        lines[:0] = ["zz-anchor: &anc [1, 2, 3]\n"]
        lines.append("zz-alias: [*anc, *anc]\n")
    text = "".join(lines)
    data = text.encode("utf-8")
    if raw == "latin1":
        data = text.encode("latin-1", errors="replace") + "é".encode("latin-1")
    elif raw == "bad-byte":
        at = draw(st.integers(min_value=0, max_value=len(data)))
        data = data[:at] + b"\xff" + data[at:]
    elif raw == "cut":
        data = data[:draw(st.integers(min_value=0, max_value=len(data)))]
    return data


def _validate(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(path)])
    return code, out.getvalue(), err.getvalue()


def _check_output(path: Path, code: int, out: str, err: str) -> None:
    assert code in (0, 1, 2), code
    assert "Traceback" not in out + err
    for line in (out + err).splitlines():
        if line.startswith("  "):  # one field error of a VMMigration
            where = line.strip()
            assert FIELD_ERROR.match(where) or ": unknown field" in where, line
        elif line.startswith("error: "):
            assert str(path) in line, line
        else:
            assert re.match(r"^VMMigration \S+: (valid|\d+ errors?)$", line), line


def _write_keeper(store: Path) -> None:
    keeper = yaml.safe_load(yaml.safe_dump(BASE))
    keeper["metadata"] = {"name": "keeper", "namespace": "keep"}
    (store / "0000-keeper.yaml").write_text(yaml.safe_dump(keeper, sort_keys=False))


def test_mutated_specs_never_break_validate_or_the_dag_factory(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    from include.store import SpecStore, dag_entries

    generated: list[bytes] = []
    # not under tmp_path: the end-of-session secret scan reads every YAML file there with a plain loader
    with tempfile.TemporaryDirectory(prefix="vmmig-fuzz-") as tmp:
        folder = Path(tmp) / "cli"
        folder.mkdir()

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(mutated_specs())
        def through_validate(data: bytes) -> None:
            path = folder / f"spec-{len(generated):04d}.yaml"
            path.write_bytes(data)
            _check_output(path, *_validate(path))
            generated.append(data)

        through_validate()
        assert len(generated) >= EXAMPLES

        # a few through the real command line
        for i in range(0, len(generated), len(generated) // 5):
            path = folder / f"real-{i:04d}.yaml"
            path.write_bytes(generated[i])
            proc = subprocess.run([sys.executable, "-m", "include", "validate", str(path)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)
            _check_output(path, proc.returncode, proc.stdout, proc.stderr)

        # the DAG factory: each store holds a share of the mutated specs beside one valid migration
        for n in range(STORES):
            store = Path(tmp) / f"store-{n}"
            store.mkdir()
            _write_keeper(store)
            for i, data in enumerate(generated[n::STORES]):
                (store / f"fuzz-{i:04d}.yaml").write_bytes(data)
            monkeypatch.setenv("VMMIGRATION_STORE", str(store))
            entries, problems = dag_entries(SpecStore(store).index())
            bag = DagBag(dag_folder=str(ROOT / "dags"))
            errors = {Path(k).name: v for k, v in bag.import_errors.items()}
            assert set(errors) <= {"vmmigration_store_check.py"}, errors
            assert "vmmigration__keep__keeper" in bag.dags
            assert {d for d in bag.dags if d.startswith("vmmigration__")} == {e.dag_id for e in entries}
            for dag_id in bag.dags:
                assert len(dag_id) <= 250
            for problem in problems:
                assert problem.startswith(f"{store}/") and "\n" not in problem, problem
                assert problem in errors["vmmigration_store_check.py"]
