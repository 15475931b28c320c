"""A source libvirt reached over ``qemu+ssh://`` (Debian's sshd on loopback, key from the Provider's
Secret): disks are read through the libvirt stream API, as from a remote host, never as local files."""

from __future__ import annotations

import pytest

from include.demo import create_source_vm, store_documents, write_store
from include.store import FileStatusSink, SpecStore
from tests.e2e.helpers import assert_target_matches_source, run_migration, task_states
from tests.servers.sshd import start_ssh_server

pytestmark = pytest.mark.e2e


@pytest.fixture
def sshd(tmp_path):
    server = start_ssh_server(tmp_path / "sshd")
    yield server
    server.stop()


def test_remote_source_over_ssh_with_key_from_secret(airflow_db, store, world, sshd, capfd):
    create_source_vm(world, vdb_format="raw")
    docs = store_documents(world, name="overssh", target_format="qcow2")
    source_provider = next(d for d in docs if d["kind"] == "Provider" and d["metadata"]["name"].endswith("source"))
    source_provider["spec"]["endpoint"] = sshd.libvirt_uri(with_keyfile=False)
    source_provider["spec"]["credentialSecretRef"] = {"name": "ssh-key"}
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ssh-key", "namespace": "default"},
                 "type": "kubernetes.io/ssh-auth", "stringData": {"ssh-privatekey": sshd.private_key}})
    write_store(store, "overssh.yaml", docs)

    dagrun = run_migration("vmmigration__default__overssh")

    assert str(dagrun.state) == "success", task_states(dagrun)
    status = FileStatusSink(SpecStore(store)).get("default", "overssh")
    assert status["phase"] == "Ready"
    record = SpecStore(store).disk_record("default", "overssh", "vdb")
    assert record["exportPath"] is None or "export" in record["exportPath"]  # raw -> qcow2 was staged locally
    assert_target_matches_source(world, "qcow2", {"vda": "qcow2", "vdb": "raw"})
    out, err = capfd.readouterr()
    key_body = sshd.private_key.splitlines()[1]
    assert key_body not in out + err  # the private key never reaches a log
    import glob
    import tempfile

    assert not glob.glob(f"{tempfile.gettempdir()}/vmmigration-sshkey-*")  # key files go with their connection
