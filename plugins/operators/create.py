"""Creating: the target VM defined with the migrated disks and the resource and network hints."""

from __future__ import annotations

from include.status import Phase
from operators.base import MigrationPhaseOperator
from operators.links import TargetVMLink


class CreateVMOperator(MigrationPhaseOperator):
    """Creating: the target VM defined with the migrated disks and the resource and network hints."""

    phase = Phase.CREATING
    ui_color = "#fde68a"
    body = "create_vm"
    links_vm = "target"
    operator_extra_links = (TargetVMLink(),)
