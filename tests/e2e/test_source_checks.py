"""Source disks the engine must refuse rather than copy wrongly, on the real libvirtd."""

from __future__ import annotations

import subprocess

import pytest

from include import phases
from include.demo import create_source_vm, store_documents, write_store
from include.errors import UnsupportedDiskFormat
from include.store import SpecStore

pytestmark = pytest.mark.e2e


def test_an_overlay_disk_is_refused_in_validating(store, world):
    create_source_vm(world)
    src = world.root / "pools" / "src"
    base = src / f"{world.vm_name}-vdb.qcow2"
    overlay = src / f"{world.vm_name}-vdb-overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)],
                   check=True)
    conn = world.conn()
    try:
        conn.storagePoolLookupByName(world.source_pool).refresh(0)
        dom = conn.lookupByName(world.vm_name)
        conn.defineXML(dom.XMLDesc(0).replace(str(base), str(overlay)))
    finally:
        conn.close()
    write_store(store, "overlay.yaml", store_documents(world, name="overlay"))
    ctx = phases.MigrationContext("default", "overlay", store=SpecStore(store))
    with pytest.raises(UnsupportedDiskFormat, match=f"disk vdb .* is an overlay on {base}"):
        phases.validate(ctx)
    assert SpecStore(store).load_plan("default", "overlay") is None  # nothing planned, nothing created
