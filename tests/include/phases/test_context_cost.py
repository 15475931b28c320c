"""A task reads its own migration's spec files, not the whole store: the cost of a task (and of the
worker's DAG parse for it) stays flat as the store grows. Counted in files parsed, not in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from include import store as store_mod
from include.demo import DemoWorld, store_documents
from include.phases import MigrationContext
from include.store import SpecStore

ROOT = Path(__file__).resolve().parents[3]


def _write_specs(store: Path, count: int) -> None:
    world = DemoWorld(uri="qemu:///system", prefix="cost", root=store.parent)
    for i in range(count):
        docs = store_documents(world, name=f"vm-{i:03d}")
        (store / f"vm-{i:03d}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))


@pytest.fixture
def parsed(monkeypatch):
    """The spec files parsed, in order (the store's own reader, counted)."""
    seen: list[str] = []
    real = store_mod.load_documents

    def counting(path):
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(store_mod, "load_documents", counting)
    return seen


def _validated(store: Path, name: str) -> list[str]:
    """What Validating records: the files this migration resolves from, saved in its plan."""
    ctx = MigrationContext(namespace="default", name=name, store=SpecStore(store))
    ctx.validating = True
    files = ctx.spec_files()
    SpecStore(store).save_plan("default", name, {"specFiles": files, "disks": []})
    return files


@pytest.mark.parametrize("count", [1, 1000])
def test_a_later_phase_reads_only_its_own_files(store, parsed, count):
    _write_specs(store, count)
    files = _validated(store, "vm-000")
    # its VMMigration and VirtualMachine, and the file whose copy of the (shared) Providers is used
    assert files == sorted({"vm-000.yaml", f"vm-{count - 1:03d}.yaml"})
    parsed.clear()
    ctx = MigrationContext(namespace="default", name="vm-000", store=SpecStore(store))
    assert ctx.migration.name == "vm-000"
    assert ctx.resolved.target.type == "libvirt"
    assert parsed == files  # at most two files, with 1 spec in the store as with 1,000


def test_objects_in_other_files_are_recorded(store):
    _write_specs(store, 2)
    docs = list(yaml.safe_load_all((store / "vm-001.yaml").read_text()))
    # the Providers move to a file of their own: the migration now depends on two files
    (store / "vm-001.yaml").write_text(yaml.safe_dump_all([d for d in docs if d["kind"] != "Provider"]))
    (store / "providers.yaml").write_text(yaml.safe_dump_all([d for d in docs if d["kind"] == "Provider"]))
    (store / "vm-000.yaml").unlink()
    assert _validated(store, "vm-001") == ["providers.yaml", "vm-001.yaml"]


def test_a_moved_object_falls_back_to_the_whole_store(store, parsed):
    _write_specs(store, 3)
    _validated(store, "vm-002")
    docs = list(yaml.safe_load_all((store / "vm-002.yaml").read_text()))
    # the VMMigration moves to another file after Validating: its recorded file no longer holds it
    (store / "vm-002.yaml").write_text(yaml.safe_dump_all([d for d in docs if d["kind"] != "VMMigration"]))
    (store / "moved.yaml").write_text(yaml.safe_dump_all([d for d in docs if d["kind"] == "VMMigration"]))
    parsed.clear()
    ctx = MigrationContext(namespace="default", name="vm-002", store=SpecStore(store))
    assert ctx.migration.name == "vm-002"
    assert "moved.yaml" in parsed and len(parsed) > 1


def test_recorded_files_never_leave_the_store(store):
    _write_specs(store, 1)
    SpecStore(store).save_plan("default", "vm-000", {"specFiles": ["../outside.yaml"], "disks": []})
    (store.parent / "outside.yaml").write_text((store / "vm-000.yaml").read_text())
    assert SpecStore(store).own_files("default", "vm-000") is None


def test_the_workers_dag_parse_reads_only_its_own_files(store, parsed, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    _write_specs(store, 50)
    _validated(store, "vm-007")
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "vmmigration__default__vm-007")
    parsed.clear()
    bag = DagBag(dag_folder=str(ROOT / "dags" / "vmmigrations.py"))
    assert "vmmigration__default__vm-007" in bag.dags
    assert parsed == ["vm-007.yaml", "vm-049.yaml"], json.dumps(parsed[:5])
    assert bag.dags["vmmigration__default__vm-007"].get_task("disk.export_disk").pool == "libvirt_io"
