"""Validating: the spec, its references, the source VM, the target provider and pool, the storage;
claims the target name, then saves the plan every later phase keeps to."""

from __future__ import annotations

import dataclasses
from typing import Any

from include.bootcheck import DELETE_RUNNING, delete_running_from
from include.claims import NameClaims
from include.errors import AlreadyMigrated, InvalidMigration, NotFound
from include.phases.bookkeeping import begin, finish
from include.phases.checks import ensure_object_key_free
from include.phases.context import SPEC, MigrationContext
from include.plan import build_plan, describe
from include.status import Phase


def ensure_not_ready(ctx: MigrationContext) -> None:
    """Refuse a run of a migration that ended Ready, before anything is written (a migration moves its VM once;
    its status, summary, run state and VMs stay as they are). A cluster VMMigration made again under the same
    name (another uid) is another migration: the Ready of the one before does not stop it."""
    from include.store import FileStatusSink

    status = FileStatusSink(ctx.store).get(ctx.namespace, ctx.name) or {}
    if status.get("phase") != "Ready":
        return
    if ctx.cluster_run is not None:
        saved = ctx.store.state.read(ctx.namespace, ctx.name, SPEC) or {}
        if saved.get("uid") != ctx.cluster_run[0]:
            return
    raise AlreadyMigrated(f"VMMigration {ctx.namespace}/{ctx.name} ended Ready at {status.get('completionTime')}"
                          f" ({status.get('message') or 'its VM has moved'}); a migration moves its VM once, so "
                          f"this run does nothing and leaves its status as it is: to move the VM again, create a "
                          f"VMMigration of another name", field="metadata.name")


def validate(ctx: MigrationContext) -> dict[str, Any]:
    ensure_not_ready(ctx)
    ctx.validating = True
    begin(ctx, Phase.VALIDATING, message="Validating source VM and target provider")
    # the run's outcome is run state, not status: finalize decides from it, whatever sink shows the status;
    # reset first, so that no outcome of an earlier run outlives a Validating that fails early
    ctx.store.update_run_record(ctx.namespace, ctx.name, targetValidated=None, targetVm=None, failure=None,
                                finalized=None)
    ctx.store.clear_disk_records(ctx.namespace, ctx.name)
    ctx.store.delete_plan(ctx.namespace, ctx.name)  # a stale plan must not outlive its run
    migration = ctx.migration  # raises SpecValidationError naming every bad field
    resolved = ctx.resolved
    spec = migration.spec
    run = ctx.ledger.new_run()
    ctx.store.update_run_record(ctx.namespace, ctx.name, run=run)
    # Of two migrations validated at the same instant with one target name, exactly one gets the claim;
    # it is taken on the hypervisor's own identity, so two endpoints of one host share their names.
    claim_scope = f"{resolved.target.type}:{ctx.target.identity()}"
    # recorded first: a crash right after acquiring never strands the claim (release checks the holder)
    ctx.ledger.record("claim", claim_scope, name=spec.targetName)
    NameClaims.of(ctx.store).acquire(claim_scope, spec.targetName, migration.key, run)
    ctx.logger.info("source %s", ctx.source.check())
    try:
        vm = ctx.source.get_vm(resolved.source.provider_vm_id)
    except NotFound as err:
        raise NotFound(f"{err} (provider {resolved.source.provider.ref})", field="spec.sourceName") from err
    if vm.running:
        refusal = ctx.source.live_export_refusal(vm)
        if refusal:
            raise InvalidMigration(f"VM {vm.name} is running: {refusal}", field="spec.sourceName")
        if spec.cleanupPolicy.deleteSource and not delete_running_from(migration.annotations)[0]:
            raise InvalidMigration(
                f"VM {vm.name} is running, and deleteSource would delete a running VM once the target is validated; "
                f"set deleteSource: false, or say so explicitly with the annotation {DELETE_RUNNING}: \"true\"",
                field="spec.cleanupPolicy.deleteSource")
    if not vm.disks:
        raise InvalidMigration(f"VM {vm.name} has no disk to migrate", field="spec.sourceName")
    ctx.logger.info("target %s", ctx.target.check())
    pool = spec.targetStorageHint or ctx.target.default_storage()
    if not ctx.target.storage_exists(pool):
        raise NotFound(f"target storage {pool!r} does not exist on provider {resolved.target.ref}",
                       field="spec.targetStorageHint")
    # what later phases read instead of the whole store
    plan = dataclasses.replace(build_plan(resolved, vm, target_storage=pool), spec_files=tuple(ctx.spec_files()))
    # the target VM and every disk the plan would create are free, or this migration's own from a failed try
    session = ctx.open_target(plan)
    session.check_free(plan.disks)
    chosen = session.resolved_options()
    if chosen:  # pinned: later tasks act on these, not on what the target looks like then
        plan = dataclasses.replace(plan, target=dataclasses.replace(
            plan.target, options={**plan.target.options, **chosen}))
    ctx.logger.info("storage %s", ctx.storage.check())
    for d in plan.disks:
        ensure_object_key_free(ctx, d.object_key, plan.storage.scope)
    ctx.save_plan(plan)
    ctx.keep_documents(plan)  # for workers without the spec store ($VMMIGRATION_STORE_QUEUE)
    ctx.logger.info("plan:\n%s", describe(plan, ctx.storage.location(plan.storage.prefix)))

    def record_disks(s: dict[str, Any]) -> None:
        s["disks"] = [{"name": d.name, "sizeBytes": d.size_bytes, "sourceFormat": d.source_format,
                       "targetFormat": d.target_format, "transitFormat": d.transit_format} for d in plan.disks]
        s["dagId"] = plan.dag_id

    ctx.update_status(record_disks)
    running = " (running: exported live from one point in time)" if plan.snapshot.live else ""
    skipped = f"; not migrated: {'; '.join(vm.skipped)}" if vm.skipped else ""
    finish(ctx, Phase.VALIDATING, f"Source VM {vm.name}{running} ({len(vm.disks)} disks) and target provider "
                                  f"{resolved.target.ref} validated{skipped}")
    return {"disks": plan.disk_names}
