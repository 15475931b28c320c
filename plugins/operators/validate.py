"""Validating: the spec, the source VM, the target provider and storage; saves the plan."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from include.status import Phase
from operators.base import MigrationPhaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from include.phases import MigrationContext


class ValidateMigrationOperator(MigrationPhaseOperator):
    """Validating: the spec, the source VM, the target provider and storage; saves the plan."""

    phase = Phase.VALIDATING
    ui_color = "#fef3c7"

    def run_phase(self, ctx: MigrationContext, context: Context) -> Any:
        from include import phases

        return phases.validate(ctx)
