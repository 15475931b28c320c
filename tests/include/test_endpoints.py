"""include/endpoints.py: only allowlisted Provider endpoints, never a command libvirt would run."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from include.demo import DemoWorld, store_documents
from include.endpoints import check_provider_address, check_provider_endpoint, redact, redact_text
from include.errors import InvalidMigration
from include.inventory import BundleInventory, _provider
from include.netpolicy import AddressPolicy, AddressRefused
from include.spec import SpecValidationError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("ptype", "endpoint"), [
    ("libvirt", "qemu:///system"),
    ("libvirt", "qemu:///session"),
    ("qemu", "qemu:///system"),
    ("libvirt", "qemu+unix:///system"),
    ("libvirt", "qemu+ssh://kvm1/system"),
    ("libvirt", "qemu+ssh://root@kvm-host1.example.com/system"),
    ("libvirt", "qemu+ssh://root@127.0.0.1:2222/system?no_verify=1"),
    ("libvirt", "qemu+ssh://root@[2001:db8::7]:22/system?no_tty=1&known_hosts=/etc/vmmigration/known_hosts"),
    ("libvirt", "qemu+tls://kvm1.example.com/system"),
    ("libvirt", "qemu+tls://kvm1.example.com:16514/system?no_verify=0"),
    ("vsphere", "https://vcenter.example.com/sdk"),
    ("vsphere", "https://vcenter.example.com:8443/sdk"),
    ("proxmox", "https://pve.example.com:8006"),
    ("proxmox", "https://pve.example.com:8006/api2/json"),
])
def test_supported_endpoints_pass(ptype, endpoint):
    assert check_provider_endpoint(ptype, endpoint) is None


@pytest.mark.parametrize(("ptype", "endpoint", "says"), [
    ("libvirt", "qemu+ext:///system?command=/tmp/evil.sh", "qemu+ext"),
    ("libvirt", "qemu+ssh://kvm1/system?command=/tmp/evil.sh", "command"),
    ("libvirt", "qemu+ssh://kvm1/system?com%6Dand=/tmp/evil.sh", "command"),  # decoded as libvirt decodes
    ("libvirt", "qemu+ssh://kvm1/system?netcat=/tmp/evil.sh", "netcat"),
    ("libvirt", "qemu+ssh://kvm1/system?socket=/run/x.sock", "socket"),
    ("libvirt", "qemu+ssh://kvm1/system?proxy=native", "proxy"),
    ("libvirt", "qemu+ssh://kvm1/system?mode=legacy", "mode"),
    ("libvirt", "qemu+ssh://kvm1/system?name=qemu%2Bext:///system", "name"),
    ("libvirt", "qemu+ssh://kvm1/system?keyfile=/root/.ssh/id_rsa", "keyfile"),
    ("libvirt", "qemu+ssh://kvm1/system?no_verify=1;command=/tmp/evil.sh", "';'"),
    ("libvirt", "qemu+ssh://kvm1/system?no_verify=yes", "no_verify must be 0 or 1"),
    ("libvirt", "qemu+ssh://kvm1/system?known_hosts=relative", "known_hosts"),
    ("libvirt", "qemu+ssh://kvm1/system?no_verify=1&no_verify=0", "repeats"),
    ("libvirt", "qemu+ssh://-oProxyCommand=touch%20x/system", "invalid host"),
    ("libvirt", "qemu+ssh://-oProxyCommand=x@kvm1/system", "invalid SSH user"),
    ("libvirt", "qemu+ssh://kvm1/system%3Fcommand=x", "/system or /session"),
    ("libvirt", "qemu+ssh://kvm1/other", "/system or /session"),
    ("libvirt", "qemu+ssh://kvm1/system#frag", "fragment"),
    ("libvirt", "qemu+ssh://kvm1/system?", "empty query"),
    ("libvirt", "qemu+ssh://kvm1:abc/system", "not a valid URI"),
    ("libvirt", "qemu+ssh://kvm1/system\\", "characters"),
    ("libvirt", "qemu+ssh://kvm 1/system", "characters"),
    ("libvirt", "qemu+tls://kvm1/system?pkipath=/tmp/pki", "pkipath"),
    ("libvirt", "qemu+tls://kvm1/system?tls_priority=NONE", "tls_priority"),
    ("libvirt", "qemu+tls://root@kvm1/system", "credentials"),
    ("libvirt", "qemu+tcp://kvm1/system", "qemu+tcp"),
    ("libvirt", "qemu+libssh2://kvm1/system", "qemu+libssh2"),
    ("libvirt", "xen:///system", "'xen'"),
    ("libvirt", "test:///default", "'test'"),
    ("libvirt", "qemu://kvm1/system", "local URI"),
    ("libvirt", "qemu+unix:///system?socket=/tmp/evil.sock", "socket"),
    ("libvirt", "qemu+unix:///system?mode=direct", "mode"),
    ("libvirt", "qemu:///system?socket=/tmp/evil.sock", "socket"),
    ("libvirt", "", "empty"),
    ("vsphere", "http://vcenter.example.com/sdk", "https://host[:port]/sdk"),
    ("vsphere", "https://vcenter.example.com/", "https://host[:port]/sdk"),
    ("vsphere", "https://vcenter.example.com/sdk?x=1", "query"),
    ("proxmox", "https://pve.example.com:8006/other", "api2/json"),
    ("proxmox", "ftp://pve.example.com", "https://host[:port]"),
    ("firecracker", "unix:///run/fc.sock", "firecracker"),
])
def test_everything_else_is_refused(ptype, endpoint, says):
    why = check_provider_endpoint(ptype, endpoint)
    assert why is not None and says in why


@pytest.mark.parametrize(("ptype", "endpoint"), [
    ("vsphere", "https://admin:hunter2secret@vcenter.example.com/sdk"),
    ("proxmox", "https://root%40pam:hunter2secret@pve.example.com:8006"),
    ("libvirt", "qemu+ssh://root:hunter2secret@kvm1/system"),
    ("libvirt", "qemu+tls://root:hunter2secret@kvm1/system"),
    ("libvirt", "qemu+ssh://root:hunter2secret/x?y#z@kvm1/system"),  # a password that parsers read as a path
    ("libvirt", "qemu+ext://root:hunter2secret@kvm1/system?command=/x"),
    ("vsphere", "https://admin:hunter2secret@vcenter.example.com:bad/sdk"),
])
def test_credentials_in_userinfo_are_refused_and_never_shown(ptype, endpoint):
    why = check_provider_endpoint(ptype, endpoint)
    assert why is not None
    assert "hunter2secret" not in why
    assert "admin" not in why and "root" not in why


def test_a_bare_ssh_user_is_fine_only_for_ssh():
    assert check_provider_endpoint("libvirt", "qemu+ssh://migrator@kvm1/system") is None
    assert "credentials" in check_provider_endpoint("libvirt", "qemu+tls://migrator@kvm1/system")
    assert "credentials" in check_provider_endpoint("vsphere", "https://migrator@vc.example.com/sdk")


def test_query_values_are_never_echoed():
    why = check_provider_endpoint("libvirt", "qemu+ssh://kvm1/system?password=hunter2secret")
    assert "password" in why and "hunter2secret" not in why


def test_redact():
    assert redact("https://user:pw@host:8006/x") == "https://***@host:8006/x"
    assert redact("https://user:p/w@host/x") == "https://***@host/x"
    assert redact("qemu:///system") == "qemu:///system"
    assert redact("user:pw@host") == "***@host"
    assert redact_text("GET http://u:pw@h/x failed; see https://h2/y") == "GET http://***@h/x failed; see https://h2/y"


@pytest.mark.parametrize("endpoint", [
    "qemu+ssh://root@169.254.169.254/system",
    "qemu+tls://[fd00:ec2::254]/system",
    "https://100.100.100.200/sdk",
    "qemu+ssh://[64:ff9b::a9fe:a9fe]/system",
])
def test_provider_hosts_go_through_the_address_policy(endpoint):
    with pytest.raises(AddressRefused) as info:
        check_provider_address(endpoint, policy=AddressPolicy(allow_loopback=True))
    assert info.value.field == "spec.endpoint"


def test_loopback_provider_host_needs_allow_loopback(monkeypatch):
    monkeypatch.delenv("VMMIGRATION_ALLOW_LOOPBACK", raising=False)
    with pytest.raises(AddressRefused, match="Provider endpoint host 'localhost' resolves to"):
        check_provider_address("qemu+ssh://root@localhost:2222/system")
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    assert "127.0.0.1" in check_provider_address("qemu+ssh://root@localhost:2222/system")


def test_local_uris_have_no_host_to_check():
    assert check_provider_address("qemu:///system", policy=AddressPolicy()) == []


def test_names_are_resolved_only_when_asked():
    assert check_provider_address("qemu+ssh://kvm1.invalid/system", resolve=False) == []
    with pytest.raises(Exception, match="does not resolve"):
        check_provider_address("qemu+ssh://kvm1.invalid/system")


# --- wired into Provider resolution ----------------------------------------------------------------

def _inventory(endpoint: str) -> BundleInventory:
    return BundleInventory({("Provider", "infra", "kvm"): {
        "kind": "Provider", "metadata": {"name": "kvm", "namespace": "infra"},
        "spec": {"type": "libvirt", "endpoint": endpoint}}})


@pytest.mark.parametrize("where", ["spec.targetProviderRef", "spec.sourceName"])
def test_bad_endpoint_is_a_field_error_naming_spec_endpoint(where):
    with pytest.raises(SpecValidationError) as info:
        _provider(_inventory("qemu+ext:///system?command=/tmp/x"), "infra", "kvm", where)
    [error] = info.value.errors
    assert error.path == where
    assert error.message.startswith("Provider infra/kvm spec.endpoint: ")
    assert "qemu+ext" in error.message


def test_refused_address_is_a_field_error_too(monkeypatch):
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    with pytest.raises(SpecValidationError) as info:
        _provider(_inventory("qemu+ssh://root@169.254.169.254/system"), "infra", "kvm", "spec.targetProviderRef")
    [error] = info.value.errors
    assert error.path == "spec.targetProviderRef"
    assert error.message.startswith("Provider infra/kvm spec.endpoint: ")
    assert "metadata" in error.message


def test_password_never_reaches_the_field_error():
    with pytest.raises(SpecValidationError) as info:
        _provider(_inventory("qemu+ssh://root:hunter2secret@kvm1/system"), "infra", "kvm", "spec.sourceName")
    assert "hunter2secret" not in str(info.value)


def test_good_endpoint_resolves():
    assert _provider(_inventory("qemu+ssh://root@kvm1/system"), "infra", "kvm", "spec.sourceName").endpoint \
        == "qemu+ssh://root@kvm1/system"


def test_libvirt_driver_refuses_before_libvirt_runs_anything(tmp_path):
    from include.providers.libvirt_driver import LibvirtDriver

    marker = tmp_path / "ran"
    script = _marker_script(tmp_path, marker)
    driver = LibvirtDriver(f"qemu+ext:///system?command={script}")
    with pytest.raises(InvalidMigration, match="spec.endpoint: libvirt endpoint refused"):
        driver.check()
    assert not marker.exists()


def test_libvirt_driver_checks_the_address_before_connecting(monkeypatch):
    from include.providers.libvirt_driver import LibvirtDriver

    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    with pytest.raises(AddressRefused):
        LibvirtDriver("qemu+ssh://root@169.254.169.254/system?no_verify=1").check()


# --- the real command line must not run a Provider's command ----------------------------------------

def _marker_script(folder: Path, marker: Path) -> Path:
    script = folder / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    script.chmod(0o755)
    return script


def test_plan_never_runs_a_command_from_a_provider_endpoint(tmp_path):
    """Regression: ``qemu+ext:///system?command=`` used to pass validation, and ``plan`` connected,
    so libvirt ran the script."""
    marker = tmp_path / "ran"
    script = _marker_script(tmp_path, marker)
    store = tmp_path / "store"
    store.mkdir()
    world = DemoWorld(uri="qemu:///system", prefix="evil", root=tmp_path / "world")
    docs = store_documents(world, name="evil")
    for doc in docs:
        if doc["kind"] == "Provider":
            doc["spec"] = copy.deepcopy(doc["spec"])
            if doc["metadata"]["name"].endswith("source"):
                doc["spec"]["endpoint"] = f"qemu+ext:///system?command={script}"
    migration_file = store / "evil.yaml"
    migration_file.write_text(yaml.safe_dump_all(docs))
    env = {**os.environ, "VMMIGRATION_STORE": str(store), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "include", "plan", str(migration_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert not marker.exists(), "libvirt ran the Provider's command"
    assert proc.returncode != 0, proc.stdout
    assert "spec.endpoint" in proc.stderr
    assert "spec.sourceName" in proc.stderr
