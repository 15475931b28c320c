"""Hooks against real servers: libvirtd through an AIRFLOW_CONN_* connection, S3 through MigrationS3Hook."""

from __future__ import annotations

import json

import pytest


def test_libvirt_hook_reads_its_uri_from_an_env_connection(libvirt_uri, monkeypatch):
    from hooks.libvirt_hook import LibvirtHook

    monkeypatch.setenv("AIRFLOW_CONN_LIBVIRT_DEFAULT", json.dumps({"conn_type": "libvirt", "host": libvirt_uri}))
    hook = LibvirtHook()
    assert hook.uri == libvirt_uri
    ok, message = hook.test_connection()
    assert ok and "libvirt 9." in message
    conn = hook.get_conn()  # the SDK's own connection, as the Airflow providers' hooks return theirs
    assert conn.getLibVersion() >= 9_000_000
    assert hook.driver.conn is conn  # the driver works on the hook's session
    hook.driver.close()
    assert hook.get_conn() is not conn and hook.get_conn().getLibVersion()  # a closed one is opened again
    hook.get_conn().close()


def test_libvirt_hook_refuses_conflicting_settings(monkeypatch):
    from hooks.libvirt_hook import LibvirtHook
    from include.errors import ConfigurationError

    monkeypatch.setenv("AIRFLOW_CONN_LIBVIRT_DEFAULT", json.dumps(
        {"conn_type": "libvirt", "host": "qemu:///system", "extra": {"uri": "qemu+ssh://h/system"}}))
    with pytest.raises(ConfigurationError):
        _ = LibvirtHook().uri


def test_a_hook_configuration_error_fails_the_task_without_retrying(monkeypatch, tmp_path):
    """A connection without a URI is not retried for half an hour: the operator fails the task at once."""
    from airflow.sdk.exceptions import AirflowFailException

    from hooks.libvirt_hook import LibvirtHook
    from include.status import Phase
    from operators.base import MigrationPhaseOperator

    monkeypatch.setenv("AIRFLOW_CONN_LIBVIRT_DEFAULT", json.dumps({"conn_type": "libvirt"}))

    class Probe(MigrationPhaseOperator):
        phase = Phase.VALIDATING

        def run_phase(self, ctx, context):
            return LibvirtHook().uri

    op = Probe(task_id="probe", namespace="ns", migration_name="m", store_path=str(tmp_path))
    with pytest.raises(AirflowFailException, match="no libvirt URI"):
        op.execute({})


S3_BUCKET = "hooked"  # the bucket the shared ``s3`` fixture (tests/conftest.py) makes


def test_migration_s3_hook_uses_the_secret_not_a_connection(s3):
    from airflow.sdk.log import mask_secret  # noqa: F401 - the hook registers the secret with the masker

    from hooks.s3_storage_hook import MigrationS3Hook
    from include.storage.s3 import S3Settings

    settings = S3Settings(bucket="hooked", region="us-east-1", endpoint_url=s3.endpoint,
                          access_key=s3.access_key, secret_key=s3.secret_key)
    hook = MigrationS3Hook(settings=settings)
    client = hook.get_conn()
    client.put_object(Bucket="hooked", Key="k", Body=b"v")
    assert hook.read_key("k", bucket_name="hooked") == "v"  # the provider's own S3Hook verbs work too
    assert s3.secret_key not in repr(hook) and s3.secret_key not in repr(settings)


def test_migration_s3_hook_with_wrong_keys_is_refused(s3):
    from botocore.exceptions import ClientError

    from hooks.s3_storage_hook import MigrationS3Hook
    from include.storage.s3 import S3Settings

    hook = MigrationS3Hook(settings=S3Settings(bucket="hooked", region="us-east-1", endpoint_url=s3.endpoint,
                                               access_key=s3.access_key, secret_key="wrong"))
    with pytest.raises(ClientError) as err:
        hook.get_conn().head_bucket(Bucket="hooked")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_proxmox_hook_reaches_a_node_over_the_ssh_providers_hook_trusting_only_the_listed_key(pve, monkeypatch,
                                                                                              tmp_path):
    """SSH to a node goes through the SSH provider's SSHHook (the real sshd of the test server's node): the
    key in sshKnownHosts is the only one accepted, a node showing another key is refused, a refused client key
    fails at once as an authentication error."""
    import subprocess
    from pathlib import Path

    from airflow.providers.ssh.hooks import ssh as ssh_hooks

    from include.errors import ConfigurationError, HypervisorAuthError
    from tests.e2e.pve_world import provider_docs

    hook_module = pytest.importorskip("hooks.proxmox_hook")
    made = []
    real_get_conn = ssh_hooks.SSHHook.get_conn

    def counting(self):
        made.append((self.remote_host, self.port, self.compress))
        return real_get_conn(self)

    monkeypatch.setattr(ssh_hooks.SSHHook, "get_conn", counting)  # counts, and calls the real one
    creds = provider_docs(pve, "pve")[1]["stringData"]
    hook = hook_module.ProxmoxHook(uri=pve.url, credentials=dict(creds))
    client = hook.pve.ssh()
    try:
        out = hook.pve.run(client, ["pvesm", "status"], "listing storages")
    finally:
        client.close()
    assert "local-lvm" in out and made == [("127.0.0.1", pve.ssh["pve1"].port, False)]
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    host, _type, _key = creds["sshKnownHosts"].split()[:3]
    wrong = dict(creds, sshKnownHosts=f"{host} {Path(str(other) + '.pub').read_text().split()[0]} "
                                      f"{Path(str(other) + '.pub').read_text().split()[1]}\n")
    with pytest.raises(ConfigurationError, match="host key"):
        hook_module.ProxmoxHook(uri=pve.url, credentials=wrong).pve.ssh()
    refused = dict(creds, sshPrivateKey=other.read_text())
    with pytest.raises(HypervisorAuthError, match="refused the SSH key"):
        hook_module.ProxmoxHook(uri=pve.url, credentials=refused).pve.ssh()


def test_proxmox_ssh_takes_hashed_known_hosts_and_never_the_workers_own(pve, monkeypatch, tmp_path):
    """``ssh-keygen -H`` lines are matched; a worker whose ~/.ssh/known_hosts has the node's real key does not
    make a wrong sshKnownHosts pass (SSHHook loads that file; the key the node shows is checked against ours)."""
    import subprocess
    from pathlib import Path

    from include.errors import ConfigurationError
    from tests.e2e.pve_world import provider_docs

    hook_module = pytest.importorskip("hooks.proxmox_hook")
    creds = provider_docs(pve, "pve")[1]["stringData"]
    hashed = tmp_path / "known_hosts"
    hashed.write_text(creds["sshKnownHosts"])
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(hashed)], check=True, capture_output=True)
    assert "|1|" in hashed.read_text()
    client = hook_module.ProxmoxHook(uri=pve.url, credentials=dict(creds, sshKnownHosts=hashed.read_text())).pve.ssh()
    client.close()
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(creds["sshKnownHosts"])  # the real key, trusted by the worker
    monkeypatch.setenv("HOME", str(home))
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    host = creds["sshKnownHosts"].split()[0]
    pub = Path(str(other) + ".pub").read_text().split()
    with pytest.raises(ConfigurationError, match="host key"):
        hook_module.ProxmoxHook(uri=pve.url, credentials=dict(creds, sshKnownHosts=f"{host} {pub[0]} {pub[1]}\n")
                                ).pve.ssh()
