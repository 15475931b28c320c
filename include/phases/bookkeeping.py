"""Status bookkeeping and error policy shared by every phase: entering and completing a phase (per
disk too), recording a failure, the run's outcome, and which errors are permanent.

Status is a projection written through the context's ``StatusSink`` only; nothing here reads it back
to decide anything (the run's outcome is run state, ``run.json``)."""

from __future__ import annotations

from typing import Any

from include import status as st
from include.errors import AlreadyMigrated, ChecksumError, MigrationFailure
from include.phases.context import MigrationContext, failure_message
from include.spec import SpecValidationError
from include.status import Phase


def begin(ctx: MigrationContext, phase: Phase, *, disk: str | None = None, message: str | None = None) -> None:
    ctx.logger.info("=== %s%s: %s/%s", phase.value, f" [{disk}]" if disk else "", ctx.namespace, ctx.name)
    if phase is not Phase.VALIDATING:
        ctx.check_pinned()  # a spec or Provider edited mid-run never redirects this phase
    ctx.update_status(lambda s: st.enter_phase(s, phase, disk=disk, message=message))


def finish(ctx: MigrationContext, phase: Phase, message: str, *, disk: str | None = None) -> None:
    ctx.logger.info("=== %s done%s: %s", phase.value, f" [{disk}]" if disk else "", message)
    if disk is None:
        ctx.update_status(lambda s: st.complete_phase(s, phase, message=message))
        return
    planned = ctx.plan.disk_names

    def mutate(s: dict[str, Any]) -> None:
        # a disk may already be in a later phase: what counts is that it completed this one
        reached = {d["name"] for d in s.get("disks", []) if phase.value in d.get("completed", [])} | {disk}
        last = all(name in reached for name in planned)
        summary = f"{st.DONE_CONDITION[phase]} {len(planned)} disk{'s' if len(planned) != 1 else ''}"
        st.complete_phase(s, phase, message=summary if last else message, disk=disk, all_disks_done=last)

    ctx.update_status(mutate)


def record_failure(ctx: MigrationContext, phase: Phase, err: BaseException, *, final: bool,
                   attempt: int | None = None, max_attempts: int | None = None, disk: str | None = None) -> None:
    """Record a failure: in the run state and as Failed in the status when final, as a retry note on the
    phase's condition otherwise. A checksum mismatch marks the disk's checksum failed."""
    if isinstance(err, AlreadyMigrated):  # a run refused after Ready: the migration's record stays as it was
        ctx.logger.info("%s/%s: %s", ctx.namespace, ctx.name, err)
        return
    reason = getattr(err, "reason", None) or ("ValidationFailed" if isinstance(err, SpecValidationError)
                                              else "PhaseFailed")
    message = failure_message(err)
    if disk and isinstance(err, ChecksumError):
        ctx.update_status(lambda s: st.set_checksum(s, disk, st.CHECKSUM_FAILED))
    if final:
        try:
            ctx.store.update_run_record(ctx.namespace, ctx.name, failure={"phase": phase.value, "reason": reason,
                                                                          "message": message})
        except (OSError, ValueError):
            ctx.logger.warning("could not record the failure of %s/%s", ctx.namespace, ctx.name, exc_info=True)
        ctx.update_status(lambda s: st.fail(s, phase, reason, message))
    else:
        note = f"attempt {attempt}/{max_attempts} failed, will retry: {message}" if attempt else message
        ctx.update_status(lambda s: st.set_condition(s, phase.value, "True", reason="Retrying", message=note))


def run_outcome(ctx: MigrationContext) -> tuple[bool, str | None]:
    """(whether this run's target validated with no failure since, the failure's message), from run state."""
    record = ctx.store.run_record(ctx.namespace, ctx.name)
    failure = record.get("failure") if isinstance(record.get("failure"), dict) else None
    validated = bool(record.get("targetValidated")) and record.get("targetValidated") == ctx.ledger.run()
    return validated and failure is None, (failure or {}).get("message")


def is_permanent(err: BaseException) -> bool:
    return isinstance(err, SpecValidationError) or (isinstance(err, MigrationFailure) and err.permanent)
