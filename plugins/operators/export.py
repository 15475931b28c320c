"""Exporting: one disk made readable in its transit format (converted here when the source is raw)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from include.status import Phase
from operators.base import DiskPhaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from include.phases import MigrationContext


class ExportDiskOperator(DiskPhaseOperator):
    """Exporting: one disk made readable in its transit format (converted here when the source is raw)."""

    phase = Phase.EXPORTING
    ui_color = "#dbeafe"

    def run_phase(self, ctx: MigrationContext, context: Context) -> Any:
        from include import phases

        return phases.export_disk(ctx, self.disk_name)
