"""Transferring: one disk streamed into intermediate storage, sha256 computed on the way."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from include.status import Phase
from operators.base import DiskPhaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from include.phases import MigrationContext


class TransferDiskOperator(DiskPhaseOperator):
    """Transferring: one disk streamed into intermediate storage, sha256 computed on the way."""

    phase = Phase.TRANSFERRING
    ui_color = "#cffafe"

    def run_phase(self, ctx: MigrationContext, context: Context) -> Any:
        from include import phases

        return phases.transfer_disk(ctx, self.disk_name)
