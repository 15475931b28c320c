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


def test_cleanup_follows_the_validated_plan_not_a_spec_edited_mid_run(store, world):
    """A spec edited after Validating (deleteSource switched on, deleteIntermediate off) changes nothing
    for the run under way: cleanup does what the validated plan said."""
    create_source_vm(world)
    docs = store_documents(world, name="edited", target_format="qcow2")
    path = write_store(store, "edited.yaml", docs)
    ctx = phases.MigrationContext("default", "edited", store=SpecStore(store))
    phases.validate(ctx)
    phases.snapshot(ctx)
    for disk in ("vda", "vdb"):
        for step in (phases.export_disk, phases.transfer_disk, phases.convert_disk, phases.import_disk):
            step(ctx, disk)
    phases.create_vm(ctx)
    phases.validate_target(ctx)
    docs[0]["spec"]["cleanupPolicy"] = {"deleteIntermediate": False, "deleteSnapshot": False, "deleteSource": True}
    write_store(store, path.name, docs)
    fresh = phases.MigrationContext("default", "edited", store=SpecStore(store))
    phases.finalize(fresh, succeeded=True)
    conn = world.conn()
    try:
        assert world.vm_name in [d.name() for d in conn.listAllDomains(0)]  # the source stays
        assert conn.lookupByName(world.vm_name).snapshotListNames(0) == []  # the plan said delete it
    finally:
        conn.close()
    assert not [p for p in world.share.rglob("*") if p.is_file()]  # the plan said delete intermediates
