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
    SpecFileError,
    SpecStore,
    atomic_write_json,
    dag_id_for,
    default_store_path,
    index_documents,
    load_documents,
    parse_documents,
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
    folder = tmp_path / "status" / "ns" / "mig"
    assert store.state_dir("ns", "mig") == folder
    assert store.status_path("ns", "mig") == folder / "status.json"
    assert store.plan_path("ns", "mig") == folder / "plan.json"
    assert store.run_record_path("ns", "mig") == folder / "run.json"
    assert store.disk_record_path("ns", "mig", "vda") == folder / "disks" / "vda.json"


def test_dotted_names_get_their_own_state_files(tmp_path):
    store = SpecStore(tmp_path)
    assert store.status_path("ns", "vm.a") != store.status_path("ns", "vm.b")
    assert store.plan_path("ns", "vm.a") == tmp_path / "status" / "ns" / "vm.a" / "plan.json"


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
    assert json.loads((tmp_path / "status" / "ns" / "mig" / "status.json").read_text()) == result


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
    assert set(os.listdir(tmp_path / "status" / "ns" / "mig")) == {"status.json", ".status.json.lock"}


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
    assert set(os.listdir(tmp_path / "status" / "ns" / "mig" / "disks")) == {"vda.json", ".vda.json.lock"}


# -- one bad spec never takes the others down ---------------------------------------------------------------

ALIAS_BOMB = "".join(
    [f"a0: &a0 [{', '.join(['lol'] * 9)}]\n"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)]
)


@pytest.mark.parametrize("name", ["web/../../etc", "bad\nname", "Upper", "a" * 254, "under_score", 7])
def test_a_vmmigration_with_a_bad_name_is_a_problem_and_the_others_stay(tmp_path, name):
    path = write(tmp_path, "a.yaml", [vmmigration(name), vmmigration("good")])
    index = SpecStore(tmp_path).index()
    assert list(index.migrations) == ["default/good"]
    assert len(index.problems) == 1
    assert index.problems[0].startswith(f"{path}: a VMMigration was ignored: metadata.name ")
    assert "\n" not in index.problems[0]  # a newline in the name is quoted, the problem stays one line


@pytest.mark.parametrize("namespace", ["n" * 95, "n" * 64, "dotted.ns", "a/b"])
def test_a_namespace_that_is_no_dns_label_is_a_problem(tmp_path, namespace):
    path = write(tmp_path, "a.yaml", [vmmigration("mig", namespace=namespace), vmmigration("good")])
    index = SpecStore(tmp_path).index()
    assert list(index.migrations) == ["default/good"]
    assert len(index.problems) == 1
    assert index.problems[0].startswith(f"{path}: VMMigration mig was ignored: metadata.namespace ")


def test_names_at_kubernetes_limits_are_accepted(tmp_path):
    write(tmp_path, "a.yaml", [vmmigration("n" * 253, namespace="s" * 63)])
    index = SpecStore(tmp_path).index()
    assert index.problems == []
    entry = index.migrations[f"{'s' * 63}/{'n' * 253}"]
    assert entry.error is None
    assert len(entry.dag_id) <= 250


def test_dag_id_for_shortens_with_a_stable_unique_hash():
    assert dag_id_for("default", "n" * 200) == f"vmmigration__default__{'n' * 200}"
    long_a, long_b = "x" * 252 + "a", "x" * 252 + "b"
    a, b = dag_id_for("default", long_a), dag_id_for("default", long_b)
    assert len(a) <= 250 and len(b) <= 250
    assert a != b
    assert a == dag_id_for("default", long_a)  # deterministic (no per-process hash seed)
    assert a.startswith("vmmigration__default__xxx") and a.count("__") == 3
    # a shortened id can never be the id of another (valid) migration: Kubernetes names hold no "_"
    assert dag_id_for("s" * 63, "n" * 253) != dag_id_for("s" * 63, "n" * 252)
    assert len(dag_id_for("s" * 63, "n" * 253)) == 250
    # even names that are refused anyway map to something Airflow accepts
    for ns, name in (("default", "a/b"), ("default", "bad\nname"), ("x", "é" * 300)):
        dag_id = dag_id_for(ns, name)
        assert len(dag_id) <= 250 and all(c.isascii() and (c.isalnum() or c in "_.-") for c in dag_id), dag_id


def test_non_utf8_file_is_a_problem(tmp_path):
    write(tmp_path, "a-good.yaml", [vmmigration("good")])
    bad = tmp_path / "b-latin1.yaml"
    bad.write_bytes(yaml.safe_dump(vmmigration("ok", sourceName="café"), allow_unicode=True,
                                   sort_keys=False).encode("latin-1"))
    index = SpecStore(tmp_path).index()
    assert list(index.migrations) == ["default/good"]
    assert index.problems == [f"{bad}: not UTF-8 text (byte 0xe9 on line 7)"]


def test_alias_bomb_is_refused_without_being_expanded(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB + yaml.safe_dump(vmmigration("boom")))
    assert len(ALIAS_BOMB) < 900  # 9**10 "lol"s once expanded
    write(tmp_path, "good.yaml", [vmmigration("good")])
    index = SpecStore(tmp_path).index()
    assert list(index.migrations) == ["default/good"]
    assert index.problems == [f"{bomb}: line 1: YAML anchors (&a0) are not allowed"]


@pytest.mark.parametrize(("text", "message"), [
    ("a: &x 1\n", "line 1: YAML anchors (&x) are not allowed"),
    ("a: *x\n", "line 1: YAML aliases (*x) are not allowed"),
    ("a: {<<: {b: 1}, b: 2}\n", "line 1: merge keys (<<) are not allowed"),
    ("? [a]\n: 1\n", "line 1: a mapping key must be a plain value, not a list"),
    ("a: " + "[" * 70 + "]" * 70 + "\n", "line 1: nested deeper than 64 levels"),
    ("a: {yes: 1, true: 2}\n", "not readable YAML: duplicate key True"),
    ("a: !!python/object:os.system x\n", "not readable YAML: could not determine a constructor"),
])
def test_unsafe_yaml_is_a_problem(tmp_path, text, message):
    (tmp_path / "x.yaml").write_text(text)
    problems = SpecStore(tmp_path).index().problems
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'x.yaml'}: {message}"), problems[0]


@pytest.mark.parametrize(("text", "message"), [
    ("a: " + "9" * 5000 + "\n", "not readable YAML: Exceeds the limit (4300 digits)"),
    ("a: 2001-13-45\n", "not readable YAML: month must be in 1..12"),
])
def test_values_the_constructor_refuses_are_spec_file_errors(text, message):
    # (not written under tmp_path: the end-of-session secret scan reads every YAML file there)
    with pytest.raises(SpecFileError) as err:
        parse_documents(text)
    assert str(err.value).startswith(message)


def test_duplicate_key_cannot_flip_delete_source(tmp_path):
    path = tmp_path / "flip.yaml"
    path.write_text(yaml.safe_dump(vmmigration("flip", cleanupPolicy={"deleteSource": False}), sort_keys=False)
                    + "    deleteSource: true\n")
    assert path.read_text().count("deleteSource") == 2
    index = SpecStore(tmp_path).index()
    assert index.migrations == {}
    last = len(path.read_text().splitlines())
    assert index.problems == [f"{path}: line {last}: duplicate key 'deleteSource' "
                              f"(spec.cleanupPolicy.deleteSource); each key may appear only once"]


def test_duplicate_keys_in_a_later_document_and_in_lists_name_their_path(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("a: 1\n---\nspec:\n  targetNetworkHints:\n  - name: eth0\n    name: eth1\n")
    assert SpecStore(tmp_path).index().problems == [
        f"{path}: line 6: duplicate key 'name' (spec.targetNetworkHints[0].name); each key may appear only once"]


def test_state_files_of_web_and_web_plan_never_collide(tmp_path):
    store = SpecStore(tmp_path)
    sink = FileStatusSink(store)
    store.save_plan("ns", "web", {"disks": [{"name": "vda"}]})
    sink.update("ns", "web.plan", lambda s: s.update(progress=50))
    store.update_run_record("ns", "web", snapshot="snap-1")
    store.update_disk_record("ns", "web.plan", "vda", exported=True)
    assert store.load_plan("ns", "web") == {"disks": [{"name": "vda"}]}
    assert sink.get("ns", "web.plan")["progress"] == 50
    assert store.run_record("ns", "web.plan") == {}
    assert store.disk_record("ns", "web", "vda") == {"name": "vda"}
    paths = [getattr(store, f)("ns", n) for f in ("status_path", "plan_path", "run_record_path")
             for n in ("web", "web.plan", "web.run", "web.disks")]
    assert len(set(paths)) == len(paths)
    assert sorted(p.name for p in (tmp_path / "status" / "ns").iterdir()) == ["web", "web.plan"]


def test_state_dir_holds_only_kubernetes_names(tmp_path):
    store = SpecStore(tmp_path)
    assert store.state_dir("ns", "web") == tmp_path / "status" / "ns" / "web"
    for namespace, name in (("ns", "../escape"), ("..", "web"), ("ns", "a/b"), ("ns", ""), ("a.b", "web")):
        with pytest.raises(ValueError):
            store.state_dir(namespace, name)
    with pytest.raises(ValueError, match="disk name"):
        store.disk_record_path("ns", "web", "../vda")


def test_clear_disk_records_keeps_other_files_in_the_state_dir(tmp_path):
    store = SpecStore(tmp_path)
    store.update_disk_record("ns", "web", "vda", exported=True)
    ledger = store.state_dir("ns", "web") / "ledger.json"
    ledger.write_text("{}")
    store.clear_disk_records("ns", "web")
    assert ledger.read_text() == "{}"
    assert store.disk_record("ns", "web", "vda") == {"name": "vda"}


def test_dag_entries_lists_what_gets_a_dag_and_every_problem(tmp_path):
    from include.spec import RetryPolicy
    from include.store import dag_entries, retry_settings

    bad = write(tmp_path, "a.yaml", [vmmigration("bad/name"), vmmigration("good"), vmmigration("invalid", spec=1),
                                     vmmigration("n" * 253)])
    entries, problems = dag_entries(SpecStore(tmp_path).index())
    assert [e.name for e in entries] == ["good", "invalid", "n" * 253]  # an invalid spec still gets its DAG
    assert problems == [f"{bad}: a VMMigration was ignored: metadata.name 'bad/name' is not a valid name "
                        "(lowercase letters, digits, '-' and '.')"]
    assert retry_settings(RetryPolicy(maxAttempts=2, backoffDuration="5s"))["retry_delay"].total_seconds() == 5
    with pytest.raises(ValueError, match="spec.retryPolicy"):
        retry_settings(RetryPolicy(backoffDuration="99999999999h"))
