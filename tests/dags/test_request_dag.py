"""dags/vmmigration_request.py: the form DAG parses fast with the store's proposals, and its params, as the API
server holds them (the serialized DAG), accept the guide's example and refuse bad input naming the param, by the
same call a trigger goes through (``create_dagrun`` validates ``params.deep_merge(conf)``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from include import request_form
from include.demo import DemoWorld, store_documents, write_store

ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "dags" / "vmmigration_request.py"
#: the guide's Quick Start, as the form's fields
QUICK_START = {
    "migration_name": "migrate-vm-to-vsphere", "namespace": "default", "source_vm": "default/my-libvirt-vm",
    "target_provider": "default/vsphere-prod", "target_name": "migrated-vm", "storage_type": "s3",
    "storage_bucket": "vm-migrations", "storage_endpoint": "s3.amazonaws.com", "storage_region": "us-east-1",
    "storage_credentials_secret": "s3-credentials", "delete_intermediate": True, "delete_snapshot": True,
    "delete_source": False, "max_attempts": 3, "backoff_duration": "5m",
}


def _bag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    return bag


def _serialized(dag):
    """The DAG as the API server reads it back from the database (the form's schemas included)."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.from_dict(json.loads(json.dumps(DagSerialization.to_dict(dag))))


@pytest.fixture
def demo_store(store):
    world = DemoWorld(uri="qemu:///system", prefix="req", root=store.parent)
    docs = store_documents(world, name="demo")[1:]  # the inventory only: a VM, two Providers, a Secret
    write_store(store, "inventory.yaml", docs)
    return world


def test_the_dag_parses_with_the_form_and_the_stores_proposals(demo_store):
    dag = _bag().dags["vmmigration_request"]
    assert dag.dag_display_name == "Start a VM migration"
    assert dag.description and "vmmigration" in dag.tags
    assert dag.schedule is None
    assert [t.task_id for t in dag.tasks] == ["submit_migration", "run_migration"]
    assert dag.get_task("run_migration").upstream_task_ids == {"submit_migration"}
    assert list(dag.params) == list(request_form.KEYS)
    assert {dag.params.get_param(k).schema["section"] for k in dag.params} == set(request_form.SECTIONS)
    vm = dag.params.get_param("source_vm").schema
    assert vm["examples"] == [f"default/{demo_store.vm_name}"]
    assert vm["values_display"] == {f"default/{demo_store.vm_name}": f"default/{demo_store.vm_name} "
                                                                    f"(on default/req-kvm-source, libvirt)"}
    assert dag.params.get_param("target_provider").schema["examples"] == ["default/req-kvm-source",
                                                                          "default/req-kvm-target"]


def test_a_worker_parse_reads_no_store_and_accepts_the_same(demo_store, monkeypatch):
    """A worker running one of its tasks parses the file with the parsing context set: no proposals (the store
    is not read), the same schemas otherwise."""
    full = _bag().dags["vmmigration_request"]
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "vmmigration_request")
    worker = _bag().dags["vmmigration_request"]
    assert "examples" not in worker.params.get_param("source_vm").schema

    def strip(schema):
        return {k: v for k, v in schema.items() if k not in ("examples", "values_display")}

    for key in request_form.KEYS:
        assert strip(worker.params.get_param(key).schema) == strip(full.params.get_param(key).schema), key


def test_the_params_accept_the_guides_example(demo_store):
    params = _serialized(_bag().dags["vmmigration_request"]).params
    resolved = params.deep_merge(QUICK_START).validate()
    assert resolved["storage_type"] == "s3" and resolved["max_backoff_duration"] == "30m"
    doc = request_form.build_document(resolved)
    assert doc["spec"]["storage"]["credentialsSecretRef"] == {"name": "s3-credentials", "namespace": "default"}


@pytest.mark.parametrize(("conf", "param"), [
    ({**QUICK_START, "target_name": "Migrated_VM"}, "target_name"),
    ({**QUICK_START, "storage_type": "ftp"}, "storage_type"),
    ({**QUICK_START, "migration_name": "a" * 254}, "migration_name"),
    ({**QUICK_START, "cpu": 0}, "cpu"),
    ({**QUICK_START, "backoff_duration": "five minutes"}, "backoff_duration"),
    ({**QUICK_START, "target_disk_format": "vhdx"}, "target_disk_format"),
    ({k: v for k, v in QUICK_START.items() if k != "source_vm"}, "source_vm"),
])
def test_the_params_refuse_bad_input_naming_the_param(demo_store, conf, param):
    from airflow.exceptions import ParamValidationError

    params = _serialized(_bag().dags["vmmigration_request"]).params
    with pytest.raises(ParamValidationError, match=f"Invalid input for param {param}:"):
        params.deep_merge(conf).validate()
