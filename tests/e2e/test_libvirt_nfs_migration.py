"""Whole migrations libvirt -> NFS folder -> libvirt with ``dag.test()``, on a real libvirtd.

Data is checked by content (qemu-img compare against the source volumes), the target domain by its
XML, the status by the phases it went through, cleanup by what is left on disk and in libvirt.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from include import diskio
from include.demo import create_source_vm, store_documents, write_store
from include.status import Phase
from include.store import FileStatusSink, SpecStore
from tests.e2e.helpers import load_dag, run_migration, task_states, unknown_status_fields

pytestmark = pytest.mark.e2e

PHASES_IN_ORDER = [p.value for p in Phase if p not in (Phase.PENDING, Phase.FAILED)]


def volume_path(world, pool: str, name: str) -> str:
    conn = world.conn()
    try:
        return conn.storagePoolLookupByName(pool).storageVolLookupByName(name).path()
    finally:
        conn.close()


def test_migrates_two_disk_vm_and_converts_to_raw(airflow_db, store, world):
    create_source_vm(world, vdb_format="qcow2")
    docs = store_documents(world, name="twodisk", target_format="raw", bridge="virbr0", cpu=2, memory=512)
    write_store(store, "twodisk.yaml", docs)
    source_paths = {d: str(world.root / "pools" / "src" / f"{world.vm_name}-{d}.qcow2") for d in ("vda", "vdb")}

    dagrun = run_migration("vmmigration__default__twodisk")

    states = task_states(dagrun)
    assert str(dagrun.state) == "success", states
    status = FileStatusSink(SpecStore(store)).get("default", "twodisk")
    assert status["phase"] == "Ready"
    assert status["progress"] == 100
    assert [h["phase"] for h in status["phaseHistory"]] == PHASES_IN_ORDER
    assert unknown_status_fields(status) == []  # what the Kubernetes status writer will send fits the CRD
    done = {c["type"] for c in status["conditions"] if c["status"] == "True"}
    assert {"Validated", "Snapshotted", "Exported", "Transferred", "Converted", "Imported", "Created",
            "TargetValidated", "Ready"} <= done

    # Data: every target volume has the guest-visible content of its source.
    target = f"{world.vm_name}-migrated"
    for disk, src in source_paths.items():
        dst = volume_path(world, world.target_pool, f"{target}-{disk}.raw")
        assert diskio.image_info(dst)["format"] == "raw"
        assert diskio.compare(src, dst, "qcow2", "raw"), f"{disk} differs from its source"
        entry = next(d for d in status["disks"] if d["name"] == disk)
        assert entry["sourceFormat"] == "qcow2" and entry["targetFormat"] == "raw"
        assert len(entry["sha256"]) == 64
        assert entry["targetVolume"] == f"{world.target_pool}/{target}-{disk}.raw"
        # sparse stays sparse: the raw target holds about what the source allocated, not its full size
        assert diskio.allocated_bytes(dst) < entry["sizeBytes"]
        # progress counted the data that moved, with the virtual size beside it; the sha256 was checked
        assert entry["virtualBytes"] == entry["sizeBytes"] and 0 < entry["bytesTotal"] < entry["virtualBytes"]
        assert entry["bytesDone"] == entry["bytesTotal"] and entry["checksum"] == "verified"
    # the run summary: per disk what it is and what moved, and the totals
    summary = status["summary"]
    assert summary["phase"] == "Ready" and [d["name"] for d in summary["disks"]] == ["vda", "vdb"]
    for d in summary["disks"]:
        entry = next(e for e in status["disks"] if e["name"] == d["name"])
        assert (d["virtualBytes"], d["bytesMoved"], d["checksum"]) == (entry["sizeBytes"], entry["sentBytes"],
                                                                        "verified")
        assert 0 < d["allocatedBytes"] < d["virtualBytes"] and d["seconds"] is not None
    assert summary["bytesMoved"] == sum(d["bytesMoved"] for d in summary["disks"]) > 0
    # the DAG says what moves where
    dag = load_dag("vmmigration__default__twodisk")
    assert dag.dag_display_name == f"{world.vm_name} → {target}"
    assert "through nfs storage" in dag.description

    # The target domain has the requested resources and bridge.
    conn = world.conn()
    try:
        dom = conn.lookupByName(target)
        root = ET.fromstring(dom.XMLDesc(0))
        assert int(root.findtext("vcpu")) == 2
        assert int(root.find("memory").text) == 512 * 1024  # KiB
        bridges = [s.get("bridge") for s in root.findall("./devices/interface/source")]
        assert bridges == ["virbr0"]
        assert [t.get("dev") for t in root.findall("./devices/disk/target")] == ["vda", "vdb"]
        # Cleanup: the snapshot is gone, the source VM is kept (deleteSource: false).
        src = conn.lookupByName(world.vm_name)
        assert src.snapshotListNames(0) == []
    finally:
        conn.close()
    assert not any(p.is_file() for p in world.share.rglob("*")), list(world.share.rglob("*"))
    assert all(Path(p).exists() for p in source_paths.values())


def test_raw_source_is_converted_before_upload_and_has_no_snapshot(airflow_db, store, world):
    create_source_vm(world, vdb_format="raw")
    write_store(store, "rawsrc.yaml", store_documents(world, name="rawsrc", target_format="qcow2"))

    dagrun = run_migration("vmmigration__default__rawsrc")

    assert str(dagrun.state) == "success", task_states(dagrun)
    status = FileStatusSink(SpecStore(store)).get("default", "rawsrc")
    assert status["phase"] == "Ready"
    snap = next(c for c in status["conditions"] if c["type"] == "Snapshotted")
    assert "No snapshot" in snap["message"]
    target = f"{world.vm_name}-migrated"
    src_vdb = world.root / "pools" / "src" / f"{world.vm_name}-vdb.raw"
    dst_vdb = volume_path(world, world.target_pool, f"{target}-vdb.qcow2")
    assert diskio.image_info(dst_vdb)["format"] == "qcow2"
    assert diskio.compare(src_vdb, dst_vdb, "raw", "qcow2")
    src_vda = world.root / "pools" / "src" / f"{world.vm_name}-vda.qcow2"
    dst_vda = volume_path(world, world.target_pool, f"{target}-vda.qcow2")
    assert diskio.compare(src_vda, dst_vda, "qcow2", "qcow2")


def test_zstd_compression_is_opt_in_and_lossless(airflow_db, store, world):
    create_source_vm(world)
    docs = store_documents(world, name="zstd", target_format="raw")
    docs[0]["metadata"]["annotations"] = {"vmmigration.virtrigaud.io/compression": "zstd"}
    docs[0]["spec"]["cleanupPolicy"]["deleteIntermediate"] = False  # keep the objects to look at them
    write_store(store, "zstd.yaml", docs)
    dagrun = run_migration("vmmigration__default__zstd")
    assert str(dagrun.state) == "success", task_states(dagrun)
    import json

    (manifest_file,) = (world.share / "default" / "zstd").glob("vda.*.manifest.json")
    manifest = json.loads(manifest_file.read_text())
    assert manifest["compression"] == "zstd"
    assert manifest["storedBytes"] < manifest["size"]
    target = f"{world.vm_name}-migrated"
    for disk in ("vda", "vdb"):
        src = world.root / "pools" / "src" / f"{world.vm_name}-{disk}.qcow2"
        assert diskio.compare(src, volume_path(world, world.target_pool, f"{target}-{disk}.raw"), "qcow2", "raw")


def test_delete_source_after_the_target_validated(airflow_db, store, world):
    create_source_vm(world)
    docs = store_documents(world, name="delsrc", target_format="qcow2")
    docs[0]["spec"]["cleanupPolicy"]["deleteSource"] = True
    write_store(store, "delsrc.yaml", docs)
    src_files = list((world.root / "pools" / "src").glob(f"{world.vm_name}-*"))
    assert len(src_files) == 2
    dagrun = run_migration("vmmigration__default__delsrc")
    assert str(dagrun.state) == "success", task_states(dagrun)
    conn = world.conn()
    try:
        names = [d.name() for d in conn.listAllDomains(0)]
        assert world.vm_name not in names and f"{world.vm_name}-migrated" in names
    finally:
        conn.close()
    assert not any(p.exists() for p in src_files)  # the source's disks went with it
