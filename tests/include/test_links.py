"""Links to a VM on its hypervisor's web UI, made from the plan's endpoint, name and id (no network)."""

from __future__ import annotations

import pytest

from include import registry


@pytest.mark.parametrize(("ptype", "endpoint", "name", "vm_id", "url"), [
    ("proxmox", "https://pve1.lab:8006/api2/json", "web", "pve1/104", "https://pve1.lab:8006/#v1:0:=qemu%2F104:4:::::::"),
    ("proxmox", "pve1.lab", "web", "pve1/104", "https://pve1.lab:8006/#v1:0:=qemu%2F104:4:::::::"),
    ("proxmox", "https://pve1.lab:8006", "web", None, "https://pve1.lab:8006/"),  # no id: the UI's start page
    ("proxmox", "https://[fd00::5]:8443", "web", "n/7", "https://[fd00::5]:8443/#v1:0:=qemu%2F7:4:::::::"),
    ("vsphere", "https://vc.lab/sdk", "web 01", "4210-aa", "https://vc.lab/ui/app/search?query=web%2001"),
])
def test_a_vm_link_per_hypervisor_with_a_web_ui(ptype, endpoint, name, vm_id, url):
    assert registry.has_web_ui(ptype)
    assert registry.vm_ui_url(ptype, endpoint, name, vm_id) == url


def test_libvirt_and_unknown_types_have_no_link():
    assert not registry.has_web_ui("libvirt") and not registry.has_web_ui("qemu") and not registry.has_web_ui(None)
    assert registry.vm_ui_url("libvirt", "qemu:///system", "web") is None
    assert registry.vm_ui_url("firecracker", "x", "web") is None


def test_an_endpoint_without_a_host_gives_no_link():
    assert registry.vm_ui_url("vsphere", "https://", "web") is None
    assert registry.vm_ui_url("proxmox", "https:///api2/json", "web", "n/1") is None


def test_a_vm_name_cannot_break_out_of_the_query():
    url = registry.vm_ui_url("vsphere", "https://vc.lab", 'a"b<c>&d=e#f')
    assert url == "https://vc.lab/ui/app/search?query=a%22b%3Cc%3E%26d%3De%23f"
