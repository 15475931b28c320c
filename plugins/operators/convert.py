"""Converting: one disk verified and converted to the target format on arrival, when needed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from include.status import Phase
from operators.base import DiskPhaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from include.phases import MigrationContext


class ConvertDiskOperator(DiskPhaseOperator):
    """Converting: one disk verified and converted to the target format on arrival, when needed."""

    phase = Phase.CONVERTING
    ui_color = "#fae8ff"

    def run_phase(self, ctx: MigrationContext, context: Context) -> Any:
        from include import phases

        return phases.convert_disk(ctx, self.disk_name)
