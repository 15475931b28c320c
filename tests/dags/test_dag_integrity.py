"""The dags folder parses without errors and follows the project's DAG policy (bench/parse_bench.py
measures how fast)."""

from __future__ import annotations

from pathlib import Path

import yaml

from include.demo import DemoWorld, store_documents

ROOT = Path(__file__).resolve().parents[2]


def _bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def _write_specs(store: Path, count: int) -> None:
    world = DemoWorld(uri="qemu:///system", prefix="parse", root=store.parent)
    for i in range(count):
        docs = store_documents(world, name=f"vm-{i:03d}", namespace="wave1" if i % 2 else "default")
        (store / f"vm-{i:03d}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))


def test_no_import_errors_and_policy(store):
    _write_specs(store, 3)
    (store / "broken.yaml").write_text(yaml.safe_dump({
        "apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
        "metadata": {"name": "broken", "namespace": "default"}, "spec": {"sourceName": "x"}}))
    bag = _bag()
    assert bag.import_errors == {}
    # the invalid spec still gets its DAG: its Validating task is where it fails, naming the fields
    assert "vmmigration__default__broken" in bag.dags
    assert {"vmmigration__default__vm-000", "vmmigration__wave1__vm-001"} <= set(bag.dags)
    for dag_id, dag in bag.dags.items():
        assert dag.tags and "vmmigration" in dag.tags, dag_id
        assert dag.schedule is None or str(dag.timetable.summary) == "None"
        if not dag_id.startswith("vmmigration__"):  # the form DAG (tests/dags/test_request_dag.py)
            continue
        ids = {t.task_id for t in dag.tasks}
        assert {"validate_migration", "snapshot_vm", "disk.export_disk", "disk.transfer_disk", "disk.convert_disk",
                "disk.import_disk", "create_vm", "validate_target", "finalize_migration"} <= ids, dag_id
        for t in dag.tasks:
            if t.task_id.startswith("disk."):
                # each task waits in its hypervisor's or storage's pool (include.registry); a spec whose
                # Providers do not resolve fails in Validating, its tasks wait in Airflow's default pool
                want = {"disk.export_disk": "libvirt_io", "disk.transfer_disk": "nfs_transfer",
                        "disk.import_disk": "libvirt_io"}.get(t.task_id, "default_pool")
                if dag_id.endswith("broken"):
                    want = "default_pool"
                assert t.pool == want, (dag_id, t.task_id, t.pool)
                # retryPolicy.maxAttempts of the demo spec; the guide's default 3 for the unparseable one
                assert t.retries == (3 if dag_id.endswith("broken") else 2), (dag_id, t.task_id, t.retries)
            if t.task_id == "finalize_migration":
                assert t.trigger_rule == "all_done"


def test_retry_policy_becomes_airflow_retries(store):
    world = DemoWorld(uri="qemu:///system", prefix="parse", root=store.parent)
    docs = store_documents(world, name="retry")
    docs[0]["spec"]["retryPolicy"] = {"maxAttempts": 5, "backoffDuration": "10m"}
    (store / "retry.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    dag = _bag().dags["vmmigration__default__retry"]
    task = dag.get_task("disk.transfer_disk")
    assert task.retries == 5
    assert task.retry_delay.total_seconds() == 600
    assert task.max_retry_delay.total_seconds() == 1800
    delays = [task.retry_policy.evaluate(RuntimeError("boom"), n, 5).retry_delay.total_seconds() for n in range(1, 6)]
    assert delays == [600, 1200, 1800, 1800, 1800]


def test_many_specs_each_get_their_dag(store):
    # how fast that is, is measured by bench/parse_bench.py (no wall-clock check in a unit test)
    _write_specs(store, 200)
    assert len([d for d in _bag().dags if d.startswith("vmmigration__")]) == 200


def test_store_problems_are_reported_as_an_import_error(store):
    _write_specs(store, 1)
    (store / "garbage.yaml").write_text("kind: VMMigration\nmetadata: [unclosed\n")
    (store / "dup.yaml").write_text((store / "vm-000.yaml").read_text())
    bag = _bag()
    errors = {Path(k).name: v for k, v in bag.import_errors.items()}
    assert set(errors) == {"vmmigration_store_check.py"}
    assert "garbage.yaml: not readable YAML" in errors["vmmigration_store_check.py"]
    assert "VMMigration default/vm-000 is also defined" in errors["vmmigration_store_check.py"]
    assert "vmmigration__default__vm-000" in bag.dags  # the good migration still has its DAG


def test_finalize_waits_for_every_task(store):
    """finalize_migration cleans up or rolls back: it must not start while any disk is still moving."""
    _write_specs(store, 1)
    dag = _bag().dags["vmmigration__default__vm-000"]
    finalize = dag.get_task("finalize_migration")
    upstream = finalize.get_flat_relative_ids(upstream=True)
    assert upstream == {t.task_id for t in dag.tasks} - {"finalize_migration"}
    # and directly on every per-disk leaf and phase, not only through validate_target
    direct = set(finalize.upstream_task_ids)
    assert {"validate_target", "create_vm", "disk.import_disk", "validate_migration", "snapshot_vm"} <= direct


def _spec_text(name: str, namespace: str = "default", **spec) -> str:
    body = {"sourceName": "src-vm", "targetProviderRef": {"name": "kvm-target"},
            "storage": {"type": "nfs", "path": "/mnt/share"}, **spec}
    return yaml.safe_dump({"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
                           "metadata": {"name": name, "namespace": namespace}, "spec": body}, sort_keys=False)


def test_one_bad_spec_never_takes_the_others_down(store):
    """Each of these used to make vmmigrations.py fail to import, and every migration's DAG disappeared."""
    from include.store import dag_id_for

    _write_specs(store, 1)
    (store / "slash.yaml").write_text(_spec_text("web/x"))
    (store / "newline.yaml").write_text(_spec_text("web\nx"))
    (store / "long-name.yaml").write_text(_spec_text("n" * 253))  # valid: 253 is Kubernetes' limit
    (store / "long-namespace.yaml").write_text(_spec_text("mig", namespace="s" * 95))
    (store / "huge-backoff.yaml").write_text(_spec_text("huge", retryPolicy={"backoffDuration": "99999999999h"}))
    (store / "latin1.yaml").write_bytes(_spec_text("latin", targetName="café").replace("\\xE9", "é")
                                        .encode("latin-1"))
    (store / "bomb.yaml").write_text("x: &a [1, 2]\ny: [*a, *a]\n" + _spec_text("bomb"))
    (store / "flip.yaml").write_text(_spec_text("flip", cleanupPolicy={"deleteSource": False})
                                     + "    deleteSource: true\n")
    bag = _bag()
    errors = {Path(k).name: v for k, v in bag.import_errors.items()}
    assert set(errors) == {"vmmigration_store_check.py"}, errors
    report = errors["vmmigration_store_check.py"]
    for expected in (f"{store / 'slash.yaml'}: a VMMigration was ignored: metadata.name 'web/x' is not a valid name",
                     f"{store / 'newline.yaml'}: a VMMigration was ignored: metadata.name 'web\\nx' is not a valid",
                     f"{store / 'long-namespace.yaml'}: VMMigration mig was ignored: metadata.namespace '{'s' * 59}",
                     f"{store / 'latin1.yaml'}: not UTF-8 text (byte 0xe9 on line",
                     f"{store / 'bomb.yaml'}: line 1: YAML anchors (&a) are not allowed",
                     f"{store / 'flip.yaml'}: line 15: duplicate key 'deleteSource' (spec.cleanupPolicy.deleteSource)"):
        assert expected in report, (expected, report)
    assert "vmmigration__default__vm-000" in bag.dags  # the good migration keeps its DAG
    long_id = dag_id_for("default", "n" * 253)
    assert len(long_id) <= 250 and long_id in bag.dags
    # an out-of-range duration is a spec error: the DAG exists (guide defaults) and Validating names the field
    huge = bag.dags["vmmigration__default__huge"]
    assert huge.get_task("disk.transfer_disk").retry_delay.total_seconds() == 300
    from include.store import SpecStore

    entry = SpecStore(store).entry("default", "huge")
    assert [str(e) for e in entry.error.errors] == [
        "spec.retryPolicy.backoffDuration: '99999999999h' is longer than the maximum 24h"]


def test_store_check_and_the_factory_agree(store):
    from include.store import SpecStore, dag_entries

    _write_specs(store, 2)
    (store / "slash.yaml").write_text(_spec_text("web/x"))
    (store / "dup.yaml").write_text((store / "vm-000.yaml").read_text())
    entries, problems = dag_entries(SpecStore(store).index())
    bag = _bag()
    assert {d for d in bag.dags if d.startswith("vmmigration__")} == {e.dag_id for e in entries}
    report = next(iter(bag.import_errors.values()))
    assert all(p in report for p in problems) and len(problems) == 2
