"""Links from a migration's tasks to the VM on its hypervisor's web UI (Proxmox VE, vSphere; libvirt has none).
The task that knows the VM (snapshot_vm: the source; create_vm and validate_target: the target) keeps the URL
when its phase has run (``MigrationPhaseOperator._push_vm_url``); Airflow 3 asks each link for its URL at the end
of the task, on the worker, and keeps it as an XCom the UI reads. Registered with Airflow by
plugins/vmmigration_links.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk.types import TaskInstanceKey

#: the operator attribute that holds the URL once the phase has run
ATTRIBUTE = "vm_url"


class _VMLink(BaseOperatorLink):
    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        url = getattr(operator, ATTRIBUTE, None)
        return url if isinstance(url, str) and url.startswith("https://") else ""


class SourceVMLink(_VMLink):
    name = "Source VM"


class TargetVMLink(_VMLink):
    name = "Target VM"
