"""The libvirt migration through S3 (versitygw, credentials checked) and HTTP (nginx WebDAV behind a
bearer token), and the failures large transfers meet, each produced for real: wrong keys, a byte
flipped in the stored object, the server killed mid-transfer and started again."""

from __future__ import annotations

import threading
import time

import pytest

from include import phases
from include.demo import create_source_vm, store_documents, write_store
from include.errors import ChecksumError
from include.status import Phase
from include.store import FileStatusSink, SpecStore
from tests.e2e.helpers import assert_target_matches_source, run_migration, task_states
from tests.servers.webdav import start_webdav_server

pytestmark = pytest.mark.e2e


@pytest.fixture
def webdav(tmp_path, monkeypatch):
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    server = start_webdav_server(tmp_path / "webdav", token="s3cr3t-token")
    yield server
    server.stop()


def s3_docs(world, name: str, server, *, secret_key: str | None = None, target_format: str = "raw",
            retry: dict | None = None) -> list[dict]:
    docs = store_documents(world, name=name, target_format=target_format, extra_spec={
        "storage": {"type": "s3", "bucket": "vm-migrations", "endpoint": server.endpoint, "region": "us-east-1",
                    "credentialsSecretRef": {"name": f"{name}-s3"}},
        **({"retryPolicy": retry} if retry else {}),
    })
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-s3", "namespace": "default"},
                 "stringData": {"accessKey": server.access_key, "secretKey": secret_key or server.secret_key}})
    return docs


def http_docs(world, name: str, server, *, token: str) -> list[dict]:
    docs = store_documents(world, name=name, target_format="raw", extra_spec={
        "storage": {"type": "http", "endpoint": server.url.rstrip("/"), "credentialsSecretRef": {"name": f"{name}-t"}},
    })
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-t", "namespace": "default"},
                 "stringData": {"token": token}})
    return docs


def test_migration_through_s3(airflow_db, store, world, s3, capfd, caplog):
    create_source_vm(world)
    write_store(store, "vias3.yaml", s3_docs(world, "vias3", s3))
    dagrun = run_migration("vmmigration__default__vias3")
    assert str(dagrun.state) == "success", task_states(dagrun)
    # no secret in any log line, in XCom or in the status and plan files
    out, err = capfd.readouterr()
    assert s3.secret_key not in out + err + caplog.text
    xcoms = [str(ti.xcom_pull(task_ids=ti.task_id, map_indexes=ti.map_index)) for ti in dagrun.get_task_instances()]
    assert s3.secret_key not in "".join(xcoms)
    for state_file in (store / "status").rglob("*.json"):
        assert s3.secret_key not in state_file.read_text()
    status = FileStatusSink(SpecStore(store)).get("default", "vias3")
    assert status["phase"] == "Ready"
    assert_target_matches_source(world)
    # deleteIntermediate: the bucket is empty again, no unfinished upload left
    client = s3.client()
    assert client.list_objects_v2(Bucket="vm-migrations").get("KeyCount", 0) == 0
    assert not client.list_multipart_uploads(Bucket="vm-migrations").get("Uploads")


def test_migration_through_http_with_guide_token_form(airflow_db, store, world, webdav):
    create_source_vm(world)
    # the guide stores the token as "Bearer_<token>"
    write_store(store, "viahttp.yaml", http_docs(world, "viahttp", webdav, token="Bearer_s3cr3t-token"))
    dagrun = run_migration("vmmigration__default__viahttp")
    assert str(dagrun.state) == "success", task_states(dagrun)
    assert FileStatusSink(SpecStore(store)).get("default", "viahttp")["phase"] == "Ready"
    assert_target_matches_source(world)
    assert not [p for p in webdav.root.rglob("*") if p.is_file()]


def test_wrong_s3_keys_fail_at_once_with_the_guide_condition(airflow_db, store, world, s3):
    create_source_vm(world)
    write_store(store, "badkeys.yaml", s3_docs(world, "badkeys", s3, secret_key="not-the-secret"))
    dagrun = run_migration("vmmigration__default__badkeys")
    assert str(dagrun.state) == "failed"
    status = FileStatusSink(SpecStore(store)).get("default", "badkeys")
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "StorageAuthenticationFailed"
    assert "Storage authentication failed" in failed["message"]
    assert "not-the-secret" not in str(status)
    ti = next(t for t in dagrun.get_task_instances() if t.task_id == "validate_migration")
    assert ti.try_number == 1  # no pointless retries


def test_corrupted_object_is_caught_on_import(store, world, s3):
    """Real phases against the real S3 server; a byte of the stored object is flipped on the server's
    disk between Transferring and Importing (the Airflow retry is covered by the next test)."""
    create_source_vm(world)
    write_store(store, "corrupt.yaml", s3_docs(world, "corrupt", s3))
    ctx = phases.MigrationContext("default", "corrupt", store=SpecStore(store))
    phases.validate(ctx)
    phases.snapshot(ctx)
    phases.export_disk(ctx, "vda")
    phases.transfer_disk(ctx, "vda")
    stored = s3.root / "vm-migrations" / "default" / "corrupt" / "vda.raw"  # qcow2 -> raw leaves as guest data
    with open(stored, "r+b") as fh:
        fh.seek(4 * 1024 * 1024 + 17)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    phases.convert_disk(ctx, "vda")  # nothing to convert on arrival: the guest data is already raw
    with pytest.raises(ChecksumError, match="disk vda") as err:
        phases.import_disk(ctx, "vda")
    from operators.retry import MigrationRetryPolicy

    decision = MigrationRetryPolicy(5, 10).evaluate(err.value, 1, 2)
    assert decision.action.value == "retry" and decision.retry_delay.total_seconds() == 5
    phases.record_failure(ctx, Phase.IMPORTING, err.value, final=True)
    status = FileStatusSink(SpecStore(store)).get("default", "corrupt")
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ChecksumMismatch" and "disk vda" in failed["message"]
    phases.finalize(ctx, succeeded=False, failure=failed["message"])
    assert s3.client().list_objects_v2(Bucket="vm-migrations").get("KeyCount", 0) == 0


def test_s3_killed_mid_upload_resumes_and_is_byte_identical(airflow_db, store, world, s3):
    create_source_vm(world, vda_mib=1024, data_scale=8)  # ~770 MB of data in vda
    write_store(store, "killed.yaml", s3_docs(world, "killed", s3,
                                              retry={"maxAttempts": 3, "backoffDuration": "2s"}))
    client = s3.client()
    killed = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed.is_set():
            try:
                for up in client.list_multipart_uploads(Bucket="vm-migrations").get("Uploads", []):
                    parts = client.list_parts(Bucket="vm-migrations", Key=up["Key"],
                                              UploadId=up["UploadId"]).get("Parts", [])
                    if up["Key"].endswith("vda.raw") and len(parts) >= 3:
                        s3.kill()
                        killed.set()
                        time.sleep(1)
                        s3.restart()
                        return
            except Exception:  # noqa: BLE001 - the server may be between states
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    dagrun = run_migration("vmmigration__default__killed")
    thread.join()
    assert killed.is_set(), "the upload finished before the server could be killed"
    states = task_states(dagrun)
    assert str(dagrun.state) == "success", states
    transfer = [t for t in dagrun.get_task_instances() if t.task_id == "disk.transfer_disk" and t.map_index == 0]
    assert transfer[0].try_number >= 2  # it failed once and was retried
    record = SpecStore(store).disk_record("default", "killed", "vda")
    assert record["resumedBytes"] > 0, record  # the retry kept the parts stored before the kill
    assert_target_matches_source(world)


def test_corrupted_object_is_retried_by_airflow_then_fails_naming_the_disk(airflow_db, store, world, s3):
    """The same fault inside a whole run: once vda's object and manifest are stored, a byte near its
    end is flipped on the server's disk; the import side catches it, Airflow retries per retryPolicy,
    and the migration ends Failed with the disk named and nothing left on the target."""
    create_source_vm(world)
    write_store(store, "flip.yaml", s3_docs(world, "flip", s3, retry={"maxAttempts": 1, "backoffDuration": "1s"}))
    stored = s3.root / "vm-migrations" / "default" / "flip" / "vda.raw"
    manifest = stored.with_name("vda.raw.manifest.json")
    flipped = threading.Event()

    def flipper() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if manifest.exists() and stored.exists():
                with open(stored, "r+b") as fh:
                    fh.seek(-4096, 2)
                    byte = fh.read(1)
                    fh.seek(-1, 1)
                    fh.write(bytes([byte[0] ^ 0x55]))
                flipped.set()
                return
            time.sleep(0.005)

    thread = threading.Thread(target=flipper)
    thread.start()
    dagrun = run_migration("vmmigration__default__flip")
    thread.join()
    assert flipped.is_set()
    assert str(dagrun.state) == "failed"
    imported = next(t for t in dagrun.get_task_instances() if t.task_id == "disk.import_disk" and t.map_index == 0)
    assert str(imported.state).endswith("failed") and imported.try_number == 2  # retried once (maxAttempts: 1)
    status = FileStatusSink(SpecStore(store)).get("default", "flip")
    assert status["phase"] == "Failed" and status["failedPhase"] == "Importing"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ChecksumMismatch" and "disk vda" in failed["message"]
    conn = world.conn()
    try:
        assert f"{world.vm_name}-migrated" not in [d.name() for d in conn.listAllDomains(0)]
        pool = conn.storagePoolLookupByName(world.target_pool)
        pool.refresh(0)
        assert pool.listVolumes() == []  # the half-made target is rolled back
        # the source is untouched by the failure: its snapshot stays, for rollback
        assert conn.lookupByName(world.vm_name).snapshotListNames(0) == ["vmmigration-flip"]
    finally:
        conn.close()
