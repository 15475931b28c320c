"""Registers the migration tasks' links to the VM on its hypervisor's web UI (plugins/operators/links.py), so
that the API server can show them on the tasks' pages."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from operators.links import SourceVMLink, TargetVMLink


class VMMigrationLinksPlugin(AirflowPlugin):
    name = "vmmigration_links"
    operator_extra_links = [SourceVMLink(), TargetVMLink()]
