"""include/registry.py: the one list of provider and storage types, and what is read from it."""

from __future__ import annotations

import pytest

from include import registry
from include.errors import InvalidMigration
from include.inventory import ProviderInfo
from include.spec import STORAGE_TYPES, StorageSpec


def test_every_entry_loads_its_code():
    for p in registry.PROVIDERS:
        assert p.driver_class().for_provider  # a driver class with the factory the pipeline calls
    for s in registry.STORAGES:
        assert callable(s.load_backend())


def test_storage_types_are_the_guides_enum():
    # the spec's enum is the contract; each of its types has a backend, and nothing more is offered
    assert set(registry.supported_storage_types()) == set(STORAGE_TYPES)


def test_drivers_and_backends_come_from_the_registry(tmp_path):
    from include.providers import driver_for
    from include.providers.libvirt_driver import LibvirtDriver
    from include.storage import backend_for
    from include.storage.nfs import NfsStorage

    info = ProviderInfo(name="p", namespace="ns", type="libvirt", endpoint="qemu:///system")
    assert isinstance(driver_for(info), LibvirtDriver)
    assert isinstance(backend_for(StorageSpec(type="nfs", path=str(tmp_path))), NfsStorage)


def test_an_unsupported_type_names_the_field():
    with pytest.raises(InvalidMigration, match=r"spec.targetProviderRef: provider type 'firecracker' is not supported"):
        registry.provider("firecracker")
    with pytest.raises(InvalidMigration, match=r"spec.storage.type: .*'ftp'"):
        registry.storage("ftp")


def test_a_new_provider_type_is_one_registry_line(monkeypatch):
    """What the next hypervisor adds: one entry; the inventory, the pools and the factories follow."""
    extra = registry.ProviderType("firecracker", driver="include.providers.libvirt_driver:LibvirtDriver",
                                  hook="hooks.libvirt_hook:LibvirtHook", connection_type="firecracker",
                                  native_format="raw")
    monkeypatch.setattr(registry, "PROVIDERS", (*registry.PROVIDERS, extra))
    assert "firecracker" in registry.supported_provider_types()
    assert registry.native_format("firecracker") == "raw"
    assert registry.provider_pool("firecracker") == "firecracker_io"
    assert registry.pools()["firecracker_io"]["slots"] > 0
    assert registry.provider_pool("no-such-type") == "default_pool"
