"""tests/secret_scan.py: the end-of-session scan finds planted secrets in logs, JSON and SQLite, in plain and
encoded forms, leaves the inputs alone, and reports nothing for a clean tree.

The trees live in a TemporaryDirectory, not in ``tmp_path``: the planted leaks must be gone before the
session's own scan runs over pytest's base temp folder.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import tempfile
from pathlib import Path

import pytest
import yaml

from tests import secret_scan

SECRET = "Zq8-planted-s3cr3t-value"
KEY = ("-----BEGIN OPENSSH PRIVATE KEY-----\n"
       "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
       "QyNTUxOQAAACBplantedplantedplantedplantedplantedAAAAAAAAAAAAAAAAAAAAAAA\n"
       "-----END OPENSSH PRIVATE KEY-----\n")


@pytest.fixture
def tree():
    with tempfile.TemporaryDirectory(prefix="secret-scan-test-") as folder:
        yield Path(folder)


def _store(root: Path, **string_data: str) -> Path:
    store = root / "store"
    store.mkdir(parents=True, exist_ok=True)
    docs = [{"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
             "metadata": {"name": "m", "namespace": "default"}, "spec": {}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": "default"},
             "stringData": {"username": "migration-operator", **string_data},
             "data": {"encoded": base64.b64encode(b"another-secret-from-data").decode()}}]
    path = store / "m.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def _clean_outputs(root: Path) -> None:
    logs = root / "airflow" / "logs" / "dag_id=x"
    logs.mkdir(parents=True)
    (logs / "attempt=1.log").write_text("uploading disk vda\nuser migration-operator\n")
    (root / "store" / "status" / "default").mkdir(parents=True)
    (root / "store" / "status" / "default" / "m.json").write_text(json.dumps({"phase": "Ready", "message": "***"}))
    db = sqlite3.connect(root / "airflow" / "airflow.db")
    db.execute("CREATE TABLE xcom (key TEXT, value BLOB)")
    db.execute("INSERT INTO xcom VALUES ('return_value', ?)", (b'{"disk": "vda"}',))
    db.commit()
    db.close()
    (root / "disk.raw").write_bytes(b"\x00" * 4096 + SECRET.encode())  # binary: not a user-visible file


def test_clean_tree_has_no_hits(tree):
    _store(tree, secretKey=SECRET)
    _clean_outputs(tree)
    result = secret_scan.scan([tree], {"tok-registered-123": "test server token"})
    assert result.hits == []
    assert {s.value for s in result.secrets} == {SECRET, "another-secret-from-data", "tok-registered-123"}
    assert tree / "store" / "m.yaml" in result.excluded  # the input itself
    assert result.files == 3 and result.skipped == 1
    assert result.summary.startswith("secret scan: 3 files, 3 secrets, 0 hits")


def test_planted_secret_in_a_task_log_is_reported_with_file_and_line(tree):
    _store(tree, secretKey=SECRET)
    _clean_outputs(tree)
    log = tree / "airflow" / "logs" / "dag_id=x" / "attempt=1.log"
    log.write_text(f"line one\nconnecting with secret {SECRET}\n")
    result = secret_scan.scan([tree])
    assert len(result.hits) == 1
    hit = result.hits[0]
    assert (hit.path, hit.form, hit.where.split(",")[0]) == (log, "plain", "line 2")
    assert SECRET not in str(hit) and "Zq8...(24 chars)" in str(hit) and "key secretKey" in str(hit)


@pytest.mark.parametrize("encode", [
    lambda v: base64.b64encode(v.encode()).decode(),
    lambda v: base64.b64encode(f"operator:{v}".encode()).decode(),  # inside a longer blob, any alignment
    lambda v: base64.b64encode(f"xy:{v}".encode()).decode(),
    lambda v: base64.urlsafe_b64encode(f"x:{v}".encode()).decode(),
])
def test_base64_forms_are_found_in_status_json(tree, encode):
    _store(tree)
    _clean_outputs(tree)
    status = tree / "store" / "status" / "default" / "m.json"
    status.write_text(json.dumps({"phase": "Failed", "message": f"Authorization: Basic {encode(SECRET)}"}))
    result = secret_scan.scan([tree], {SECRET: "registered"})
    assert [(h.path, h.form[:6]) for h in result.hits] == [(status, "base64")]


def test_secret_from_data_and_from_a_private_key_line_are_found(tree):
    _store(tree, sshPrivateKey=KEY)
    _clean_outputs(tree)
    (tree / "scheduler.log").write_text(f"key line {KEY.splitlines()[2]}\nanother-secret-from-data\n")
    result = secret_scan.scan([tree])
    assert sorted((h.form, h.where.split(",")[0]) for h in result.hits) == [("line", "line 1"), ("plain", "line 2")]


def test_xcom_in_the_airflow_db_is_scanned_row_by_row(tree):
    _store(tree, secretKey=SECRET)
    _clean_outputs(tree)
    db = sqlite3.connect(tree / "airflow" / "airflow.db")
    db.execute("INSERT INTO xcom VALUES ('creds', ?)", (json.dumps({"secretKey": SECRET}).encode(),))
    db.commit()
    db.close()
    result = secret_scan.scan([tree])
    assert [(h.path.name, h.where) for h in result.hits] == [("airflow.db", "table xcom, column value, rowid 2")]


def test_inputs_key_files_and_non_secrets_are_left_alone(tree):
    _store(tree, secretKey=SECRET, flag="true", short="abc")
    _clean_outputs(tree)
    server = tree / "dav"
    server.mkdir()
    (server / "nginx.conf").write_text(f"map $http_authorization $ok {{ \"Bearer {SECRET}\" 1; }}\n")
    (server / "clientkey").write_text(KEY)
    (tree / "note.txt").write_text("user migration-operator, flag true, abc\n")  # username and short values
    result = secret_scan.scan([tree], inputs=[server / "nginx.conf"])
    assert result.hits == []
    assert {server / "nginx.conf", server / "clientkey"} <= set(result.excluded)
