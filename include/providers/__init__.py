"""Hypervisor drivers, chosen by a Provider's ``spec.type``."""

from __future__ import annotations

from include.errors import InvalidMigration
from include.inventory import ProviderInfo
from include.providers.base import DiskInfo, HypervisorDriver, TargetDisk, VMInfo

__all__ = ["DiskInfo", "HypervisorDriver", "TargetDisk", "VMInfo", "driver_for", "native_format"]

_NATIVE = {"libvirt": "qcow2", "qemu": "qcow2", "vsphere": "vmdk", "proxmox": "qcow2"}


def native_format(provider_type: str) -> str:
    return _NATIVE.get(provider_type, "qcow2")


def driver_for(provider: ProviderInfo) -> HypervisorDriver:
    """A driver connected lazily to ``provider`` (nothing is opened until first use)."""
    if provider.type in ("libvirt", "qemu"):
        from include.providers.libvirt_driver import LibvirtDriver

        return LibvirtDriver.for_provider(provider.endpoint, provider.credentials)
    raise InvalidMigration(f"provider type {provider.type!r} is not supported yet", field="spec.targetProviderRef")
