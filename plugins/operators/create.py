"""Creating: the target VM defined with the migrated disks and the resource and network hints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from include.status import Phase
from operators.base import MigrationPhaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from include.phases import MigrationContext


class CreateVMOperator(MigrationPhaseOperator):
    """Creating: the target VM defined with the migrated disks and the resource and network hints."""

    phase = Phase.CREATING
    ui_color = "#fde68a"

    def run_phase(self, ctx: MigrationContext, context: Context) -> Any:
        from include import phases

        return phases.create_vm(ctx)
