"""Snapshotting: a snapshot of the source VM before its disks are read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from include.status import Phase
from operators.base import MigrationPhaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from include.phases import MigrationContext


class SnapshotVMOperator(MigrationPhaseOperator):
    """Snapshotting: a snapshot of the source VM before its disks are read."""

    phase = Phase.SNAPSHOTTING
    ui_color = "#e0e7ff"

    def run_phase(self, ctx: MigrationContext, context: Context) -> Any:
        from include import phases

        return phases.snapshot(ctx)
