"""The run's outcome is run state: finalize decides from it, never from the status a sink shows."""

from __future__ import annotations

from include.errors import StorageError
from include.phases import MigrationContext, record_failure, run_outcome
from include.status import Phase
from include.store import SpecStore


class WriteOnlySink:
    """A status sink that can be written but not read back (as a cluster's status writer may be)."""

    def __init__(self) -> None:
        self.writes = 0

    def update(self, namespace, name, mutate):
        self.writes += 1
        status: dict = {}
        mutate(status)
        return status

    def get(self, namespace, name):
        raise AssertionError("status was read back to decide something")


def _ctx(store) -> MigrationContext:
    return MigrationContext(namespace="ns", name="web", store=SpecStore(store), sink=WriteOnlySink())


def test_validated_in_this_run_and_no_failure_is_success(store):
    ctx = _ctx(store)
    run = ctx.ledger.new_run()
    SpecStore(store).update_run_record("ns", "web", run=run, targetValidated=run, failure=None)
    assert run_outcome(ctx) == (True, None)


def test_a_final_failure_is_kept_with_its_message(store):
    ctx = _ctx(store)
    run = ctx.ledger.new_run()
    SpecStore(store).update_run_record("ns", "web", run=run, targetValidated=run, failure=None)
    record_failure(ctx, Phase.TRANSFERRING, StorageError("share gone"), final=True)
    assert run_outcome(ctx) == (False, "share gone")
    assert ctx.sink.writes == 1  # the status got its projection


def test_a_retry_is_not_a_failure(store):
    ctx = _ctx(store)
    run = ctx.ledger.new_run()
    SpecStore(store).update_run_record("ns", "web", run=run, targetValidated=run, failure=None)
    record_failure(ctx, Phase.TRANSFERRING, StorageError("blip"), final=False, attempt=1, max_attempts=3)
    assert run_outcome(ctx) == (True, None)


def test_an_earlier_runs_validation_does_not_count(store):
    ctx = _ctx(store)
    old = ctx.ledger.new_run()
    SpecStore(store).update_run_record("ns", "web", run=old, targetValidated=old, failure=None)
    ctx.ledger.new_run()  # a new run started and never validated its target
    assert run_outcome(ctx) == (False, None)


def test_validating_target_checks_the_vm_this_run_committed(tmp_path):
    """ValidatingTarget takes the VM id Creating recorded for this run; a run that Created before the id was
    recorded (an upgrade mid-run) falls back to its ledger's VM; without either it refuses to guess by name."""
    import pytest

    from include.errors import InvalidMigration
    from include.phases.target import committed_vm
    from tests.include.phases.test_bookkeeping import _plan

    store = SpecStore(tmp_path)
    store.save_plan("default", "par", _plan("vda").to_dict())
    ctx = MigrationContext("default", "par", store=store, sink=WriteOnlySink())
    run = ctx.ledger.new_run()
    with pytest.raises(InvalidMigration, match="no target VM was created in this run"):
        committed_vm(ctx)
    ctx.ledger.record("vm", ctx.scope_target, id="uuid-from-ledger", name="par-new")
    assert committed_vm(ctx).id == "uuid-from-ledger"
    store.update_run_record("default", "par", targetVm={"id": "uuid-1", "name": "par-new", "run": run})
    assert (committed_vm(ctx).id, committed_vm(ctx).name) == ("uuid-1", "par-new")
    store.update_run_record("default", "par", targetVm={"id": "uuid-0", "name": "par-new", "run": "an-earlier-run"})
    with pytest.raises(InvalidMigration):  # another run's VM is never this run's
        committed_vm(ctx)
