"""include/inventory.py: sourceName -> VirtualMachine -> Provider -> Secret, errors naming the spec field."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest

from include.inventory import (
    BundleInventory,
    Credentials,
    ProviderInfo,
    Resolved,
    decode_secret,
    resolve,
)
from include.spec import API_VERSION, SpecValidationError, parse_vmmigration
from include.store import index_documents

ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PROVIDER_PASSWORD = "hunter2-provider-password"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def migration_doc(**spec: Any) -> dict[str, Any]:
    body = {
        "sourceName": "ubuntu-server",
        "sourceNamespace": "kvm-vms",
        "targetProviderRef": {"name": "kvm-target"},
        "targetName": "ubuntu-server-migrated",
        "storage": {"type": "s3", "bucket": "migrations", "credentialsSecretRef": {"name": "s3-creds"}},
    }
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": "VMMigration", "metadata": {"name": "kvm-move", "namespace": "default"},
            "spec": body}


def bundle() -> list[dict[str, Any]]:
    return [
        {"apiVersion": API_VERSION, "kind": "VirtualMachine",
         "metadata": {"name": "ubuntu-server", "namespace": "kvm-vms"},
         "spec": {"providerRef": {"name": "kvm-source", "namespace": "infra"}}, "status": {"id": "ubuntu-2204-domain"}},
        {"apiVersion": API_VERSION, "kind": "Provider", "metadata": {"name": "kvm-source", "namespace": "infra"},
         "spec": {"type": "libvirt", "endpoint": "qemu+ssh://root@kvm1/system",
                  "credentialSecretRef": {"name": "kvm-creds"}, "insecureSkipVerify": True,
                  "defaults": {"pool": "default"}}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kvm-creds", "namespace": "infra"},
         "stringData": {"username": "root", "password": PROVIDER_PASSWORD}},
        {"apiVersion": API_VERSION, "kind": "Provider", "metadata": {"name": "kvm-target", "namespace": "default"},
         "spec": {"type": "libvirt", "endpoint": "qemu:///system"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": "default"},
         "data": {"accessKey": b64(ACCESS_KEY), "secretKey": b64(SECRET_KEY)}},
        *grants(),
    ]


def grants() -> list[dict[str, Any]]:
    """kvm-vms lets migrations of default use its VMs; infra lets them, and kvm-vms' VMs, use its Providers."""
    return [
        {"apiVersion": API_VERSION, "kind": "ReferenceGrant", "metadata": {"name": "vms", "namespace": "kvm-vms"},
         "spec": {"from": [{"kind": "VMMigration", "namespace": "default"}],
                  "to": [{"kind": "VirtualMachine"}, {"kind": "Provider", "name": "local-kvm"}]}},
        {"apiVersion": API_VERSION, "kind": "ReferenceGrant",
         "metadata": {"name": "providers", "namespace": "infra"},
         "spec": {"from": [{"kind": "VMMigration", "namespace": "default"},
                           {"kind": "VirtualMachine", "namespace": "kvm-vms"}],
                  "to": [{"kind": "Provider", "name": "kvm-source"}]}},
    ]


def inventory_of(docs: list[dict[str, Any]]) -> BundleInventory:
    return BundleInventory(index_documents([(Path("bundle.yaml"), docs)]).objects)


def without(docs: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    return [d for d in docs if not (d["kind"] == kind and d["metadata"]["name"] == name)]


def edited(docs: list[dict[str, Any]], kind: str, name: str, **spec: Any) -> list[dict[str, Any]]:
    docs = copy.deepcopy(docs)
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            doc["spec"].update(spec)
    return docs


def resolve_errors(docs: list[dict[str, Any]], **spec: Any) -> list[str]:
    with pytest.raises(SpecValidationError) as info:
        resolve(parse_vmmigration(migration_doc(**spec)), inventory_of(docs))
    return [str(e) for e in info.value.errors]


# -- happy path ---------------------------------------------------------------------------------------------

def test_resolve_follows_every_reference():
    migration = parse_vmmigration(migration_doc())
    resolved = resolve(migration, inventory_of(bundle()))
    assert isinstance(resolved, Resolved)
    assert resolved.migration is migration
    source = resolved.source
    assert (source.name, source.namespace, source.provider_vm_id) == ("ubuntu-server", "kvm-vms", "ubuntu-2204-domain")
    provider = source.provider
    assert (provider.name, provider.namespace, provider.type, provider.endpoint, provider.ref) == (
        "kvm-source", "infra", "libvirt", "qemu+ssh://root@kvm1/system", "infra/kvm-source")
    assert provider.insecure_skip_verify is True
    assert provider.defaults == {"pool": "default"}
    # the Provider's Secret (namespace defaults to the Provider's)
    assert dict(provider.credentials) == {"username": "root", "password": PROVIDER_PASSWORD}
    assert provider.credentials.source == "infra/kvm-creds"
    target = resolved.target
    assert (target.ref, target.type, target.endpoint, target.credentials) == (
        "default/kvm-target", "libvirt", "qemu:///system", None)
    assert target.insecure_skip_verify is False and target.defaults == {}
    assert dict(resolved.storage_credentials) == {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}


def test_vm_without_status_id_uses_the_source_name():
    docs = copy.deepcopy(bundle())
    del docs[0]["status"]
    resolved = resolve(parse_vmmigration(migration_doc()), inventory_of(docs))
    assert resolved.source.provider_vm_id == "ubuntu-server"


def test_vm_provider_ref_namespace_defaults_to_the_source_namespace():
    docs = copy.deepcopy(bundle())
    docs[0]["spec"]["providerRef"] = {"name": "local-kvm"}
    docs.append({"kind": "Provider", "metadata": {"name": "local-kvm", "namespace": "kvm-vms"},
                 "spec": {"type": "libvirt", "endpoint": "qemu:///session"}})
    resolved = resolve(parse_vmmigration(migration_doc()), inventory_of(docs))
    assert resolved.source.provider.ref == "kvm-vms/local-kvm"


def test_storage_without_secret_ref_has_no_credentials():
    resolved = resolve(parse_vmmigration(migration_doc(storage={"type": "nfs", "path": "/mnt/share"})),
                       inventory_of(without(bundle(), "Secret", "s3-creds")))
    assert resolved.storage_credentials is None


def test_bundle_inventory_get():
    inventory = inventory_of(bundle())
    assert inventory.get("Provider", "default", "kvm-target")["spec"]["type"] == "libvirt"
    assert inventory.get("Provider", "infra", "kvm-target") is None
    assert inventory.get("Secret", "default", "kvm-target") is None


# -- errors name the field ----------------------------------------------------------------------------------------

def test_missing_vm_names_source_name():
    assert resolve_errors(without(bundle(), "VirtualMachine", "ubuntu-server")) == [
        "spec.sourceName: VirtualMachine kvm-vms/ubuntu-server not found"]


def test_vm_in_another_namespace_needs_its_grant():
    # whether the VM exists there or not is not told to a namespace without the grant
    assert resolve_errors(bundle(), sourceNamespace="elsewhere") == [
        "spec.sourceNamespace: VirtualMachine elsewhere/ubuntu-server is in another namespace, and namespace "
        "elsewhere does not grant VMMigrations of namespace default access to it: add a ReferenceGrant in elsewhere "
        "with from {kind: VMMigration, namespace: default} and to {kind: VirtualMachine} (docs/security.md)"]


def test_vm_without_provider_ref():
    docs = copy.deepcopy(bundle())
    docs[0]["spec"] = {}
    assert resolve_errors(docs) == [
        "spec.sourceName: VirtualMachine kvm-vms/ubuntu-server has no spec.providerRef.name"]


def test_missing_source_provider_names_source_name():
    assert resolve_errors(without(bundle(), "Provider", "kvm-source")) == [
        "spec.sourceName: Provider infra/kvm-source not found"]


def test_missing_target_provider_names_target_provider_ref():
    assert resolve_errors(without(bundle(), "Provider", "kvm-target")) == [
        "spec.targetProviderRef: Provider default/kvm-target not found"]


def test_missing_storage_secret_names_credentials_secret_ref():
    assert resolve_errors(without(bundle(), "Secret", "s3-creds")) == [
        "spec.storage.credentialsSecretRef: Secret default/s3-creds not found"]


def test_missing_provider_secret():
    assert resolve_errors(without(bundle(), "Secret", "kvm-creds")) == [
        "spec.sourceName: Secret infra/kvm-creds named by Provider infra/kvm-source (spec.credentialSecretRef) "
        "not found"]


def test_all_resolution_errors_are_collected():
    docs = without(without(without(bundle(), "VirtualMachine", "ubuntu-server"), "Provider", "kvm-target"),
                   "Secret", "s3-creds")
    with pytest.raises(SpecValidationError) as info:
        resolve(parse_vmmigration(migration_doc()), inventory_of(docs))
    assert [e.path for e in info.value.errors] == ["spec.sourceName", "spec.targetProviderRef",
                                                   "spec.storage.credentialsSecretRef"]


@pytest.mark.parametrize("ptype", ["firecracker"])
def test_unsupported_provider_type(ptype):
    assert resolve_errors(edited(bundle(), "Provider", "kvm-target", type=ptype)) == [
        f"spec.targetProviderRef: Provider default/kvm-target is of type {ptype}, which this engine does not support "
        f"yet (supported: libvirt, vsphere, proxmox)"]


def test_unknown_provider_type_and_missing_endpoint_are_both_reported():
    docs = edited(bundle(), "Provider", "kvm-source", type="hyperv", endpoint="")
    assert resolve_errors(docs) == [
        "spec.sourceName: Provider infra/kvm-source has type 'hyperv', expected one of libvirt, vsphere, proxmox, "
        "qemu, firecracker",
        "spec.sourceName: Provider infra/kvm-source has no spec.endpoint",
    ]


def test_provider_without_spec():
    docs = copy.deepcopy(bundle())
    del docs[3]["spec"]
    assert resolve_errors(docs) == [
        "spec.targetProviderRef: Provider default/kvm-target has type None, expected one of libvirt, vsphere, "
        "proxmox, qemu, firecracker",
        "spec.targetProviderRef: Provider default/kvm-target has no spec.endpoint",
    ]


# -- Secrets -----------------------------------------------------------------------------------------------------

def test_decode_secret_merges_data_and_string_data():
    doc = {"kind": "Secret", "metadata": {"name": "minio-creds", "namespace": "storage"},
           "data": {"accessKey": b64("minioadmin"), "endpoint": b64("http://old:9000"), "utf8": b64("clé")},
           "stringData": {"secretKey": "minioadmin", "endpoint": "http://minio.example.com:9000", "port": 9000}}
    creds = decode_secret(doc, "spec.storage.credentialsSecretRef")
    # stringData wins over data for the same key, as the API server does; values are text
    assert dict(creds) == {"accessKey": "minioadmin", "endpoint": "http://minio.example.com:9000", "utf8": "clé",
                           "secretKey": "minioadmin", "port": "9000"}
    assert creds.source == "storage/minio-creds"


def test_decode_secret_without_namespace_or_data():
    creds = decode_secret({"kind": "Secret", "metadata": {"name": "empty"}}, "x")
    assert len(creds) == 0
    assert creds.source == "default/empty"


@pytest.mark.parametrize("raw", ["not base64!", b64("x")[:-1] + "*", base64.b64encode(b"\xff\xfe").decode()])
def test_bad_secret_data_names_the_field_and_key(raw):
    docs = copy.deepcopy(bundle())
    docs[4]["data"]["secretKey"] = raw
    assert resolve_errors(docs) == [
        "spec.storage.credentialsSecretRef: Secret key 'secretKey' is not valid base64 text"]


def test_credentials_mapping_and_first():
    creds = Credentials({"accessKey": "a", "token": "", "secretKey": "s"}, "default/c")
    assert creds["accessKey"] == "a"
    assert sorted(creds) == ["accessKey", "secretKey", "token"]
    assert len(creds) == 3
    assert creds.first("token", "secretKey") == "s"  # empty values are skipped
    assert creds.first("nothing") is None
    with pytest.raises(KeyError):
        creds["missing"]


def test_credentials_never_show_their_values():
    creds = Credentials({"secretKey": SECRET_KEY}, "default/s3-creds")
    assert repr(creds) == "Credentials(default/s3-creds, keys=['secretKey'])"
    assert str(creds) == repr(creds)
    assert f"{creds}" == repr(creds)


def test_resolved_never_shows_secret_values():
    resolved = resolve(parse_vmmigration(migration_doc()), inventory_of(bundle()))
    for text in (repr(resolved), str(resolved), repr(resolved.source), repr(resolved.target),
                 repr(resolved.source.provider), f"{resolved}"):
        for secret in (ACCESS_KEY, SECRET_KEY, PROVIDER_PASSWORD, b64(SECRET_KEY)):
            assert secret not in text
    # ... while the values are there for the code that needs them
    assert resolved.storage_credentials["secretKey"] == SECRET_KEY
    assert resolved.source.provider.credentials["password"] == PROVIDER_PASSWORD
    assert "kvm-source" in repr(resolved)  # the repr is still useful


def test_provider_info_repr_hides_credentials():
    info = ProviderInfo(name="p", namespace="n", type="libvirt", endpoint="qemu:///system",
                        credentials=Credentials({"password": PROVIDER_PASSWORD}, "n/s"))
    assert PROVIDER_PASSWORD not in repr(info)
    assert "credentials" not in repr(info)


@pytest.mark.parametrize(("kind", "name", "field", "value"), [
    ("Provider", "kvm-target", "spec", ["a", "list"]),
    ("VirtualMachine", "ubuntu-server", "spec", "text"),
    ("VirtualMachine", "ubuntu-server", "status", 5),
    ("Secret", "s3-creds", "data", ["x"]),
])
def test_objects_of_the_wrong_shape_are_errors_not_tracebacks(kind, name, field, value):
    docs = copy.deepcopy(bundle())
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            doc[field] = value
    try:
        resolve(parse_vmmigration(migration_doc()), inventory_of(docs))
    except SpecValidationError as err:
        assert all(e.path.startswith("spec.") for e in err.errors)
