"""include/spec.py: the user guide's VMMigration contract, its defaults, and its field-path errors."""

from __future__ import annotations

import concurrent.futures
import copy
import multiprocessing
import pickle
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from include.spec import (
    API_VERSION,
    KIND,
    CleanupPolicy,
    FieldError,
    NetworkHint,
    ObjectRef,
    ResourceHints,
    RetryPolicy,
    SpecValidationError,
    StorageSpec,
    format_duration,
    parse_duration,
    parse_vmmigration,
)

# -- the guide's examples, verbatim -------------------------------------------------------------------

QUICK_START = """
apiVersion: infra.virtrigaud.io/v1beta1
kind: VMMigration
metadata:
  name: migrate-vm-to-vsphere
  namespace: default
spec:
  sourceName: my-libvirt-vm          # Source VM name
  sourceNamespace: default            # Source VM namespace
  targetProviderRef:
    name: vsphere-prod                # Target provider
    namespace: default
  targetName: migrated-vm             # New VM name
  storage:
    type: s3
    bucket: vm-migrations
    endpoint: s3.amazonaws.com
    region: us-east-1
    credentialsSecretRef:
      name: s3-credentials
      namespace: default
  cleanupPolicy:
    deleteIntermediate: true          # Clean up S3 after migration
    deleteSnapshot: true               # Delete source snapshot
    deleteSource: false                # Keep source VM
  retryPolicy:
    maxAttempts: 3
    backoffDuration: 5m
"""

SCENARIO_1 = """
apiVersion: infra.virtrigaud.io/v1beta1
kind: VMMigration
metadata:
  name: kvm-to-vsphere
spec:
  sourceName: ubuntu-server
  sourceNamespace: kvm-vms
  targetProviderRef:
    name: vcenter-prod
    namespace: default
  targetName: ubuntu-server-vcenter
  targetStorageHint: datastore1      # vSphere datastore
  storage:
    type: s3
    bucket: migrations
    region: us-east-1
    credentialsSecretRef:
      name: s3-creds
  cleanupPolicy:
    deleteIntermediate: true
    deleteSnapshot: true
    deleteSource: false               # Keep source for rollback
"""

SCENARIO_2 = """
apiVersion: infra.virtrigaud.io/v1beta1
kind: VMMigration
metadata:
  name: vsphere-to-proxmox
spec:
  sourceName: windows-server
  sourceNamespace: vmware-vms
  targetProviderRef:
    name: proxmox-cluster
    namespace: default
  targetName: windows-server-pve
  targetStorageHint: local-lvm       # Proxmox storage
  storage:
    type: nfs
    path: /mnt/migrations
    endpoint: nfs.local
  cleanupPolicy:
    deleteIntermediate: true
    deleteSnapshot: true
    deleteSource: false
"""

SCENARIO_3 = """
apiVersion: infra.virtrigaud.io/v1beta1
kind: VMMigration
metadata:
  name: proxmox-to-kvm
spec:
  sourceName: database-server
  sourceNamespace: proxmox-vms
  targetProviderRef:
    name: kvm-host1
    namespace: default
  targetName: database-server-kvm
  targetStorageHint: default         # Libvirt storage pool
  storage:
    type: http
    endpoint: https://fileserver.example.com/exports
    credentialsSecretRef:
      name: fileserver-token
  cleanupPolicy:
    deleteIntermediate: true
    deleteSnapshot: true
    deleteSource: false
  retryPolicy:
    maxAttempts: 5
    backoffDuration: 10m
"""

# The "Storage Backend Configuration" snippets of the guide.
STORAGE_SNIPPETS = {
    "aws-s3": ("""
storage:
  type: s3
  bucket: my-bucket
  region: us-east-1
  credentialsSecretRef:
    name: aws-s3-creds
    namespace: default
""", StorageSpec(type="s3", bucket="my-bucket", region="us-east-1",
                 credentialsSecretRef=ObjectRef("aws-s3-creds", "default"))),
    "minio": ("""
storage:
  type: s3
  bucket: vm-migrations
  endpoint: minio.example.com:9000
  region: us-east-1
  credentialsSecretRef:
    name: minio-creds
    namespace: default
""", StorageSpec(type="s3", bucket="vm-migrations", endpoint="minio.example.com:9000", region="us-east-1",
                 credentialsSecretRef=ObjectRef("minio-creds", "default"))),
    "http": ("""
storage:
  type: http
  endpoint: https://storage.example.com/vm-exports
  credentialsSecretRef:
    name: http-creds
    namespace: default
""", StorageSpec(type="http", endpoint="https://storage.example.com/vm-exports",
                 credentialsSecretRef=ObjectRef("http-creds", "default"))),
    "nfs": ("""
storage:
  type: nfs
  path: /vm-migrations
  endpoint: nfs.example.com
""", StorageSpec(type="nfs", path="/vm-migrations", endpoint="nfs.example.com")),
}


def minimal(**spec_overrides: Any) -> dict[str, Any]:
    """The smallest valid VMMigration (NFS storage needs no Secret), with ``spec`` keys overridden."""
    doc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "mig", "namespace": "team-a"},
        "spec": {
            "sourceName": "src-vm",
            "targetProviderRef": {"name": "kvm-target"},
            "storage": {"type": "nfs", "path": "/mnt/share"},
        },
    }
    doc["spec"].update(spec_overrides)
    return doc


def errors_of(doc: Any) -> list[str]:
    with pytest.raises(SpecValidationError) as info:
        parse_vmmigration(doc)
    return [str(e) for e in info.value.errors]


# -- the guide's examples parse ------------------------------------------------------------------------

def test_quick_start_parses_with_every_field():
    mig = parse_vmmigration(yaml.safe_load(QUICK_START))
    spec = mig.spec
    assert (mig.name, mig.namespace, mig.key) == ("migrate-vm-to-vsphere", "default", "default/migrate-vm-to-vsphere")
    assert spec.sourceName == "my-libvirt-vm"
    assert spec.sourceNamespace == "default"
    assert spec.targetProviderRef == ObjectRef("vsphere-prod", "default")
    assert spec.targetName == "migrated-vm"
    assert spec.storage == StorageSpec(type="s3", bucket="vm-migrations", endpoint="s3.amazonaws.com",
                                       region="us-east-1", credentialsSecretRef=ObjectRef("s3-credentials", "default"))
    assert spec.cleanupPolicy == CleanupPolicy(deleteIntermediate=True, deleteSnapshot=True, deleteSource=False)
    # maxBackoffDuration is not in the Quick Start: its default applies
    assert spec.retryPolicy == RetryPolicy(maxAttempts=3, backoffDuration="5m", maxBackoffDuration="30m")
    assert spec.targetDiskFormat is None
    assert spec.targetNetworkHints == ()
    assert spec.targetResourceHints == ResourceHints()


def test_scenario_1_defaults_namespaces_from_metadata():
    mig = parse_vmmigration(yaml.safe_load(SCENARIO_1))
    # no metadata.namespace: "default"; the Secret ref without a namespace takes the migration's
    assert mig.namespace == "default"
    assert mig.spec.sourceNamespace == "kvm-vms"
    assert mig.spec.targetStorageHint == "datastore1"
    assert mig.spec.storage.credentialsSecretRef == ObjectRef("s3-creds", "default")
    assert mig.spec.retryPolicy == RetryPolicy()


def test_scenario_2_nfs():
    mig = parse_vmmigration(yaml.safe_load(SCENARIO_2))
    assert mig.spec.storage == StorageSpec(type="nfs", path="/mnt/migrations", endpoint="nfs.local")
    assert mig.spec.targetStorageHint == "local-lvm"
    assert mig.spec.targetName == "windows-server-pve"


def test_scenario_3_http_and_retry_policy():
    mig = parse_vmmigration(yaml.safe_load(SCENARIO_3))
    assert mig.spec.storage.type == "http"
    assert mig.spec.storage.endpoint == "https://fileserver.example.com/exports"
    assert mig.spec.storage.region is None  # the s3 region default applies to s3 only
    assert mig.spec.retryPolicy == RetryPolicy(maxAttempts=5, backoffDuration="10m", maxBackoffDuration="30m")
    assert mig.spec.retryPolicy.backoff_seconds == 600
    assert mig.spec.retryPolicy.max_backoff_seconds == 1800


@pytest.mark.parametrize("snippet", sorted(STORAGE_SNIPPETS))
def test_guide_storage_snippets(snippet):
    text, expected = STORAGE_SNIPPETS[snippet]
    doc = minimal(**yaml.safe_load(text))
    assert parse_vmmigration(doc).spec.storage == expected


def test_guide_advanced_configuration_snippets():
    doc = minimal(
        targetName="migrated-vm",
        targetDiskFormat="raw",
        targetNetworkHints=[{"name": "eth0", "network": "VM Network"}, {"name": "eth1", "bridge": "virbr0"},
                            {"name": "eth2", "bridge": "vmbr0"}],
        targetResourceHints={"cpu": 4, "memory": 8192, "disk": 100},
        cleanupPolicy={"deleteIntermediate": True, "deleteSnapshot": True, "deleteSource": False},
        retryPolicy={"maxAttempts": 3, "backoffDuration": "5m", "maxBackoffDuration": "30m"},
    )
    spec = parse_vmmigration(doc).spec
    assert spec.targetDiskFormat == "raw"
    assert spec.targetNetworkHints == (NetworkHint("eth0", network="VM Network"), NetworkHint("eth1", bridge="virbr0"),
                                       NetworkHint("eth2", bridge="vmbr0"))
    assert spec.targetResourceHints == ResourceHints(cpu=4, memory=8192, disk=100)


def test_guide_network_snippet_with_both_network_and_bridge_is_refused():
    # The guide's snippet lists network *or* bridge; YAML keeps the last duplicate key, so taken
    # literally it sets both, which is refused with the hint's path.
    hints = yaml.safe_load("""
targetNetworkHints:
  - name: eth0
    network: "VM Network"
    bridge: virbr0
""")
    assert errors_of(minimal(**hints)) == ["spec.targetNetworkHints[0]: set either network or bridge, not both"]


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "raw"])
def test_every_guide_disk_format_is_accepted(fmt):
    assert parse_vmmigration(minimal(targetDiskFormat=fmt)).spec.targetDiskFormat == fmt


# -- defaults ------------------------------------------------------------------------------------------

def test_defaults_are_filled():
    mig = parse_vmmigration(minimal())
    spec = mig.spec
    assert spec.cleanupPolicy == CleanupPolicy(True, True, False)
    assert spec.retryPolicy == RetryPolicy(3, "5m", "30m")
    assert spec.sourceNamespace == "team-a"  # metadata.namespace
    assert spec.targetProviderRef == ObjectRef("kvm-target", "team-a")
    assert spec.targetName == "src-vm"  # sourceName
    assert spec.targetStorageHint is None
    assert mig.labels == {}


def test_partial_policies_keep_the_other_defaults():
    spec = parse_vmmigration(minimal(cleanupPolicy={"deleteSource": True},
                                     retryPolicy={"maxBackoffDuration": "1h"})).spec
    assert spec.cleanupPolicy == CleanupPolicy(deleteIntermediate=True, deleteSnapshot=True, deleteSource=True)
    assert spec.retryPolicy == RetryPolicy(maxAttempts=3, backoffDuration="5m", maxBackoffDuration="1h")


def test_metadata_namespace_defaults_to_default():
    doc = minimal()
    del doc["metadata"]["namespace"]
    mig = parse_vmmigration(doc)
    assert mig.namespace == "default"
    assert mig.spec.sourceNamespace == "default"
    assert mig.spec.targetProviderRef.namespace == "default"


def test_explicit_namespaces_win_over_metadata():
    spec = parse_vmmigration(minimal(sourceNamespace="vms", targetProviderRef={"name": "p", "namespace": "infra"},
                                     targetName="renamed")).spec
    assert (spec.sourceNamespace, spec.targetProviderRef, spec.targetName) == ("vms", ObjectRef("p", "infra"),
                                                                               "renamed")


def test_s3_region_defaults_to_us_east_1():
    doc = minimal(storage={"type": "s3", "bucket": "vm-migrations", "credentialsSecretRef": {"name": "s3"}})
    storage = parse_vmmigration(doc).spec.storage
    assert storage.region == "us-east-1"
    assert storage.credentialsSecretRef == ObjectRef("s3", "team-a")


def test_s3_explicit_region_is_kept():
    doc = minimal(storage={"type": "s3", "bucket": "vm-migrations", "region": "eu-west-3",
                           "credentialsSecretRef": {"name": "s3"}})
    assert parse_vmmigration(doc).spec.storage.region == "eu-west-3"


def test_labels_are_kept_as_strings():
    doc = minimal()
    doc["metadata"]["labels"] = {"wave": 2, "team": "infra"}
    assert parse_vmmigration(doc).labels == {"wave": "2", "team": "infra"}


def test_status_block_is_allowed_and_ignored():
    doc = minimal()
    doc["status"] = {"phase": "Ready"}
    assert parse_vmmigration(doc).name == "mig"


def test_to_dict_shows_defaults_and_round_trips():
    mig = parse_vmmigration(minimal(targetNetworkHints=[{"name": "eth0", "bridge": "virbr0"}]))
    out = mig.to_dict()
    assert out["apiVersion"] == API_VERSION and out["kind"] == KIND
    assert out["metadata"] == {"name": "mig", "namespace": "team-a", "labels": {}}
    assert out["spec"]["cleanupPolicy"] == {"deleteIntermediate": True, "deleteSnapshot": True, "deleteSource": False}
    assert out["spec"]["retryPolicy"] == {"maxAttempts": 3, "backoffDuration": "5m", "maxBackoffDuration": "30m"}
    assert out["spec"]["targetNetworkHints"] == [{"name": "eth0", "bridge": "virbr0"}]  # no network: None
    assert "bucket" not in out["spec"]["storage"]  # None values are dropped
    assert "targetDiskFormat" not in out["spec"]
    assert parse_vmmigration(out) == mig


# -- errors name their path ------------------------------------------------------------------------------

S3 = {"type": "s3", "bucket": "vm-migrations", "credentialsSecretRef": {"name": "s3"}}

PATH_ERRORS = [
    ({"storage": {"type": "s3", "credentialsSecretRef": {"name": "s3"}}},
     ["spec.storage.bucket: required when type is s3"]),
    ({"storage": {"type": "s3", "bucket": "vm-migrations"}},
     ["spec.storage.credentialsSecretRef: required when type is s3"]),
    ({"storage": {**S3, "bucket": "My_Bucket"}},
     ["spec.storage.bucket: 'My_Bucket' is not a valid S3 bucket name"]),
    ({"storage": {**S3, "path": "/mnt"}}, ["spec.storage.path: not used when type is s3"]),
    ({"storage": {"type": "nfs", "path": "/mnt", "bucket": "b"}}, ["spec.storage.bucket: not used when type is nfs"]),
    ({"storage": {"type": "nfs"}}, ["spec.storage.path: required when type is nfs"]),
    ({"storage": {"type": "nfs", "path": "mnt/share"}},
     ["spec.storage.path: 'mnt/share' must be an absolute path (the share's mount point)"]),
    ({"storage": {"type": "http"}}, ["spec.storage.endpoint: required when type is http"]),
    ({"storage": {"type": "http", "endpoint": "ftp://files.example.com"}},
     ["spec.storage.endpoint: 'ftp://files.example.com' must be an http:// or https:// URL"]),
    ({"storage": {"type": "gcs"}}, ["spec.storage.type: must be one of s3, http, nfs, got 'gcs'"]),
    ({"storage": {"type": "ftp"}},
     ["spec.storage.type: must be one of s3, http, nfs, got 'ftp' (did you mean 'http'?)"]),
    ({"storage": {"path": "/mnt"}}, ["spec.storage.type: required"]),
    ({"storage": "nfs"}, ["spec.storage: must be an object, got a string", "spec.storage.type: required"]),
    ({"storage": None}, ["spec.storage: required"]),
    ({"storage": {**S3, "credentialsSecretRef": {"namespace": "x"}}},
     ["spec.storage.credentialsSecretRef.name: required"]),
    ({"targetDiskFormat": "iso"}, ["spec.targetDiskFormat: must be one of qcow2, vmdk, raw, got 'iso'"]),
    ({"targetDiskFormat": "vhd"},
     ["spec.targetDiskFormat: must be one of qcow2, vmdk, raw, got 'vhd' (did you mean 'vmdk'?)"]),
    ({"targetDiskFormat": "qcow"},
     ["spec.targetDiskFormat: must be one of qcow2, vmdk, raw, got 'qcow' (did you mean 'qcow2'?)"]),
    ({"targetDiskFormat": 2}, ["spec.targetDiskFormat: must be a string, got an integer"]),
    ({"sourceName": None}, ["spec.sourceName: required"]),
    ({"sourceName": ""}, ["spec.sourceName: required"]),
    ({"sourceName": "My_VM"},
     ["spec.sourceName: 'My_VM' is not a valid name (lowercase letters, digits, '-' and '.')"]),
    ({"sourceNamespace": "Bad NS"},
     ["spec.sourceNamespace: 'Bad NS' is not a valid namespace (lowercase letters, digits and '-')"]),
    ({"targetName": "-vm"}, ["spec.targetName: '-vm' is not a valid name (lowercase letters, digits, '-' and '.')"]),
    ({"targetProviderRef": None}, ["spec.targetProviderRef: required"]),
    ({"targetProviderRef": {"namespace": "x"}}, ["spec.targetProviderRef.name: required"]),
    ({"targetProviderRef": {"name": "p", "kind": "Provider"}},
     ["spec.targetProviderRef.kind: unknown field (known fields: name, namespace)"]),
    ({"targetResourceHints": {"cpu": 0}}, ["spec.targetResourceHints.cpu: must be at least 1, got 0"]),
    ({"targetResourceHints": {"cpu": True}}, ["spec.targetResourceHints.cpu: must be an integer, got a boolean"]),
    ({"targetResourceHints": {"memory": "8G"}},
     ["spec.targetResourceHints.memory: must be an integer, got a string"]),
    ({"targetResourceHints": {"memory": 8}}, ["spec.targetResourceHints.memory: must be at least 16, got 8"]),
    ({"targetResourceHints": {"disk": 1.5}}, ["spec.targetResourceHints.disk: must be an integer, got a number"]),
    ({"targetResourceHints": {"accelerators": 1}},
     ["spec.targetResourceHints.accelerators: unknown field (known fields: cpu, memory, disk)"]),
    ({"targetResourceHints": {"cpus": 1}}, ["spec.targetResourceHints.cpus: unknown field (did you mean 'cpu'?)"]),
    ({"cleanupPolicy": {"deleteSource": "yes"}}, ["spec.cleanupPolicy.deleteSource: must be true or false, got 'yes'"]),
    ({"cleanupPolicy": {"deleteSnapshots": True}},
     ["spec.cleanupPolicy.deleteSnapshots: unknown field (did you mean 'deleteSnapshot'?)"]),
    ({"retryPolicy": {"maxAttempts": -1}}, ["spec.retryPolicy.maxAttempts: must be at least 0, got -1"]),
    ({"retryPolicy": {"backoffDuration": "5 minutes"}},
     ["spec.retryPolicy.backoffDuration: '5 minutes' is not a duration such as 30s, 5m or 1h30m"]),
    ({"retryPolicy": {"backoffDuration": "0s"}}, ["spec.retryPolicy.backoffDuration: must be longer than 0s"]),
    ({"retryPolicy": {"maxBackoffDuration": "30"}},
     ["spec.retryPolicy.maxBackoffDuration: '30' is not a duration such as 30s, 5m or 1h30m"]),
    ({"retryPolicy": {"backoffDuration": "10m", "maxBackoffDuration": "5m"}},
     ["spec.retryPolicy.maxBackoffDuration: 5m is shorter than backoffDuration 10m"]),
    ({"retryPolicy": {"backoffDuration": "1h"}},  # default max 30m is shorter than 1h
     ["spec.retryPolicy.maxBackoffDuration: 30m is shorter than backoffDuration 1h"]),
    ({"targetStorageHint": 5}, ["spec.targetStorageHint: must be a string, got an integer"]),
]


@pytest.mark.parametrize(("overrides", "expected"), PATH_ERRORS, ids=[str(e[1][0])[:60] for e in PATH_ERRORS])
def test_each_error_names_its_path_exactly(overrides, expected):
    assert errors_of(minimal(**overrides)) == expected


def test_retry_max_equal_to_backoff_is_fine():
    retry = parse_vmmigration(minimal(retryPolicy={"backoffDuration": "30m", "maxBackoffDuration": "30m"})).spec
    assert retry.retryPolicy.backoff_seconds == retry.retryPolicy.max_backoff_seconds == 1800


def test_max_attempts_zero_means_no_retry():
    assert parse_vmmigration(minimal(retryPolicy={"maxAttempts": 0})).spec.retryPolicy.maxAttempts == 0


@pytest.mark.parametrize(("doc_change", "expected"), [
    (lambda d: d.update(apiVersion="v1"), "apiVersion: must be infra.virtrigaud.io/v1beta1, got 'v1'"),
    (lambda d: d.update(kind="VirtualMachine"), "kind: must be VMMigration, got 'VirtualMachine'"),
    (lambda d: d["metadata"].pop("name"), "metadata.name: required"),
    (lambda d: d["metadata"].update(name="Bad_Name"),
     "metadata.name: 'Bad_Name' is not a valid name (lowercase letters, digits, '-' and '.')"),
    (lambda d: d["metadata"].update(labels=["a"]), "metadata.labels: must be an object"),
])
def test_top_level_errors(doc_change, expected):
    doc = minimal()
    doc_change(doc)
    assert errors_of(doc) == [expected]


def test_missing_metadata_and_spec():
    errors = errors_of({"apiVersion": API_VERSION, "kind": KIND})
    assert "metadata: required" in errors
    assert "metadata.name: required" in errors
    assert "spec: required" in errors
    assert "spec.sourceName: required" in errors
    assert "spec.targetProviderRef: required" in errors
    assert "spec.storage: required" in errors


def test_spec_that_is_not_an_object():
    doc = minimal()
    doc["spec"] = ["not", "a", "mapping"]
    errors = errors_of(doc)
    assert errors[0] == "spec: must be an object, got a list"
    assert "spec.sourceName: required" in errors


def test_empty_document_is_refused():
    with pytest.raises(SpecValidationError) as info:
        parse_vmmigration(None)
    assert [str(e) for e in info.value.errors] == ["(document): must be a VMMigration object"]


def test_all_errors_are_collected_in_one_exception():
    doc = minimal(
        sourceName="Bad_Name",
        targetDiskFromat="raw",
        targetDiskFormat="vhd",
        storage={"type": "s3", "buckt": "x", "credentialsSecretRef": {"name": "s3"}},
        targetNetworkHints=[{"name": "eth0"}],
        targetResourceHints={"cpu": 0},
        cleanupPolicy={"deleteSource": "no"},
        retryPolicy={"backoffDuration": "soon"},
    )
    with pytest.raises(SpecValidationError) as info:
        parse_vmmigration(doc)
    err = info.value
    assert {e.path for e in err.errors} == {
        "spec.sourceName",
        "spec.targetDiskFromat",
        "spec.targetDiskFormat",
        "spec.storage.buckt",
        "spec.storage.bucket",
        "spec.targetNetworkHints[0]",
        "spec.targetResourceHints.cpu",
        "spec.cleanupPolicy.deleteSource",
        "spec.retryPolicy.backoffDuration",
    }
    assert len(err.errors) == 9
    # the exception's text lists them all
    assert str(err) == "; ".join(str(e) for e in err.errors)
    assert isinstance(err, ValueError)


# -- unknown fields ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "path", "suggestion"), [
    ({"storage": {"type": "nfs", "path": "/mnt", "buckt": "x"}}, "spec.storage.buckt", "bucket"),
    ({"targetDiskFromat": "raw"}, "spec.targetDiskFromat", "targetDiskFormat"),
    ({"sourceNamspace": "x"}, "spec.sourceNamspace", "sourceNamespace"),
    ({"targetNetworkHint": []}, "spec.targetNetworkHint", "targetNetworkHints"),
    ({"retryPolicy": {"maxAttempt": 2}}, "spec.retryPolicy.maxAttempt", "maxAttempts"),
    ({"storage": {"type": "nfs", "path": "/mnt", "credentialSecretRef": {"name": "x"}}},
     "spec.storage.credentialSecretRef", "credentialsSecretRef"),
])
def test_unknown_field_suggests_the_closest_name(overrides, path, suggestion):
    errors = errors_of(minimal(**overrides))
    assert f"{path}: unknown field (did you mean {suggestion!r}?)" in errors


def test_unknown_field_without_close_match_lists_known_fields():
    errors = errors_of(minimal(completelyDifferent=1))
    assert len(errors) == 1
    assert errors[0].startswith("spec.completelyDifferent: unknown field (known fields: sourceName, sourceNamespace,")
    assert "retryPolicy)" in errors[0]


def test_buckt_typo_reports_both_the_typo_and_the_missing_bucket():
    errors = errors_of(minimal(storage={"type": "s3", "buckt": "vm-migrations", "credentialsSecretRef": {"name": "s"}}))
    assert errors == ["spec.storage.buckt: unknown field (did you mean 'bucket'?)",
                      "spec.storage.bucket: required when type is s3"]


def test_unknown_top_level_field_path_has_no_leading_dot():
    doc = minimal()
    doc["extra"] = 1
    with pytest.raises(SpecValidationError) as info:
        parse_vmmigration(doc)
    assert [e.path for e in info.value.errors] == ["extra"]


def test_name_with_trailing_newline_is_refused():
    errors = errors_of(minimal(sourceName="src-vm\n"))
    assert errors == ["spec.sourceName: 'src-vm\\n' is not a valid name (lowercase letters, digits, '-' and '.')"]


# -- network hints ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("hints", "expected"), [
    ([{"name": "eth0"}], ["spec.targetNetworkHints[0]: needs a network (vSphere) or a bridge (libvirt, Proxmox)"]),
    ([{"name": "eth0", "bridge": "virbr0"}, {"name": "eth1", "network": "VM Network", "bridge": "vmbr0"}],
     ["spec.targetNetworkHints[1]: set either network or bridge, not both"]),
    ([{"name": "eth0", "bridge": "virbr0"}, {"name": "eth0", "bridge": "virbr1"}],
     ["spec.targetNetworkHints: interface name 'eth0' appears more than once"]),
    ([{"bridge": "virbr0"}], ["spec.targetNetworkHints[0].name: required"]),
    ([{"name": "eth0", "brige": "virbr0"}],
     ["spec.targetNetworkHints[0].brige: unknown field (did you mean 'bridge'?)",
      "spec.targetNetworkHints[0]: needs a network (vSphere) or a bridge (libvirt, Proxmox)"]),
    ({"name": "eth0", "bridge": "virbr0"}, ["spec.targetNetworkHints: must be a list, got an object"]),
    (["eth0"], ["spec.targetNetworkHints[0]: must be an object, got a string",
                "spec.targetNetworkHints[0].name: required",
                "spec.targetNetworkHints[0]: needs a network (vSphere) or a bridge (libvirt, Proxmox)"]),
])
def test_network_hint_rules(hints, expected):
    assert errors_of(minimal(targetNetworkHints=hints)) == expected


def test_network_hints_keep_order():
    hints = [{"name": f"eth{i}", "bridge": f"br{i}"} for i in range(4)]
    parsed = parse_vmmigration(minimal(targetNetworkHints=hints)).spec.targetNetworkHints
    assert [h.name for h in parsed] == ["eth0", "eth1", "eth2", "eth3"]
    assert all(h.network is None for h in parsed)


# -- durations -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("5m", 300), ("30m", 1800), ("10m", 600), ("1h30m", 5400), ("90s", 90), ("45s", 45), ("1h", 3600),
    ("500ms", 0.5), ("1.5h", 5400), ("2h0m5s", 7205), (" 5m ", 300), ("0s", 0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "m", "5 m", "5min", "1d", "-5m", "5m 3s", "h1", "1h30", "abc"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="is not a duration such as 30s, 5m or 1h30m"):
        parse_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [
    (300, "5m"), (1800, "30m"), (5400, "1h30m"), (45, "45s"), (3600, "1h"), (3661, "1h1m1s"), (0, "0s"),
    (59.6, "1m"), (0.4, "0s"), (90000, "25h"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**7))
def test_duration_round_trip_from_seconds(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(0, 500), st.integers(0, 59), st.integers(0, 59))
def test_duration_round_trip_from_canonical_text(hours, minutes, secs):
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    text = text or "0s"
    assert format_duration(parse_duration(text)) == text
    assert parse_duration(text) == hours * 3600 + minutes * 60 + secs


@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["h", "m", "s", "ms"])), min_size=1, max_size=5))
def test_parse_duration_sums_its_parts(parts):
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration(text) == pytest.approx(sum(n * units[u] for n, u in parts))


# -- pickling (errors cross process boundaries in Airflow workers) ---------------------------------------

def _sample_error() -> SpecValidationError:
    return SpecValidationError([FieldError("spec.storage.bucket", "required when type is s3"),
                                FieldError("spec.targetDiskFormat", "must be one of qcow2, vmdk, raw, got 'x'")])


def test_spec_validation_error_pickles():
    err = _sample_error()
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is SpecValidationError
    assert back.errors == err.errors
    assert str(back) == str(err) == ("spec.storage.bucket: required when type is s3; "
                                     "spec.targetDiskFormat: must be one of qcow2, vmdk, raw, got 'x'")


def _raise_in_child(doc: dict[str, Any]) -> None:
    parse_vmmigration(doc)


def test_spec_validation_error_crosses_a_process_boundary():
    doc = minimal(storage={"type": "s3", "credentialsSecretRef": {"name": "s3"}})
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        future = pool.submit(_raise_in_child, copy.deepcopy(doc))
        with pytest.raises(SpecValidationError) as info:
            future.result(timeout=30)
    assert [str(e) for e in info.value.errors] == ["spec.storage.bucket: required when type is s3"]


# -- safe by construction: bounded values, names that are names --------------------------------------

@pytest.mark.parametrize(("key", "value", "expected"), [
    ("backoffDuration", "99999999999h", "spec.retryPolicy.backoffDuration: '99999999999h' is longer than the "
                                        "maximum 24h"),
    ("maxBackoffDuration", "24h1s", "spec.retryPolicy.maxBackoffDuration: '24h1s' is longer than the maximum 24h"),
    ("backoffDuration", "9" * 400 + "h", "spec.retryPolicy.backoffDuration: '" + "9" * 59 + "...9999999999h' "
                                         "(401 chars) is longer than the maximum 24h"),
    ("backoffDuration", 5, "spec.retryPolicy.backoffDuration: must be a duration such as 30s, 5m or 1h30m, "
                           "got an integer"),
])
def test_retry_durations_are_bounded(key, value, expected):
    assert errors_of(minimal(retryPolicy={key: value})) == [expected]


def test_retry_durations_up_to_a_day_are_fine():
    policy = parse_vmmigration(minimal(retryPolicy={"backoffDuration": "24h", "maxBackoffDuration": "24h"}))
    assert policy.spec.retryPolicy.max_backoff_seconds == 86400


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"retryPolicy": {"maxAttempts": 101}}, "spec.retryPolicy.maxAttempts: must be at most 100, got 101"),
    ({"targetResourceHints": {"cpu": 10**40}},
     "spec.targetResourceHints.cpu: must be at most 4096, got a number of more than 30 digits"),
    ({"targetResourceHints": {"memory": 2**60}}, f"spec.targetResourceHints.memory: must be at most "
                                                 f"{64 * 1024 * 1024}, got {2**60}"),
])
def test_numbers_are_bounded(overrides, expected):
    assert errors_of(minimal(**overrides)) == [expected]


@pytest.mark.parametrize(("hint", "path"), [
    ({"name": "eth0", "network": "VM Network' portgroup='evil"}, "spec.targetNetworkHints[0].network"),
    ({"name": "eth0", "network": "a  b"}, "spec.targetNetworkHints[0].network"),
    ({"name": "eth0", "bridge": "br 0"}, "spec.targetNetworkHints[0].bridge"),
    ({"name": "eth0", "bridge": 'virbr0"/><x a="'}, "spec.targetNetworkHints[0].bridge"),
    ({"name": "eth0", "bridge": "b" * 65}, "spec.targetNetworkHints[0].bridge"),
    ({"name": "<eth0>", "bridge": "virbr0"}, "spec.targetNetworkHints[0].name"),
    ({"name": "eth\n0", "bridge": "virbr0"}, "spec.targetNetworkHints[0].name"),
])
def test_network_hint_values_must_be_names(hint, path):
    errors = errors_of(minimal(targetNetworkHints=[hint]))
    assert len(errors) == 1 and errors[0].startswith(f"{path}: "), errors
    assert "\n" not in errors[0]


@pytest.mark.parametrize("hint", [{"name": "eth0", "network": "VM Network"}, {"name": "eth0", "bridge": "vmbr0"},
                                  {"name": "net0", "bridge": "br-storage.10"}, {"name": "eth0:1", "bridge": "ovs_br"}])
def test_usual_network_names_are_fine(hint):
    assert parse_vmmigration(minimal(targetNetworkHints=[hint])).spec.targetNetworkHints[0].name == hint["name"]


@pytest.mark.parametrize("pool", ["default", "datastore1", "datastore1 (1)", "local-lvm", "ceph_pool.ssd", "pve:x"])
def test_usual_storage_names_are_fine(pool):
    assert parse_vmmigration(minimal(targetStorageHint=pool)).spec.targetStorageHint == pool


@pytest.mark.parametrize("pool", ["../etc", "a/b", "x'y", "pool<", " lead", "trail ", "two  spaces", "p" * 129,
                                  "new\nline"])
def test_odd_storage_names_are_refused(pool):
    errors = errors_of(minimal(targetStorageHint=pool))
    assert len(errors) == 1 and errors[0].startswith("spec.targetStorageHint: "), errors


@pytest.mark.parametrize(("meta", "expected"), [
    ({"name": "mig", "namespace": "n" * 64}, f"metadata.namespace: '{'n' * 64}' is longer than 63 characters"),
    ({"name": "mig", "namespace": "dotted.ns"}, "metadata.namespace: 'dotted.ns' is not a valid namespace "
                                                "(lowercase letters, digits and '-')"),
    ({"name": "n" * 254}, "metadata.name: '" + "n" * 59 + "..." + "n" * 11 + "' (254 chars) is longer than 253 "
                          "characters"),
])
def test_metadata_follows_kubernetes_limits(meta, expected):
    doc = minimal()
    doc["metadata"] = meta
    assert errors_of(doc) == [expected]


def test_odd_unknown_keys_are_quoted_in_the_path():
    doc = minimal()
    doc["spec"]["bad\nkey"] = 1
    doc["spec"][7] = 2
    doc["spec"]["k" * 500] = 3
    errors = errors_of(doc)
    assert [e.split(": ")[0] for e in errors] == ["spec['bad\\nkey']", "spec[7]", f"spec['{'k' * 59}...{'k' * 11}' "
                                                                                  f"(500 chars)]"]
