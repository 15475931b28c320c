"""Exporting: one disk made readable in its transit format (converted here when the source is raw)."""

from __future__ import annotations

from include.status import Phase
from operators.base import DiskPhaseOperator


class ExportDiskOperator(DiskPhaseOperator):
    """Exporting: one disk made readable in its transit format (converted here when the source is raw)."""

    phase = Phase.EXPORTING
    ui_color = "#dbeafe"
    body = "export_disk"
