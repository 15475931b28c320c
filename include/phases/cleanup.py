"""After the run: cleanupPolicy on success, rollback of what the run half-created on failure, and the
final Ready or Failed.

Every delete here acts on a ledger entry (what this migration recorded as created by itself), on the
endpoints and storage the validated plan pinned; nothing is found by name or prefix."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from include import safefs
from include import status as st
from include.bootcheck import DELETE_RUNNING
from include.claims import NameClaims
from include.errors import AlreadyMigrated, MigrationDeleted, NotFound, PlanChanged
from include.phases.checks import ensure_same_source
from include.phases.context import MigrationContext, host_scope
from include.phases.source import end_point_in_time
from include.status import Phase


def cleanup(ctx: MigrationContext, *, succeeded: bool, failure: str | None = None) -> dict[str, Any]:
    done: list[str] = []
    kept: list[str] = []
    ctx.cleaning = True
    plan = ctx.load_plan(required=False)
    if plan is None:  # failed in Validating: nothing but the name claim was taken
        _release_claims(ctx, done)
        return {"removed": done}
    policy = plan.cleanup  # as validated at the start of the run, whatever the spec says now
    ledger = ctx.ledger
    # a running source's point in time ends in every case (success, failure, a killed task's retry)
    try:
        done += end_point_in_time(ctx)
    except Exception as err:  # noqa: BLE001 - the rest of cleanup goes on; what is left is said
        ctx.logger.warning("cleanup: ending the point-in-time export of the source failed", exc_info=True)
        kept.append(f"the point-in-time export of VM {plan.source.vm} (ending it failed: {err}; it is still in "
                    f"the ledger, and the next cleanup tries again)")
    here = host_scope()
    for entry in ledger.entries("dir"):
        if entry.scope == here and entry.ident.get("role") == "staging":
            path = Path(entry.ident["path"])
            with _logged(ctx, f"removing staging folder {path}"):
                if os.path.lexists(path) and safefs.is_private_dir(path):
                    shutil.rmtree(path)  # our own 0700 folder: nobody else could put anything in it
                    done.append(f"staging folder {path}")
                ledger.forget(entry)
    if succeeded:
        with _logged(ctx, "handing the target over"):
            ctx.target_session.keep()  # what the target now holds is the migrated VM: never rolled back later
    else:
        with _logged(ctx, "rolling back the target"):
            done += ctx.target_session.rollback()
    if policy.delete_intermediate:
        objects = [e for e in ledger.entries("object") if e.scope == ctx.scope_storage]
        with _logged(ctx, "deleting intermediate files"):
            for entry in objects:
                ctx.storage.delete(entry.ident["key"])
                ledger.forget(entry)
                done.append(f"intermediate object {ctx.storage.location(entry.ident['key'])}")
            # folders this migration made on the share, deepest first, only if they are empty now
            folders = [e for e in ledger.entries("dir") if e.scope == ctx.scope_storage]
            for entry in sorted(folders, key=lambda e: -e.ident["key"].count("/")):
                if ctx.storage.remove_empty_dir(entry.ident["key"]):
                    done.append(f"empty folder {ctx.storage.location(entry.ident['key'])}")
                else:
                    kept.append(f"folder {ctx.storage.location(entry.ident['key'])} (not empty)")
                ledger.forget(entry)
    ours = ledger.find("snapshot", ctx.scope_source, vm=plan.source.vm_id, name=plan.snapshot.name)
    # a VMMigration deleted from the cluster has no next run to reuse or delete the snapshot: it goes now
    record = ctx.store.run_record(ctx.namespace, ctx.name)
    deleted = ((record.get("failure") or {}).get("reason") == MigrationDeleted.reason) and not succeeded
    if (succeeded or deleted) and policy.delete_snapshot and ours:
        with _logged(ctx, "deleting the snapshot"):
            ensure_same_source(ctx)
            if ctx.source.delete_snapshot(plan.source.vm, plan.snapshot.name):
                done.append(f"snapshot {plan.snapshot.name}")
            ledger.forget(ours)
    elif ours and not succeeded:
        ctx.logger.info("cleanup: snapshot %s kept after the failure, for rollback; the next successful run "
                        "deletes it", plan.snapshot.name)
    if succeeded and policy.delete_source:
        if not plan.source.vm_id:
            kept.append("the source VM (the plan has no id for it)")
        elif _running_now(ctx) and not (plan.source.running and policy.delete_running_source):
            # deleteSource never takes down a running VM unless the spec said so for a VM validated running
            kept.append(f"the source VM {plan.source.vm} (it is running; deleteSource deletes a running VM only "
                        f"with the annotation {DELETE_RUNNING}: \"true\")")
        else:
            volumes = [(d.source_pool, d.source_volume) for d in plan.disks if d.source_pool and d.source_volume]
            try:
                removed = ctx.source.delete_source_vm(plan.source.vm_id, volumes)  # type: ignore[arg-type]
                done += [f"{item} (deleteSource)" for item in removed]
            except PlanChanged as err:  # the source is not what was validated any more: kept, and said so
                ctx.logger.warning("cleanup: deleteSource skipped: %s", err)
                kept.append(f"the source VM {plan.source.vm} ({err})")
    _release_claims(ctx, done)
    for item in done:
        ctx.logger.info("cleanup: removed %s", item)
    for item in kept:
        ctx.logger.info("cleanup: kept %s", item)
    return {"removed": done, "kept": kept}


def _running_now(ctx: MigrationContext) -> bool:
    try:
        return ctx.source.get_vm(ctx.plan.source.vm).running
    except NotFound:
        return False


def _release_claims(ctx: MigrationContext, done: list[str]) -> None:
    claims = NameClaims.of(ctx.store)
    for entry in ctx.ledger.entries("claim"):
        with _logged(ctx, f"releasing the claim of {entry.ident['name']}"):
            if claims.release(entry.scope, entry.ident["name"], f"{ctx.namespace}/{ctx.name}"):
                done.append(f"claim of target name {entry.ident['name']}")
            ctx.ledger.forget(entry)


@contextlib.contextmanager
def _logged(ctx: MigrationContext, what: str) -> Iterator[None]:
    try:
        yield
    except Exception:  # noqa: BLE001 - cleanup goes on with the next item; the error is logged
        ctx.logger.warning("cleanup: %s failed", what, exc_info=True)


def _summary_disks(ctx: MigrationContext) -> list[dict[str, Any]]:
    """Per planned disk: its sizes from the plan and the bytes that went to the intermediate storage."""
    try:
        planned = ctx.plan.disks
    except Exception:  # noqa: BLE001 - no plan (Validating failed): nothing moved
        return []
    out = []
    for d in planned:
        rec = ctx.disk_record(d.name)
        out.append({"name": d.name, "virtualBytes": d.size_bytes, "allocatedBytes": d.allocated_bytes,
                    "bytesMoved": rec.sent_bytes or 0})
    return out


def finalize(ctx: MigrationContext, *, succeeded: bool, failure: str | None = None) -> dict[str, Any]:
    """Ready or Failed, with cleanup. A run of a cluster VMMigration that is gone by now (deleted after the
    target validated) is not handed over: it rolls back as on a failure, and deleteSource never runs.

    :raises AlreadyMigrated: the migration ended Ready and no Validating has run since (this run was refused):
        nothing is cleaned, rolled back or marked
    """
    from include.store import FileStatusSink

    record = ctx.store.run_record(ctx.namespace, ctx.name)
    if record.get("finalized") is True and (FileStatusSink(ctx.store).get(ctx.namespace, ctx.name) or {}).get(
            "phase") == "Ready":
        raise AlreadyMigrated(f"VMMigration {ctx.namespace}/{ctx.name} ended Ready in an earlier run and no "
                              f"Validating has run since: nothing to finalize, nothing was touched",
                              field="metadata.name")
    if succeeded and ctx.cluster_run is not None and ctx.cluster_present is not None:
        uid = ctx.cluster_run[0]
        if not ctx.cluster_present(ctx.namespace, ctx.name, uid):
            err = MigrationDeleted(f"the VMMigration {ctx.namespace}/{ctx.name} (uid {uid}) was deleted from the "
                                   f"cluster before the run ended: nothing is handed over, what the run created is "
                                   f"rolled back, and the source is not touched", field="metadata.uid")
            ctx.store.update_run_record(ctx.namespace, ctx.name, failure={
                "phase": Phase.VALIDATING_TARGET.value, "reason": err.reason, "message": str(err)})
            succeeded, failure, reason = False, str(err), err.reason
    else:
        reason = "MigrationFailed"
    result = cleanup(ctx, succeeded=succeeded, failure=failure)
    disks = _summary_disks(ctx)

    def summarize(s: dict[str, Any]) -> None:
        s["summary"] = st.run_summary(s, disks)

    if succeeded:
        tgt = ctx.plan.target

        def ready(s: dict[str, Any]) -> None:
            st.mark_ready(s, f"VM {tgt.vm} is ready on {tgt.provider}")
            summarize(s)

        written = ctx.update_status(ready)
    else:
        def mark(s: dict[str, Any]) -> None:
            if s.get("phase") != Phase.FAILED.value:
                phase = Phase(s["phase"]) if s.get("phase") in st.DONE_CONDITION else Phase.VALIDATING
                st.fail(s, phase, reason, failure or "a phase failed; see its task log")
            summarize(s)

        written = ctx.update_status(mark)
    summary = (written or {}).get("summary")
    if summary:
        ctx.logger.info("run summary of %s/%s (%s):\n%s", ctx.namespace, ctx.name, summary.get("phase"),
                        "\n".join(st.summary_lines(summary)))
        result["summary"] = summary
    # the run has ended: only now may the watcher remove a deleted VMMigration's mirror (and so its DAG)
    ctx.store.update_run_record(ctx.namespace, ctx.name, finalized=True)
    result["succeeded"] = succeeded
    result.setdefault("failure", failure)
    return result
