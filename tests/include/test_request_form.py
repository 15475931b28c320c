"""include/request_form.py: the store's choices, the form's values as a VMMigration (the guide's defaults, every
field), and the params' JSON schemas refusing what the spec refuses, each naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from include import request_form
from include.demo import DemoWorld, store_documents, write_store
from include.inventory import BundleInventory
from include.spec import FieldError, parse_vmmigration
from include.store import SpecStore
from include.submit import check

QUICK_START = """
apiVersion: infra.virtrigaud.io/v1beta1
kind: VMMigration
metadata:
  name: migrate-vm-to-vsphere
  namespace: default
spec:
  sourceName: my-libvirt-vm
  sourceNamespace: default
  targetProviderRef:
    name: vsphere-prod
    namespace: default
  targetName: migrated-vm
  storage:
    type: s3
    bucket: vm-migrations
    endpoint: s3.amazonaws.com
    region: us-east-1
    credentialsSecretRef:
      name: s3-credentials
      namespace: default
  cleanupPolicy:
    deleteIntermediate: true
    deleteSnapshot: true
    deleteSource: false
  retryPolicy:
    maxAttempts: 3
    backoffDuration: 5m
"""
#: the Quick Start as the form's fields
QUICK_START_FORM = {
    "migration_name": "migrate-vm-to-vsphere", "namespace": "default", "source_vm": "default/my-libvirt-vm",
    "target_provider": "default/vsphere-prod", "target_name": "migrated-vm", "storage_type": "s3",
    "storage_bucket": "vm-migrations", "storage_endpoint": "s3.amazonaws.com", "storage_region": "us-east-1",
    "storage_credentials_secret": "s3-credentials", "delete_intermediate": True, "delete_snapshot": True,
    "delete_source": False, "max_attempts": 3, "backoff_duration": "5m",
}
MINIMAL = {"migration_name": "web-01", "source_vm": "web-01", "target_provider": "kvm-target",
           "storage_type": "nfs", "storage_path": "/mnt/migrations"}


def _index(tmp_path: Path):
    world = DemoWorld(uri="qemu:///system", prefix="form", root=tmp_path)
    docs = store_documents(world, name="demo")
    docs.append({"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "Provider",
                 "metadata": {"name": "vcenter", "namespace": "vmware"},
                 "spec": {"type": "vsphere", "endpoint": "https://vc.example.com/sdk"}})
    docs.append({"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VirtualMachine",
                 "metadata": {"name": "orphan", "namespace": "vmware"}, "spec": {}})
    write_store(tmp_path / "store", "demo.yaml", docs)
    return world, SpecStore(tmp_path / "store").index()


def test_choices_list_vms_with_their_provider_and_providers_with_their_type(tmp_path):
    world, index = _index(tmp_path)
    found = request_form.choices(index)
    assert [(v.ref, v.provider, v.provider_type) for v in found.vms] == [
        (f"default/{world.vm_name}", "default/form-kvm-source", "libvirt"), ("vmware/orphan", None, None)]
    assert [(p.ref, p.type) for p in found.providers] == [
        ("default/form-kvm-source", "libvirt"), ("default/form-kvm-target", "libvirt"), ("vmware/vcenter", "vsphere")]
    assert found.namespaces == ("default", "vmware")
    assert found.secrets == ("form-libvirt-creds",)
    schemas = request_form.param_schemas(found)
    assert schemas["source_vm"]["examples"] == [f"default/{world.vm_name}", "vmware/orphan"]
    assert schemas["source_vm"]["values_display"][f"default/{world.vm_name}"] == (
        f"default/{world.vm_name} (on default/form-kvm-source, libvirt)")
    assert schemas["target_provider"]["values_display"]["vmware/vcenter"] == "vmware/vcenter (vsphere)"
    # proposals, never an enum: a VM added after the last parse is still accepted by the form
    assert "enum" not in schemas["source_vm"] and "enum" not in schemas["target_provider"]


def test_the_quick_start_from_the_form_is_the_guides_quick_start():
    built = request_form.build_document(QUICK_START_FORM)
    assert parse_vmmigration(built).to_dict() == parse_vmmigration(yaml.safe_load(QUICK_START)).to_dict()


def test_defaults_are_the_guides():
    doc = request_form.build_document(MINIMAL)
    assert doc["metadata"] == {"name": "web-01", "namespace": "default"}
    assert doc["spec"] == {
        "sourceName": "web-01", "sourceNamespace": "default",
        "targetProviderRef": {"name": "kvm-target", "namespace": "default"},
        "storage": {"type": "nfs", "path": "/mnt/migrations"},
        "cleanupPolicy": {"deleteIntermediate": True, "deleteSnapshot": True, "deleteSource": False},
        "retryPolicy": {"maxAttempts": 3, "backoffDuration": "5m", "maxBackoffDuration": "30m"},
    }
    spec = parse_vmmigration(doc).spec
    assert spec.targetName == "web-01"  # the guide: the source VM's name
    assert spec.targetDiskFormat is None and spec.targetResourceHints.cpu is None
    # what the params say the defaults are is what the document gets
    schemas = request_form.param_schemas()
    assert {k: schemas[k]["default"] for k in ("namespace", "delete_intermediate", "delete_snapshot",
                                               "delete_source", "max_attempts", "backoff_duration",
                                               "max_backoff_duration", "network_hints")} == {
        "namespace": "default", "delete_intermediate": True, "delete_snapshot": True, "delete_source": False,
        "max_attempts": 3, "backoff_duration": "5m", "max_backoff_duration": "30m", "network_hints": []}
    assert {k for k, s in schemas.items() if "default" not in s} == {
        "migration_name", "source_vm", "target_provider", "storage_type"}


def test_every_field_lands_where_the_guide_puts_it():
    values = {
        "migration_name": "db-01", "namespace": "team-a", "source_vm": "proxmox-vms/database-server",
        "labels": {"wave": "1"}, "target_provider": "infra/kvm-host1", "target_name": "database-server-kvm",
        "target_disk_format": "qcow2", "target_storage_hint": "default", "storage_type": "http",
        "storage_endpoint": "https://fileserver.example.com/exports", "storage_credentials_secret": "fileserver-token",
        "network_hints": [{"name": "eth0", "bridge": "virbr0"}, {"name": "eth1", "network": "VM Network"}],
        "cpu": 4, "memory_mb": 8192, "disk_gb": 100, "delete_intermediate": False, "delete_snapshot": False,
        "delete_source": True, "max_attempts": 5, "backoff_duration": "10m", "max_backoff_duration": "1h",
    }
    # with the Quick Start (s3: bucket, region) and MINIMAL (nfs: path), every field of the form is covered
    assert set(values) | set(QUICK_START_FORM) | set(MINIMAL) == set(request_form.KEYS)
    doc = request_form.build_document(values)
    assert doc == {
        "apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
        "metadata": {"name": "db-01", "namespace": "team-a", "labels": {"wave": "1"}},
        "spec": {
            "sourceName": "database-server", "sourceNamespace": "proxmox-vms",
            "targetProviderRef": {"name": "kvm-host1", "namespace": "infra"},
            "targetName": "database-server-kvm", "targetStorageHint": "default", "targetDiskFormat": "qcow2",
            "storage": {"type": "http", "endpoint": "https://fileserver.example.com/exports",
                        "credentialsSecretRef": {"name": "fileserver-token", "namespace": "team-a"}},
            "targetNetworkHints": [{"name": "eth0", "bridge": "virbr0"}, {"name": "eth1", "network": "VM Network"}],
            "targetResourceHints": {"cpu": 4, "memory": 8192, "disk": 100},
            "cleanupPolicy": {"deleteIntermediate": False, "deleteSnapshot": False, "deleteSource": True},
            "retryPolicy": {"maxAttempts": 5, "backoffDuration": "10m", "maxBackoffDuration": "1h"},
        },
    }
    assert check(doc, None) == []  # and the spec's own rules accept it
    for key, value in values.items():  # every value passes its own param's schema
        assert request_form.params()[key].resolve(value) == value


def test_blank_optional_fields_are_left_out():
    doc = request_form.build_document({**MINIMAL, "target_name": "", "storage_endpoint": "  ", "cpu": None,
                                       "network_hints": None, "labels": None})
    assert "targetName" not in doc["spec"] and "targetResourceHints" not in doc["spec"]
    assert doc["spec"]["storage"] == {"type": "nfs", "path": "/mnt/migrations"}


@pytest.mark.parametrize(("key", "value"), [
    ("migration_name", "Web_01"), ("migration_name", "web/01"), ("migration_name", "n" * 254),
    ("migration_name", None), ("namespace", "team.a"), ("namespace", "s" * 64), ("source_vm", "a/b/c"),
    ("source_vm", "My VM"), ("target_provider", ""), ("target_name", "Bad Name"), ("target_name", "-x"),
    ("target_disk_format", "vhd"), ("target_storage_hint", "two  spaces"), ("storage_type", "ftp"),
    ("storage_type", None), ("storage_bucket", "A_B"), ("storage_endpoint", "has space"),
    ("storage_path", "relative/path"), ("storage_credentials_secret", "ns/name"),
    ("network_hints", [{"name": "eth0"}]), ("network_hints", [{"name": "eth0", "bridge": "br0", "network": "n"}]),
    ("network_hints", [{"name": "eth0", "bridge": "br0", "vlan": 3}]), ("network_hints", {"name": "eth0"}),
    ("cpu", 0), ("cpu", 4097), ("cpu", "4"), ("memory_mb", 15), ("disk_gb", 0), ("delete_source", "yes"),
    ("max_attempts", -1), ("max_attempts", 101), ("backoff_duration", "5 minutes"), ("backoff_duration", ""),
    ("max_backoff_duration", "PT5M"), ("labels", {"Bad Key!": "x"}), ("labels", {"a": 1}),
])
def test_the_schema_refuses_bad_input_naming_the_param(key, value):
    from airflow.sdk import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=f"Invalid input for param {key}:"):
        merged = ParamsDict(request_form.params())
        for k, v in {**MINIMAL, key: value}.items():
            merged.get_param(k).value = v
        merged.validate()


def test_the_schema_accepts_what_the_spec_accepts_at_its_limits():
    from airflow.sdk import ParamsDict

    values = {**MINIMAL, "migration_name": "n" * 253, "namespace": "s" * 63, "source_vm": f"{'s' * 63}/{'v' * 253}",
              "target_storage_hint": "datastore1 (1)", "cpu": 4096, "max_attempts": 0, "backoff_duration": "1m30s",
              "network_hints": [{"name": "eth0", "network": "VM Network"}]}
    form = ParamsDict(request_form.params())
    for k, v in values.items():
        form.get_param(k).value = v
    assert form.validate()["migration_name"] == "n" * 253
    assert check(request_form.build_document(values), None) == []


def test_every_param_has_a_title_a_description_and_a_known_section():
    schemas = request_form.param_schemas()
    assert list(schemas) == list(request_form.KEYS)
    for key, s in schemas.items():
        assert s["title"] and s["description"] and s["section"] in request_form.SECTIONS, key
    assert [s["section"] for s in schemas.values()] == sorted(
        (s["section"] for s in schemas.values()), key=request_form.SECTIONS.index)  # one block per section


def test_build_document_refuses_unknown_and_missing_fields_naming_them():
    with pytest.raises(request_form.FormError) as err:
        request_form.build_document({**MINIMAL, "taget_name": "x", "source_vm": " ", "migration_name": 3})
    assert [str(e) for e in err.value.errors] == [
        "params.taget_name: not a field of the form (did you mean 'target_name'?)",
        "params.migration_name: must be a string, got 3",
        "params.source_vm: required (spec.sourceName)",
    ]


def test_cross_field_rules_name_the_spec_field_and_the_form_field():
    doc = request_form.build_document({**MINIMAL, "storage_type": "s3", "storage_path": "/mnt/x",
                                       "backoff_duration": "1h", "max_backoff_duration": "5m"})
    lines = request_form.describe(check(doc, None))
    assert lines == [
        "spec.storage.bucket (form field storage_bucket): required when type is s3",
        "spec.storage.credentialsSecretRef (form field storage_credentials_secret): required when type is s3",
        "spec.storage.path (form field storage_path): not used when type is s3",
        "spec.retryPolicy.maxBackoffDuration (form field max_backoff_duration): 5m is shorter than "
        "backoffDuration 1h",
    ]


def test_an_unknown_vm_is_found_by_the_inventory_check(tmp_path):
    world, index = _index(tmp_path)
    good = {**MINIMAL, "source_vm": world.vm_name, "target_provider": "form-kvm-target",
            "storage_path": str(world.share)}
    assert check(request_form.build_document(good), BundleInventory(index.objects)) == []
    errors = check(request_form.build_document({**good, "source_vm": "ghost"}), BundleInventory(index.objects))
    assert request_form.describe(errors) == [
        "spec.sourceName (form field source_vm): VirtualMachine default/ghost not found"]


def test_form_field_for_maps_nested_spec_paths():
    assert request_form.form_field_for("spec.targetNetworkHints[0].bridge") == "network_hints"
    assert request_form.form_field_for("spec.targetProviderRef.namespace") == "target_provider"
    assert request_form.form_field_for("spec.sourceNamespace") == "source_vm"
    assert request_form.form_field_for("spec.storage.credentialsSecretRef.namespace") == "storage_credentials_secret"
    assert request_form.form_field_for("metadata.name") == "migration_name"
    assert request_form.describe([FieldError("params.x", "boom")]) == ["params.x: boom"]


def test_no_airflow_import_at_module_level():
    import subprocess
    import sys

    code = "import sys, include.request_form; print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_submit_writes_the_migration_into_the_store_once(tmp_path):
    world, _ = _index(tmp_path)
    store = SpecStore(tmp_path / "store")
    values = {**MINIMAL, "migration_name": "from-form", "source_vm": world.vm_name,
              "target_provider": "form-kvm-target", "storage_path": str(world.share)}
    done = request_form.submit(values, store, via="a test")
    assert (done.key, done.where, done.written, done.dag_id) == ("default/from-form", "store", True,
                                                                 "vmmigration__default__from-form")
    entry = store.entry("default", "from-form")
    assert entry.path.name == "submitted--default.from-form.yaml" and entry.error is None
    assert entry.migration.spec.sourceName == world.vm_name
    assert request_form.submit(values, store, via="a test").written is False  # the same form again: a no-op


def test_submit_refuses_an_unknown_vm_and_writes_nothing(tmp_path):
    world, _ = _index(tmp_path)
    store = SpecStore(tmp_path / "store")
    before = sorted(p.name for p in store.root.iterdir())
    values = {**MINIMAL, "migration_name": "ghost", "source_vm": "ghost", "target_provider": "form-kvm-target",
              "storage_path": str(world.share)}
    with pytest.raises(request_form.SpecValidationError) as err:
        request_form.submit(values, store, via="a test")
    assert request_form.refusal(values, err.value) == (
        "VMMigration default/ghost refused (nothing was written):\n"
        "- spec.sourceName (form field source_vm): VirtualMachine default/ghost not found")
    with pytest.raises(request_form.FormError):
        request_form.submit({**values, "storage_typ": "nfs"}, store, via="a test")
    assert sorted(p.name for p in store.root.iterdir()) == before
