"""Status bookkeeping of per-disk phases when disks run in parallel (include.phases begin/finish)."""

from __future__ import annotations

from include import phases
from include.status import Phase
from include.store import SpecStore


def _ctx(tmp_path):
    store = SpecStore(tmp_path)
    store.save_plan("default", "par", {"disks": [{"name": "vda"}, {"name": "vdb"}]})
    return phases.MigrationContext("default", "par", store=store)


def test_phase_completes_when_the_last_disk_does_even_if_another_moved_on(tmp_path):
    ctx = _ctx(tmp_path)
    phases.begin(ctx, Phase.TRANSFERRING, disk="vda")
    phases.begin(ctx, Phase.TRANSFERRING, disk="vdb")
    phases.finish(ctx, Phase.TRANSFERRING, "vda stored", disk="vda")
    phases.begin(ctx, Phase.CONVERTING, disk="vda")  # vda runs ahead
    status = ctx.sink.get("default", "par")
    assert not any(c["type"] == "Transferred" for c in status["conditions"])
    phases.finish(ctx, Phase.TRANSFERRING, "vdb stored", disk="vdb")
    status = ctx.sink.get("default", "par")
    types = {c["type"]: c for c in status["conditions"]}
    assert types["Transferred"]["status"] == "True"
    assert "Transferring" not in types  # the in-progress condition is gone once every disk is done
    assert types["Converting"]["status"] == "True"
    assert status["phase"] == "Converting"
