"""Converting: one disk verified and converted to the target format on arrival, when needed."""

from __future__ import annotations

from include.status import Phase
from operators.base import DiskPhaseOperator


class ConvertDiskOperator(DiskPhaseOperator):
    """Converting: one disk verified and converted to the target format on arrival, when needed."""

    phase = Phase.CONVERTING
    ui_color = "#fae8ff"
    body = "convert_disk"
