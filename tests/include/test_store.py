"""include/store.py: the folder of YAML specs, the per-migration state files and the status sink."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from include.spec import API_VERSION, SpecValidationError
from include.status import new_status
from include.store import (
    STORE_ENV,
    FileStatusSink,
    SpecStore,
    atomic_write_json,
    dag_id_for,
    default_store_path,
    index_documents,
    load_documents,
)


def vmmigration(name: str, namespace: str | None = "default", **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    body = {"sourceName": "src-vm", "targetProviderRef": {"name": "kvm-target"},
            "storage": {"type": "nfs", "path": "/mnt/share"}}
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": "VMMigration", "metadata": meta, "spec": body}


INVENTORY = [
    {"apiVersion": API_VERSION, "kind": "VirtualMachine", "metadata": {"name": "src-vm", "namespace": "default"},
     "spec": {"providerRef": {"name": "kvm-source"}}, "status": {"id": "src-vm"}},
    {"apiVersion": API_VERSION, "kind": "Provider", "metadata": {"name": "kvm-source"},
     "spec": {"type": "libvirt", "endpoint": "qemu:///system"}},
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": "infra"},
     "stringData": {"username": "root"}},
]


def write(root: Path, filename: str, docs: list[Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / filename
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


# -- indexing -----------------------------------------------------------------------------------------------

def test_index_reads_multi_document_files(tmp_path):
    bundle = write(tmp_path, "bundle.yaml", [vmmigration("good"), *INVENTORY])
    index = SpecStore(tmp_path).index()
    assert list(index.migrations) == ["default/good"]
    entry = index.migrations["default/good"]
    assert (entry.namespace, entry.name, entry.path) == ("default", "good", bundle)
    assert entry.error is None
    assert entry.migration is not None and entry.migration.spec.sourceName == "src-vm"
    assert entry.key == "default/good"
    assert entry.dag_id == "vmmigration__default__good"
    assert entry.doc["metadata"]["name"] == "good"
    # every other kind is indexed by (kind, namespace, name); namespace defaults to "default"
    assert set(index.objects) == {("VirtualMachine", "default", "src-vm"), ("Provider", "default", "kvm-source"),
                                  ("Secret", "infra", "creds")}
    assert index.objects[("Secret", "infra", "creds")]["stringData"] == {"username": "root"}
    assert index.problems == []


def test_index_spans_files_and_ignores_other_suffixes(tmp_path):
    write(tmp_path, "a.yaml", [vmmigration("one")])
    write(tmp_path, "b.yml", [vmmigration("two", namespace="team-b")])
    write(tmp_path, "notes.txt", [vmmigration("ignored")])
    (tmp_path / "folder.yaml").mkdir()  # a directory is not a spec file
    store = SpecStore(tmp_path)
    assert [p.name for p in store.spec_files()] == ["a.yaml", "b.yml"]
    assert sorted(store.index().migrations) == ["default/one", "team-b/two"]


def test_missing_store_folder_is_empty(tmp_path):
    index = SpecStore(tmp_path / "nowhere").index()
    assert (index.migrations, index.objects, index.problems) == ({}, {}, [])


def test_invalid_spec_is_kept_with_its_error(tmp_path):
    write(tmp_path, "bad.yaml", [vmmigration("broken", targetDiskFormat="vhd", storage={"type": "s3"})])
    entry = SpecStore(tmp_path).index().migrations["default/broken"]
    assert entry.migration is None
    assert isinstance(entry.error, SpecValidationError)
    assert {e.path for e in entry.error.errors} == {"spec.targetDiskFormat", "spec.storage.bucket",
                                                    "spec.storage.credentialsSecretRef"}
    assert entry.dag_id == "vmmigration__default__broken"  # still addressable: its DAG reports the error


def test_document_without_name_is_reported(tmp_path):
    nameless = vmmigration("x")
    del nameless["metadata"]["name"]
    path = write(tmp_path, "nameless.yaml", [nameless, {"kind": "Secret", "metadata": {}},
                                             {"kind": "Provider"}, vmmigration("ok")])
    index = SpecStore(tmp_path).index()
    assert list(index.migrations) == ["default/ok"]
    assert index.problems == [
        f"{path}: a VMMigration without metadata.name was ignored",
        f"{path}: a Secret without metadata.name was ignored",
        f"{path}: a Provider without metadata.name was ignored",
    ]


def test_non_mapping_documents_are_skipped(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text("- a\n- list\n---\njust a string\n---\n" + yaml.safe_dump(vmmigration("ok")))
    assert [d["metadata"]["name"] for d in load_documents(path)] == ["ok"]
    assert list(SpecStore(tmp_path).index().migrations) == ["default/ok"]


def test_duplicate_vmmigration_is_reported_and_the_first_wins(tmp_path):
    first = write(tmp_path, "a.yaml", [vmmigration("dup", sourceName="first-vm")])
    second = write(tmp_path, "b.yaml", [vmmigration("dup", sourceName="second-vm")])
    index = SpecStore(tmp_path).index()
    assert index.migrations["default/dup"].path == first
    assert index.migrations["default/dup"].migration.spec.sourceName == "first-vm"
    assert index.problems == [f"{second}: VMMigration default/dup is also defined in {first}; the first one is used"]


def test_same_name_in_other_namespace_is_not_a_duplicate(tmp_path):
    write(tmp_path, "a.yaml", [vmmigration("same", namespace="a"), vmmigration("same", namespace="b")])
    index = SpecStore(tmp_path).index()
    assert sorted(index.migrations) == ["a/same", "b/same"]
    assert index.problems == []


def test_unreadable_yaml_is_reported_and_other_files_still_indexed(tmp_path):
    write(tmp_path, "a-good.yaml", [vmmigration("good")])
    broken = tmp_path / "b-broken.yaml"
    broken.write_text("kind: VMMigration\nmetadata: {name: [unclosed\n")
    write(tmp_path, "c-more.yaml", [*INVENTORY])
    index = SpecStore(tmp_path).index()
    assert list(index.migrations) == ["default/good"]
    assert ("Provider", "default", "kvm-source") in index.objects
    assert len(index.problems) == 1
    assert index.problems[0].startswith(f"{broken}: not readable YAML: ")


def test_read_problems_come_before_document_problems(tmp_path):
    write(tmp_path, "a.yaml", [{"kind": "Secret"}])
    (tmp_path / "b.yaml").write_text(": : :\n\t- bad")
    problems = SpecStore(tmp_path).index().problems
    assert len(problems) == 2
    assert "not readable YAML" in problems[0]
    assert "without metadata.name" in problems[1]


def test_index_documents_directly():
    index = index_documents([(Path("x.yaml"), [vmmigration("m", namespace=None)])])
    assert list(index.migrations) == ["default/m"]


def test_entry(tmp_path):
    write(tmp_path, "a.yaml", [vmmigration("m", namespace="ns")])
    store = SpecStore(tmp_path)
    assert store.entry("ns", "m").migration.name == "m"
    with pytest.raises(KeyError, match="VMMigration ns/other is not in the spec store"):
        store.entry("ns", "other")


def test_default_store_path(monkeypatch, tmp_path):
    monkeypatch.setenv(STORE_ENV, str(tmp_path))
    assert default_store_path() == tmp_path
    assert SpecStore().root == tmp_path
    monkeypatch.delenv(STORE_ENV)
    assert default_store_path() == Path(__file__).resolve().parents[2] / "var" / "store"


def test_dag_id_for():
    assert dag_id_for("default", "migrate-vm-to-vsphere") == "vmmigration__default__migrate-vm-to-vsphere"


# -- state files ----------------------------------------------------------------------------------------------

def test_state_layout(tmp_path):
    store = SpecStore(tmp_path)
    assert store.status_path("ns", "mig") == tmp_path / "status" / "ns" / "mig.json"
    assert store.plan_path("ns", "mig") == tmp_path / "status" / "ns" / "mig.plan.json"
    assert store.disk_record_path("ns", "mig", "vda") == tmp_path / "status" / "ns" / "mig.disks" / "vda.json"


def test_dotted_names_get_their_own_state_files(tmp_path):
    store = SpecStore(tmp_path)
    assert store.status_path("ns", "vm.a") != store.status_path("ns", "vm.b")
    assert store.plan_path("ns", "vm.a") == tmp_path / "status" / "ns" / "vm.a.plan.json"


def test_plan_round_trip(tmp_path):
    store = SpecStore(tmp_path)
    assert store.load_plan("ns", "mig") is None
    assert store.planned_disk_names("ns", "mig") is None
    store.save_plan("ns", "mig", {"disks": [{"name": "vda"}, {"name": "vdb"}], "note": "é"})
    assert store.load_plan("ns", "mig") == {"disks": [{"name": "vda"}, {"name": "vdb"}], "note": "é"}
    assert store.planned_disk_names("ns", "mig") == ["vda", "vdb"]


def test_disk_records(tmp_path):
    store = SpecStore(tmp_path)
    assert store.disk_record("ns", "mig", "vda") == {"name": "vda"}
    assert store.update_disk_record("ns", "mig", "vda", exported=True, sha256="ab") == {
        "name": "vda", "exported": True, "sha256": "ab"}
    merged = store.update_disk_record("ns", "mig", "vda", sha256="cd", objectKey="ns/mig/vda.qcow2")
    assert merged == {"name": "vda", "exported": True, "sha256": "cd", "objectKey": "ns/mig/vda.qcow2"}
    assert store.disk_record("ns", "mig", "vda") == merged
    store.update_disk_record("ns", "mig", "vdb", exported=False)
    store.clear_disk_records("ns", "mig")
    assert store.disk_record("ns", "mig", "vda") == {"name": "vda"}
    assert store.disk_record("ns", "mig", "vdb") == {"name": "vdb"}
    store.clear_disk_records("ns", "never-ran")  # nothing to clear is fine


def test_atomic_write_json_leaves_no_temp_and_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "deep" / "state.json"
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})  # not serialisable: fails half-way
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


# -- status sink ------------------------------------------------------------------------------------------------

def test_status_sink_starts_from_a_new_status(tmp_path):
    sink = FileStatusSink(SpecStore(tmp_path))
    assert sink.get("ns", "mig") is None

    def mutate(status: dict[str, Any]) -> None:
        status["progress"] = 7

    result = sink.update("ns", "mig", mutate)
    assert result == {**new_status(), "progress": 7}
    assert sink.get("ns", "mig") == result
    assert json.loads((tmp_path / "status" / "ns" / "mig.json").read_text()) == result


def test_status_sink_mutation_error_leaves_the_status_untouched(tmp_path):
    sink = FileStatusSink(SpecStore(tmp_path))
    sink.update("ns", "mig", lambda s: s.update(progress=10))

    def boom(status: dict[str, Any]) -> None:
        status["progress"] = 99
        raise RuntimeError("mutation failed")

    with pytest.raises(RuntimeError):
        sink.update("ns", "mig", boom)
    assert sink.get("ns", "mig")["progress"] == 10
    # the lock was released: a later update goes through
    assert sink.update("ns", "mig", lambda s: s.update(progress=11))["progress"] == 11


def _increment(status: dict[str, Any]) -> None:
    status["count"] = status.get("count", 0) + 1


def _worker(root: str, times: int) -> None:
    sink = FileStatusSink(SpecStore(root))
    for _ in range(times):
        sink.update("ns", "mig", _increment)


def test_status_sink_update_is_atomic_across_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), 50)) for _ in range(8)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 8
    assert FileStatusSink(SpecStore(tmp_path)).get("ns", "mig")["count"] == 400
    # no temp file left behind, only the status and its lock
    assert set(os.listdir(tmp_path / "status" / "ns")) == {"mig.json", ".mig.json.lock"}


def test_disk_records_are_atomic_across_processes(tmp_path):
    def worker(disk_key: str) -> None:
        store = SpecStore(tmp_path)
        for _ in range(25):
            # reading never sees a half-written file (json would fail to parse it)
            assert store.disk_record("ns", "mig", "vda")["name"] == "vda"
            store.update_disk_record("ns", "mig", "vda", **{disk_key: True})

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=worker, args=(f"k{i}",)) for i in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 4
    # update_disk_record merges under the lock: no process's key is lost
    assert SpecStore(tmp_path).disk_record("ns", "mig", "vda") == {"name": "vda", "k0": True, "k1": True,
                                                                    "k2": True, "k3": True}
    assert set(os.listdir(tmp_path / "status" / "ns" / "mig.disks")) == {"vda.json", ".vda.json.lock"}
