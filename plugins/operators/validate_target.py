"""ValidatingTarget: the target VM checked against the plan (cpu, memory, disks, networks)."""

from __future__ import annotations

from include.status import Phase
from operators.base import MigrationPhaseOperator
from operators.links import TargetVMLink


class ValidateTargetOperator(MigrationPhaseOperator):
    """ValidatingTarget: the target VM checked against the plan (cpu, memory, disks, networks)."""

    phase = Phase.VALIDATING_TARGET
    ui_color = "#bbf7d0"
    body = "validate_target"
    links_vm = "target"
    operator_extra_links = (TargetVMLink(),)
