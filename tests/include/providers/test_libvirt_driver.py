"""include/providers/libvirt_driver.py: XML built as a tree (no value can inject an attribute or element, on a
real libvirtd), which URIs are local, and the SSH key from a Provider's Secret."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET

import pytest

from include.errors import TargetCreationError
from include.providers.base import TargetDisk
from include.providers.libvirt_driver import LibvirtDriver, connection_uri, is_local_uri
from include.spec import NetworkHint

EVIL_NETWORK = "default' portgroup='evil-vlan"
EVIL_BRIDGE = 'virbr0"/><interface type="bridge"><source bridge="evil"/></interface><x a="'


@pytest.fixture
def driver(libvirt_uri):
    d = LibvirtDriver(libvirt_uri)
    yield d
    d.close()


def _undefine(driver: LibvirtDriver, name: str) -> None:
    import libvirt

    try:
        driver.conn.lookupByName(name).undefine()
    except libvirt.libvirtError:
        pass


@pytest.mark.parametrize(("hint", "attr", "value"), [
    (NetworkHint(name="eth0", network=EVIL_NETWORK), "network", EVIL_NETWORK),
    (NetworkHint(name="eth0", bridge=EVIL_BRIDGE), "bridge", EVIL_BRIDGE),
])
def test_quotes_in_a_network_hint_stay_in_its_value(driver, hint, attr, value):
    name = f"xmltest-{uuid.uuid4().hex[:8]}"
    try:
        try:
            driver.define_vm(name, 1, 64, [], [hint])
        except TargetCreationError:
            assert driver.vm_id(name) is None  # refused cleanly by libvirt: nothing defined
            return
        root = ET.fromstring(driver.conn.lookupByName(name).XMLDesc(0))
        interfaces = root.findall("./devices/interface")
        assert len(interfaces) == 1
        source = interfaces[0].find("source")
        assert source is not None
        assert source.get(attr) == value
        assert "portgroup" not in source.attrib
        assert root.find(".//x") is None
    finally:
        _undefine(driver, name)


def test_quotes_and_markup_in_disk_fields_stay_in_their_values(driver):
    name = f"xmltest-{uuid.uuid4().hex[:8]}"
    disk = TargetDisk(name="vda", pool="pool' type='evil", volume="vol<devices/>&amp;", format="qcow2", capacity=1)
    try:
        try:
            driver.define_vm(name, 1, 64, [disk], [])
        except TargetCreationError:
            assert driver.vm_id(name) is None
            return
        root = ET.fromstring(driver.conn.lookupByName(name).XMLDesc(0))
        [source] = root.findall("./devices/disk/source")
        assert source.get("pool") == "pool' type='evil" and source.get("volume") == "vol<devices/>&amp;"
        assert root.find("./devices/disk").get("type") == "volume"
    finally:
        _undefine(driver, name)


def test_a_name_with_markup_is_one_name(driver):
    name = f"xmltest-{uuid.uuid4().hex[:8]}</name><name>other"
    try:
        try:
            driver.define_vm(name, 1, 64, [], [])
        except TargetCreationError:
            return
        assert driver.conn.lookupByName(name).name() == name
    finally:
        _undefine(driver, name)


def test_characters_xml_cannot_hold_are_refused_before_libvirt(driver):
    with pytest.raises(TargetCreationError, match="XML cannot carry"):
        driver.define_vm("xmltest-ctl", 1, 64, [], [NetworkHint(name="eth0", network="default\x00x")])


def test_snapshot_and_volume_xml_are_trees_too():
    from include.providers import libvirt_driver

    assert not hasattr(libvirt_driver, "escape")  # saxutils.escape leaves quotes alone: no longer used
    el = ET.Element("domainsnapshot")
    libvirt_driver._sub(el, "disk", name="vda' snapshot='external", snapshot="internal")
    back = ET.fromstring(libvirt_driver._to_xml(el))
    assert back.find("disk").attrib == {"name": "vda' snapshot='external", "snapshot": "internal"}


@pytest.mark.parametrize(("uri", "local"), [
    ("qemu:///system", True),
    ("qemu+unix:///system?socket=/run/libvirt/libvirt-sock", True),
    ("qemu://kvm-host1/system", False),  # libvirt over TLS to another host, even if the same path exists here
    ("qemu+ssh://root@kvm-host1/system", False),
    ("qemu+tcp://127.0.0.1/system", False),
])
def test_only_a_hostless_qemu_uri_is_local(uri, local):
    assert is_local_uri(uri) is local


def test_ssh_key_goes_to_a_private_file_named_in_the_uri(tmp_path):
    import os

    uri, keyfile = connection_uri("qemu+ssh://root@h/system", {"ssh-privatekey": "-----KEY-----"})
    try:
        assert f"keyfile={keyfile}" in uri
        assert oct(os.stat(keyfile).st_mode & 0o777) == "0o600"
    finally:
        os.unlink(keyfile)
    assert connection_uri("qemu:///system", {"ssh-privatekey": "k"}) == ("qemu:///system", None)


def test_each_nic_gets_the_model_mapped_from_the_source(driver):
    """define_vm gives each network its planned model: QEMU's own stay (an e1000 guest keeps its driver),
    another hypervisor's paravirtual NIC becomes virtio; describe_vm reads the models back."""
    name = f"nictest-{uuid.uuid4().hex[:8]}"
    hints = [NetworkHint(name="eth0", network="default"), NetworkHint(name="eth1", network="default"),
             NetworkHint(name="eth2", network="default")]
    try:
        vm_id = driver.define_vm(name, 1, 64, [], hints, nic_models=["e1000", "vmxnet3"])
        models = [nic.model for nic in driver.describe_vm(vm_id).interfaces]
        assert models == ["e1000", "virtio", "virtio"]
    finally:
        _undefine(driver, name)


def test_serial_lines_keep_a_panic_above_the_tail():
    from include.providers.libvirt_live import last_lines

    text = "\x1b[2Jboot\r\n" + "Kernel panic - not syncing: VFS\r\n" + "".join(f"line {i}\r\n" for i in range(30))
    out = last_lines(text, n=5)
    assert out.splitlines() == ["Kernel panic - not syncing: VFS", "...", "line 25", "line 26", "line 27", "line 28",
                                "line 29"]
    assert "\x1b" not in last_lines("\x1b[1;31mred\x1b[0m")
