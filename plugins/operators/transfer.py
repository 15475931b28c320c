"""Transferring: one disk streamed into intermediate storage, sha256 computed on the way."""

from __future__ import annotations

from include.status import Phase
from operators.base import DiskPhaseOperator


class TransferDiskOperator(DiskPhaseOperator):
    """Transferring: one disk streamed into intermediate storage, sha256 computed on the way."""

    phase = Phase.TRANSFERRING
    ui_color = "#cffafe"
    body = "transfer_disk"
