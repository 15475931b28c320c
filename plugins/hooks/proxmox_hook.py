"""ProxmoxHook: a Proxmox VE API session (proxmoxer) and SSH to its nodes through the SSH provider's SSHHook
(paramiko underneath); the migration driver works on it."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from include.errors import ConfigurationError
from include.providers.proxmox_api import Proxmox
from include.providers.proxmox_driver import ProxmoxDriver


class ProxmoxHook(BaseHook):
    """Connects to a Proxmox VE node's API (``https://pve:8006``).

    The endpoint and the Secret (``tokenId``/``tokenSecret`` or ``username``/``password``, ``caBundle``,
    ``sshPrivateKey``, ``sshKnownHosts``, ``sshPort``) come from the Provider when the pipeline resolves one, else
    from the Airflow connection ``proxmox_conn_id`` (``host``, ``port``, ``login`` = token id, ``password`` = token
    secret; the rest in ``extra``), for ``airflow tasks test`` with an ``AIRFLOW_CONN_PROXMOX_DEFAULT`` variable.
    """

    conn_name_attr = "proxmox_conn_id"
    default_conn_name = "proxmox_default"
    conn_type = "proxmox"
    hook_name = "Proxmox VE"

    def __init__(self, proxmox_conn_id: str = default_conn_name, *, uri: str | None = None,
                 credentials: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.proxmox_conn_id = proxmox_conn_id
        self.explicit_uri = uri
        self.credentials = credentials

    @cached_property
    def _resolved(self) -> tuple[str, Mapping[str, str]]:
        if self.explicit_uri:
            return self.explicit_uri, dict(self.credentials or {})
        conn = self.get_connection(self.proxmox_conn_id)
        if not conn.host:
            raise ConfigurationError(f"connection {self.proxmox_conn_id} has no host")
        creds = {"tokenId": conn.login or "", "tokenSecret": conn.password or ""}
        creds.update({k: str(v) for k, v in conn.extra_dejson.items()})
        return f"https://{conn.host}:{conn.port or 8006}", creds

    @property
    def endpoint(self) -> str:
        return self._resolved[0]

    @cached_property
    def pve(self) -> Proxmox:
        """The session (its secrets masked here, where they are read)."""
        from hooks.masking import mask

        creds = self._resolved[1]
        for key in ("tokenSecret", "password", "sshPrivateKey"):
            mask(creds.get(key))
        return Proxmox(self.endpoint, creds, ssh_connect=ssh_through_hook)

    def get_conn(self) -> Any:
        """proxmoxer's ``ProxmoxAPI`` of this hook's session."""
        return self.pve.api

    @cached_property
    def driver(self) -> ProxmoxDriver:
        return ProxmoxDriver.from_hook(self)

    def test_connection(self) -> tuple[bool, str]:
        try:
            return True, self.driver.check()
        except Exception as err:  # noqa: BLE001 - reported to the UI
            return False, str(err)


def ssh_through_hook(host: str, port: int, user: str, key: Any, host_key: Any) -> Any:
    """A client from the SSH provider's ``SSHHook``: the Secret's key, the node's one trusted host key (only its type
    negotiated, and the key shown checked after the handshake, so neither another key nor the worker's own
    known_hosts is trusted), no compression (disk data), one attempt (a refused key is not retried)."""
    from airflow.providers.ssh.hooks.ssh import SSHHook

    from include.providers.proxmox_api import check_host_key, other_host_key_algorithms

    hook = SSHHook(remote_host=host, port=port, username=user, conn_timeout=30, banner_timeout=30,
                   conn_retry_attempts=1, no_host_key_check=False,
                   disabled_algorithms={"keys": other_host_key_algorithms(host_key)})
    hook.pkey, hook.host_key, hook.look_for_keys, hook.compress = key, host_key, False, False
    # SSHHook also trusts the worker's ~/.ssh/known_hosts: the key the node showed is checked against ours here
    return check_host_key(hook.get_conn(), host_key, host)
