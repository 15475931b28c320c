"""Validating: the spec, the source VM, the target provider and storage; saves the plan."""

from __future__ import annotations

from include.status import Phase
from operators.base import MigrationPhaseOperator


class ValidateMigrationOperator(MigrationPhaseOperator):
    """Validating: the spec, the source VM, the target provider and storage; saves the plan."""

    phase = Phase.VALIDATING
    ui_color = "#fef3c7"
    body = "validate"
