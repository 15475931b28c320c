"""One DAG per VMMigration in the spec store (``$VMMIGRATION_STORE``): ``vmmigration__<namespace>__<name>``
(shortened with a hash when that passes Airflow's 250 characters, see ``include.store.dag_id_for``).

Parsing reads local YAML only (no network). Each DAG runs the guide's phases in order; the per-disk
phases run as a task group mapped over the VM's disks, each map index labelled with the disk name.
One bad spec never takes the others down: ``include.store.dag_entries`` leaves out what cannot become
a DAG, and vmmigration_store_check.py reports it (the same call) as its import error.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

from airflow.sdk import DAG, Asset, get_parsing_context, task, task_group

from include import registry
from include.inventory import BundleInventory, provider_types
from include.spec import RetryPolicy
from include.store import (
    DAG_ID_PREFIX,
    STORE_QUEUE_ENV,
    SpecEntry,
    SpecStore,
    dag_entries,
    dag_id_for,
    retry_settings,
)
from operators.cleanup import FinalizeMigrationOperator
from operators.convert import ConvertDiskOperator
from operators.create import CreateVMOperator
from operators.export import ExportDiskOperator
from operators.import_disk import ImportDiskOperator
from operators.snapshot import SnapshotVMOperator
from operators.transfer import TransferDiskOperator
from operators.validate import ValidateMigrationOperator
from operators.validate_target import ValidateTargetOperator

log = logging.getLogger(__name__)
STORE = SpecStore()
TASKS_TEST = sys.argv[1:3] == ["tasks", "test"]
MAX_PARALLEL_DISKS = 4
#: the executor queue of Validating: a worker beside the spec store (the others may have none)
STORE_QUEUE = os.environ.get(STORE_QUEUE_ENV) or None


def _default_args(policy: RetryPolicy, shaped_for: tuple[str, str] | None = None) -> dict:
    # retryPolicy -> Airflow retries; MigrationRetryPolicy (below) makes the delays exact.
    from operators.retry import MigrationRetryPolicy

    return {
        **retry_settings(policy),
        "retry_exponential_backoff": 2.0,
        "retry_policy": MigrationRetryPolicy(policy.backoff_seconds, policy.max_backoff_seconds,
                                             from_run_state=shaped_for),
        "execution_timeout": timedelta(hours=12),
    }


def build_dag(entry, inventory=None) -> DAG:
    ns, name = entry.namespace, entry.name
    policy = entry.migration.spec.retryPolicy if entry.migration else RetryPolicy()
    # every task waits in the pool of the hypervisor or storage it works on (include.registry)
    source_type, target_type = (provider_types(entry.migration, inventory)
                                if entry.migration and inventory is not None else (None, None))
    source_pool, target_pool = registry.provider_pool(source_type), registry.provider_pool(target_type)
    transfer_pool = registry.storage_pool(entry.migration.spec.storage.type if entry.migration else None)
    common = {"namespace": ns, "migration_name": name}
    display, description = _what_moves(entry, inventory)
    with DAG(
        dag_id=entry.dag_id,
        dag_display_name=display,
        description=description,
        schedule=None,
        catchup=False,
        max_active_runs=1,
        default_args=_default_args(policy, None if entry.migration else (ns, name)),
        tags=["vmmigration", f"namespace:{ns}"],
        doc_md=f"Migration **{ns}/{name}** from `{entry.path.name}`. Status: "
               f"`python -m include status {ns}/{name}`.",
    ) as dag:
        # with $VMMIGRATION_STORE_QUEUE, Validating runs beside the spec store and keeps what the later tasks need
        # in the run state: the workers of the other queues need no store (include.phases.context.keep_documents)
        validate = ValidateMigrationOperator(task_id="validate_migration", **common,
                                             **({"queue": STORE_QUEUE} if STORE_QUEUE else {}))
        snapshot = SnapshotVMOperator(task_id="snapshot_vm", pool=source_pool, **common)

        @task(task_id="list_disks", retries=0)
        def list_disks(namespace: str, migration_name: str) -> list[str]:
            """The planned disks, read back from the plan Validating saved."""
            return SpecStore().planned_disk_names(namespace, migration_name) or []

        @task_group(group_id="disk")
        def per_disk(disk_name: str) -> None:
            kw = {**common, "disk_name": disk_name, "max_active_tis_per_dagrun": MAX_PARALLEL_DISKS}
            (ExportDiskOperator(task_id="export_disk", pool=source_pool, **kw)
             >> TransferDiskOperator(task_id="transfer_disk", pool=transfer_pool, **kw)
             >> ConvertDiskOperator(task_id="convert_disk", pool="default_pool", **kw)
             >> ImportDiskOperator(task_id="import_disk", pool=target_pool, **kw))

        # The disks come from the plan Validating saved, through list_disks. `airflow tasks test` runs
        # one task in a temporary run that has no upstream XCom, so there (and only there: a scheduler
        # must never see the DAG change shape mid-run) the saved plan's list is used as a literal.
        disk_list = list_disks(ns, name)
        planned = STORE.planned_disk_names(ns, name) if TASKS_TEST else None
        disks = per_disk.expand(disk_name=planned if planned else disk_list)
        create = CreateVMOperator(task_id="create_vm", pool=target_pool, **common)
        check = ValidateTargetOperator(task_id="validate_target", **common)
        finish = FinalizeMigrationOperator(task_id="finalize_migration", outlets=[Asset("migrated_vms")], retries=0,
                                           **common)
        validate >> snapshot >> disk_list >> disks >> create >> check >> finish
        # finalize waits for every task, so that no disk is still moving when it cleans up or rolls back
        [validate, snapshot, disk_list, disks, create] >> finish
    return dag


def _what_moves(entry, inventory) -> tuple[str, str]:
    """The DAG's display name and description: which VM goes where (``demo-vm → demo-vm-migrated``)."""
    if entry.migration is None:
        return entry.dag_id, f"VMMigration {entry.key}"
    spec = entry.migration.spec
    vm = (inventory.get("VirtualMachine", spec.sourceNamespace, spec.sourceName) if inventory is not None
          else None) or {}
    ref = (vm.get("spec") or {}).get("providerRef") or {} if isinstance(vm.get("spec"), dict) else {}
    source = ref.get("name") if isinstance(ref, dict) and isinstance(ref.get("name"), str) else "?"
    return (f"{spec.sourceName} → {spec.targetName}",
            f"VMMigration {entry.key}: VM {spec.sourceNamespace}/{spec.sourceName} on Provider {source} → "
            f"{spec.targetName} on Provider {spec.targetProviderRef.namespace}/{spec.targetProviderRef.name}, "
            f"through {spec.storage.type} storage")


_wanted = get_parsing_context().dag_id

def _index_for(dag_id: str | None):
    """The store as this parse needs it: all of it for the dag-processor; for a worker running one task
    of a validated migration, only that migration's own spec files (recorded in its plan), so that a
    task's start-up does not grow with the store."""
    ns, _, name = (dag_id or "").removeprefix(DAG_ID_PREFIX).partition("__")
    if dag_id and dag_id.startswith(DAG_ID_PREFIX) and name and dag_id_for(ns, name) == dag_id:
        index = STORE.own_index(ns, name)
        if index is not None:
            return index
    return STORE.index()


def _shape_only(dag_id: str | None):
    """For a worker asked to run a task of ``dag_id`` that its own store does not hold (a run the Kubernetes
    watcher started, on a worker that shares no disk with the dag-processor: its spec comes from the cluster
    and the run state, see include.phases.context): the pipeline's shape, the same tasks, from the id alone.
    None when the id is not a migration's (or is a shortened one, which does not name its migration)."""
    ns, _, name = (dag_id or "").removeprefix(DAG_ID_PREFIX).partition("__")
    if not (dag_id and dag_id.startswith(DAG_ID_PREFIX) and name and dag_id_for(ns, name) == dag_id):
        return None
    return SpecEntry(namespace=ns, name=name, path=STORE.root / f"{dag_id}.yaml", doc={})


_index = _index_for(_wanted)
_entries, _problems = dag_entries(_index)  # the problems are vmmigration_store_check.py's import error
_inventory = BundleInventory(_index.objects)
for _entry in _entries:
    if _wanted is None or _wanted == _entry.dag_id:
        try:
            globals()[_entry.dag_id] = build_dag(_entry, _inventory)
        except Exception:  # noqa: BLE001 - dag_entries checks what a spec can break; this is the last guard
            log.exception("VMMigration %s from %s: its DAG could not be built", _entry.key, _entry.path)
if _wanted is not None and _wanted not in globals() and (_shape := _shape_only(_wanted)) is not None:
    globals()[_wanted] = build_dag(_shape)
