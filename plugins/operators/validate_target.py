"""ValidatingTarget: the target VM checked against the plan (cpu, memory, disks, networks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from include.status import Phase
from operators.base import MigrationPhaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from include.phases import MigrationContext


class ValidateTargetOperator(MigrationPhaseOperator):
    """ValidatingTarget: the target VM checked against the plan (cpu, memory, disks, networks)."""

    phase = Phase.VALIDATING_TARGET
    ui_color = "#bbf7d0"

    def run_phase(self, ctx: MigrationContext, context: Context) -> Any:
        from include import phases

        return phases.validate_target(ctx)
