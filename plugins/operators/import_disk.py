"""Importing: one disk written into the target storage, its sha256 checked on the way."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from include.status import Phase
from operators.base import DiskPhaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from include.phases import MigrationContext


class ImportDiskOperator(DiskPhaseOperator):
    """Importing: one disk written into the target storage, its sha256 checked on the way."""

    phase = Phase.IMPORTING
    ui_color = "#dcfce7"

    def run_phase(self, ctx: MigrationContext, context: Context) -> Any:
        from include import phases

        return phases.import_disk(ctx, self.disk_name)
