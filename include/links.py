"""Where a VM can be seen on its hypervisor's own web UI, for the links the Airflow UI shows on a migration's tasks
(operator extra links): the functions that ``include.registry`` names for each hypervisor type with a web UI
(libvirt has none: no link). No network here: the URL is made from the Provider's
endpoint and the VM's name and id as the plan and the driver know them.

Proxmox VE's UI opens a VM by its id (``#v1:0:=qemu/<vmid>``); the vSphere Client is pointed at its search for the
VM's name (its object URLs need the vCenter's instance UUID, which the plan does not carry). Neither URL was
checked against a real server here (there is none); both follow the UIs' documented URL forms.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit


def _base(endpoint: str, default_port: int | None) -> str | None:
    parts = urlsplit(endpoint if "//" in endpoint else f"https://{endpoint}")
    if not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = parts.port or default_port
    return f"https://{host}{f':{port}' if port else ''}"


def proxmox_vm_url(endpoint: str, vm_name: str, vm_id: str | None) -> str | None:
    """Proxmox VE's UI on the VM (its id is ``node/vmid``), or the UI's start page when the id is unknown."""
    base = _base(endpoint, 8006)
    if base is None:
        return None
    vmid = (vm_id or "").rpartition("/")[2]
    return f"{base}/#v1:0:=qemu%2F{quote(vmid)}:4:::::::" if vmid.isdigit() else f"{base}/"


def vsphere_vm_url(endpoint: str, vm_name: str, vm_id: str | None) -> str | None:
    """The vSphere Client's search for the VM's name."""
    base = _base(endpoint, None)
    return f"{base}/ui/app/search?query={quote(vm_name)}" if base else None
