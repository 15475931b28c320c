"""Hypervisor drivers, chosen by a Provider's ``spec.type`` through ``include.registry``."""

from __future__ import annotations

from include.inventory import ProviderInfo
from include.providers.base import DiskInfo, HypervisorDriver, TargetDisk, VMInfo

__all__ = ["DiskInfo", "HypervisorDriver", "TargetDisk", "VMInfo", "driver_for"]


def driver_for(provider: ProviderInfo) -> HypervisorDriver:
    """A driver connected lazily to ``provider`` (nothing is opened until first use)."""
    from include import registry

    driver = registry.provider(provider.type).driver_class().for_provider(provider.endpoint, provider.credentials)
    driver.configure(provider)
    return driver
