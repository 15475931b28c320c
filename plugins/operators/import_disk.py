"""Importing: one disk written into the target storage, its sha256 checked on the way."""

from __future__ import annotations

from include.status import Phase
from operators.base import DiskPhaseOperator


class ImportDiskOperator(DiskPhaseOperator):
    """Importing: one disk written into the target storage, its sha256 checked on the way."""

    phase = Phase.IMPORTING
    ui_color = "#dcfce7"
    body = "import_disk"
