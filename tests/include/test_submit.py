"""include.submit against a real store folder and the real kube-apiserver: what a submission writes, and every
case where it refuses to replace what it did not write (another file's migration, another submitter's, one under
way or Ready, a VMMigration of the cluster), or to write at all (an identity without the submitter's RBAC)."""

from __future__ import annotations

import uuid

import pytest
import yaml

from include.demo import DemoWorld, store_documents, write_store
from include.kube_sync import GROUP, VERSION, run_id_for
from include.spec import SpecValidationError
from include.store import FileStatusSink, SpecStore
from include.submit import ClusterRefused, submit_to_cluster, submit_to_store, submitted_path


@pytest.fixture
def world_store(tmp_path):
    world = DemoWorld(uri="qemu:///system", prefix="sub", root=tmp_path)
    docs = [d for d in store_documents(world, name="demo") if d["kind"] != "VMMigration"]
    write_store(tmp_path / "store", "inventory.yaml", docs)
    return world, SpecStore(tmp_path / "store")


def _doc(world, name: str, namespace: str = "default", **spec) -> dict:
    base = next(d for d in store_documents(world, name=name) if d["kind"] == "VMMigration")
    base["metadata"]["namespace"] = namespace
    base["spec"].update(spec)
    return base


def _phase(store: SpecStore, name: str, phase: str, namespace: str = "default") -> None:
    FileStatusSink(store).update(namespace, name, lambda s: s.update({"phase": phase}))


def _refused(store, doc, by="form/run-1", match=""):
    with pytest.raises(SpecValidationError) as err:
        submit_to_store(store, doc, via="a test", by=by)
    assert [e.path for e in err.value.errors] == ["metadata.name"] and match in str(err.value)


def test_names_with_double_dashes_never_share_a_file(world_store):
    world, store = world_store
    write_store(store.root, "grants.yaml", [])  # namespaces a--b and a hold nothing else; the spec check is local
    first = submit_to_store(store, _doc(world, "c", "a--b"), via="a test", by="x", check_inventory=False)
    second = submit_to_store(store, _doc(world, "b--c", "a"), via="a test", by="x", check_inventory=False)
    assert first.written and second.written
    assert submitted_path(store, "a--b", "c") != submitted_path(store, "a", "b--c")
    assert {"a--b/c", "a/b--c"} <= set(store.index().migrations)


def test_a_migration_of_another_file_is_never_replaced(world_store):
    world, store = world_store
    write_store(store.root, "mine.yaml", [_doc(world, "web")])
    _refused(store, _doc(world, "web", targetName="other"), match="already defined in mine.yaml")
    assert not submitted_path(store, "default", "web").exists()


def test_another_submitter_cannot_replace_a_migration_waiting_for_its_run(world_store):
    world, store = world_store
    assert submit_to_store(store, _doc(world, "web"), via="a test", by="form/alice").written
    _refused(store, _doc(world, "web", targetName="bob-vm"), by="form/bob", match="submitted by form/alice")
    # the same submitter (a retry of the same form run) may, and the same spec again writes nothing
    assert submit_to_store(store, _doc(world, "web", targetName="alice-2"), via="a test", by="form/alice").written
    again = submit_to_store(store, _doc(world, "web", targetName="alice-2"), via="a test", by="form/bob")
    assert again.written is False
    kept = yaml.safe_load(submitted_path(store, "default", "web").read_text().split("\n", 1)[1])
    assert kept["spec"]["targetName"] == "alice-2"


@pytest.mark.parametrize(("phase", "allowed"), [("Transferring", False), ("Ready", False), ("Failed", True)])
def test_a_new_spec_replaces_a_submitted_one_only_after_a_failure(world_store, phase, allowed):
    world, store = world_store
    submit_to_store(store, _doc(world, "web"), via="a test", by="form/alice")
    _phase(store, "web", phase)
    doc = _doc(world, "web", targetName="again")
    if allowed:
        assert submit_to_store(store, doc, via="a test", by="form/bob").written
    else:
        _refused(store, doc, by="form/alice", match=phase)


def test_a_file_holding_another_document_is_never_overwritten(world_store):
    world, store = world_store
    path = submitted_path(store, "default", "web")
    path.write_text(yaml.safe_dump(_doc(world, "elsewhere")))
    _refused(store, _doc(world, "web"), match="holds another document")
    assert "elsewhere" in path.read_text()


def test_credentials_in_the_storage_endpoint_are_refused_before_anything_is_written(world_store):
    world, store = world_store
    doc = _doc(world, "web", storage={"type": "http", "endpoint": "https://user:s3cret@storage.example.com"})
    with pytest.raises(SpecValidationError) as err:
        submit_to_store(store, doc, via="a test", by="x")
    assert [e.path for e in err.value.errors] == ["spec.storage.endpoint"] and "s3cret" not in str(err.value)
    assert not submitted_path(store, "default", "web").exists()


def test_a_cluster_submission_creates_once_and_never_replaces(kube_api, submitter, tmp_path):
    world = DemoWorld(uri="qemu:///system", prefix="subk", root=tmp_path)
    name = f"form-{uuid.uuid4().hex[:6]}"
    form = {"via": "the test form", "by": "form/run-1"}
    with kube_api.client(submitter) as api:
        made = submit_to_cluster(api, _doc(world, name), **form)
        again = submit_to_cluster(api, _doc(world, name), **form)  # a retry after a lost reply
        refused = []
        for doc, who in ((_doc(world, name, targetName="elsewhere"), form),  # another spec
                         (_doc(world, name), {**form, "by": "form/run-2"}),  # another form run, the same values
                         (_doc(world, name), {**form, "via": "another form"})):
            with pytest.raises(SpecValidationError) as err:
                submit_to_cluster(api, doc, **who)
            refused.append(err.value)
    there = kube_api.request("GET", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}")[1]
    uid = there["metadata"]["uid"]
    assert (made.where, made.written, made.run_id, made.conf) == ("cluster", True, run_id_for(uid, 1),
                                                                  {"uid": uid, "generation": 1})
    assert (again.written, again.run_id) == (False, made.run_id)
    for err in refused:
        assert [e.path for e in err.errors] == ["metadata.name"] and "exists in the cluster" in str(err)
    assert there["spec"]["targetName"] == _doc(world, name)["spec"]["targetName"], "never replaced"
    annotations = there["metadata"]["annotations"]
    assert (annotations["vmmigration.virtrigaud.io/submitted-via"],
            annotations["vmmigration.virtrigaud.io/submitted-by"]) == ("the test form", "form/run-1")


def test_a_cluster_that_refuses_the_create_says_what_is_missing(kube_api, engine, submitter, tmp_path):
    world = DemoWorld(uri="qemu:///system", prefix="subk", root=tmp_path)
    name = f"form-{uuid.uuid4().hex[:6]}"
    form = {"via": "the test form", "by": "form/run-1"}
    kube_api.apply_yaml({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "unbound"}})
    with kube_api.client(engine) as api, pytest.raises(ClusterRefused) as as_engine:
        submit_to_cluster(api, _doc(world, name), **form)
    with kube_api.client(submitter) as api, pytest.raises(ClusterRefused) as elsewhere:
        submit_to_cluster(api, _doc(world, name, namespace="unbound"), **form)
    with kube_api.client("admin") as api, pytest.raises(ClusterRefused) as no_namespace:
        submit_to_cluster(api, _doc(world, name, namespace="no-such-ns"), **form)
    assert "HTTP 403" in str(as_engine.value) and "deploy/rbac/submitter.yaml" in str(as_engine.value)
    assert "namespace unbound" in str(elsewhere.value) and "HTTP 403" in str(elsewhere.value)
    assert "HTTP 404" in str(no_namespace.value) and "no namespace no-such-ns" in str(no_namespace.value)
    for ns in ("default", "unbound"):
        items = kube_api.request("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/vmmigrations")[1]["items"]
        assert name not in [i["metadata"]["name"] for i in items], "nothing was created"
