"""Namespace folders of the spec store: a team that can write only its folder cannot speak for another
namespace (no ReferenceGrant, Secret or Provider "in" tenant-b from tenant-a's folder)."""

from __future__ import annotations

import yaml

from include.grants import granted
from include.inventory import BundleInventory
from include.store import SpecStore

GRANT = {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "ReferenceGrant",
         "metadata": {"name": "let-me-in", "namespace": "tenant-b"},
         "spec": {"from": [{"kind": "VMMigration", "namespace": "tenant-a"}], "to": [{"kind": "Provider"}]}}
SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"token": "abcdefgh12"}}


def test_a_namespace_folder_holds_only_its_own_objects(tmp_path):
    (tmp_path / "tenant-a").mkdir()
    (tmp_path / "tenant-a" / "mine.yaml").write_text(yaml.safe_dump_all([GRANT, SECRET]))
    index = SpecStore(tmp_path).index()
    # the grant "in" tenant-b written from tenant-a's folder is ignored and reported
    assert ("ReferenceGrant", "tenant-b", "let-me-in") not in index.objects
    assert any("of namespace 'tenant-b' in the folder of namespace tenant-a was ignored" in p for p in index.problems)
    # a document without a namespace is put in the folder's
    assert ("Secret", "tenant-a", "creds") in index.objects
    assert not granted(BundleInventory(index.objects), ("VMMigration", "tenant-a"), "Provider", "tenant-b", "p")


def test_the_operators_top_level_files_and_the_owning_folder_may_grant(tmp_path):
    (tmp_path / "tenant-b").mkdir()
    (tmp_path / "tenant-b" / "grant.yaml").write_text(yaml.safe_dump(GRANT))
    index = SpecStore(tmp_path).index()
    assert index.problems == []
    assert granted(BundleInventory(index.objects), ("VMMigration", "tenant-a"), "Provider", "tenant-b", "p")


def test_state_folders_are_not_namespace_folders_and_bad_folder_names_are_reported(tmp_path):
    (tmp_path / "status" / "default").mkdir(parents=True)
    (tmp_path / "status" / "x.yaml").write_text(yaml.safe_dump(SECRET))
    (tmp_path / "Not_A_Namespace").mkdir()
    (tmp_path / "Not_A_Namespace" / "x.yaml").write_text(yaml.safe_dump(SECRET))
    index = SpecStore(tmp_path).index()
    assert index.objects == {}
    assert len(index.problems) == 1 and "is not a namespace name" in index.problems[0]
