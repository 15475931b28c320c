"""VSphereHook: a vCenter (or ESXi) session on pyvmomi; the migration driver works on it."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from include.errors import ConfigurationError
from include.providers.vsphere_api import VSphere
from include.providers.vsphere_driver import VSphereDriver


class VSphereHook(BaseHook):
    """Connects to vCenter's SOAP API (``https://vcenter/sdk``).

    The endpoint and the username/password (and ``caBundle`` or ``insecureSkipVerify``) come from the
    Provider and its Secret when the pipeline resolves one, else from the Airflow connection
    ``vsphere_conn_id`` (``host``, ``port``, ``login``, ``password``; ``extra.caBundle``,
    ``extra.insecureSkipVerify``), so that ``airflow tasks test`` and ad-hoc use work with an
    ``AIRFLOW_CONN_VSPHERE_DEFAULT`` variable. One session per task: logged in on first use, again
    on ``NotAuthenticated``, logged out when the task's driver is closed.
    """

    conn_name_attr = "vsphere_conn_id"
    default_conn_name = "vsphere_default"
    conn_type = "vsphere"
    hook_name = "VMware vSphere"

    def __init__(self, vsphere_conn_id: str = default_conn_name, *, uri: str | None = None,
                 credentials: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.vsphere_conn_id = vsphere_conn_id
        self.explicit_uri = uri
        self.credentials = credentials

    @cached_property
    def _resolved(self) -> tuple[str, Mapping[str, str]]:
        if self.explicit_uri:
            return self.explicit_uri, dict(self.credentials or {})
        conn = self.get_connection(self.vsphere_conn_id)
        if not conn.host:
            raise ConfigurationError(f"connection {self.vsphere_conn_id} has no host")
        extra = conn.extra_dejson
        port = f":{conn.port}" if conn.port else ""
        creds = {"username": conn.login or "", "password": conn.password or ""}
        for key in ("caBundle", "insecureSkipVerify"):
            if extra.get(key) is not None:
                creds[key] = str(extra[key])
        return f"https://{conn.host}{port}/sdk", creds

    @property
    def endpoint(self) -> str:
        return self._resolved[0]

    @cached_property
    def api(self) -> VSphere:
        """The session (the password is masked here, where it is read)."""
        from hooks.masking import mask

        creds = self._resolved[1]
        mask(creds.get("password"))
        return VSphere(self.endpoint, creds)

    def get_conn(self) -> Any:
        """pyvmomi's ``ServiceInstance`` of this hook's session."""
        return self.api.si

    @cached_property
    def driver(self) -> VSphereDriver:
        return VSphereDriver.from_hook(self)

    def test_connection(self) -> tuple[bool, str]:
        try:
            return True, self.driver.check()
        except Exception as err:  # noqa: BLE001 - reported to the UI
            return False, str(err)
