"""Snapshotting: a snapshot of the source VM before its disks are read."""

from __future__ import annotations

from include.status import Phase
from operators.base import MigrationPhaseOperator
from operators.links import SourceVMLink


class SnapshotVMOperator(MigrationPhaseOperator):
    """Snapshotting: a snapshot of the source VM before its disks are read."""

    phase = Phase.SNAPSHOTTING
    ui_color = "#e0e7ff"
    body = "snapshot"
    links_vm = "source"
    operator_extra_links = (SourceVMLink(),)
