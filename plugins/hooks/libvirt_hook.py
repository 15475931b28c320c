"""LibvirtHook: a libvirt connection (qemu:///system, qemu+ssh://...); the migration driver works on it."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from include.errors import ConfigurationError
from include.providers.libvirt_driver import LibvirtDriver, open_connection


class LibvirtHook(BaseHook):
    """Connects to libvirt by URI.

    The URI comes from the Provider object (``spec.endpoint``) when the pipeline resolves one, else
    from the Airflow connection ``libvirt_conn_id`` (its ``host`` field or ``extra.uri``), so that
    ``airflow tasks test`` and ad-hoc use work with an ``AIRFLOW_CONN_LIBVIRT_DEFAULT`` variable.

    :param libvirt_conn_id: Airflow connection id, used only when ``uri`` is not given.
    :param uri: explicit libvirt URI.
    :param credentials: the Provider's Secret (an SSH private key for ``qemu+ssh://``).
    """

    conn_name_attr = "libvirt_conn_id"
    default_conn_name = "libvirt_default"
    conn_type = "libvirt"
    hook_name = "Libvirt"

    def __init__(self, libvirt_conn_id: str = default_conn_name, *, uri: str | None = None,
                 credentials: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.libvirt_conn_id = libvirt_conn_id
        self.explicit_uri = uri
        self.credentials = credentials

    @cached_property
    def uri(self) -> str:
        if self.explicit_uri:
            return self.explicit_uri
        conn = self.get_connection(self.libvirt_conn_id)
        from_extra = conn.extra_dejson.get("uri")
        if from_extra and conn.host and from_extra != conn.host:
            raise ConfigurationError(f"connection {self.libvirt_conn_id} sets both host and extra.uri")
        uri = from_extra or conn.host
        if not uri:
            raise ConfigurationError(f"connection {self.libvirt_conn_id} has no libvirt URI (host or extra.uri)")
        return uri

    @cached_property
    def conn(self) -> Any:
        """The ``libvirt.virConnect``; a ``qemu+ssh`` Provider's private key (from its Secret) is masked
        here, where it is read, and used only for the connect."""
        if self.credentials:
            from hooks.masking import mask

            for key in ("sshPrivateKey", "ssh-privatekey", "privateKey"):
                mask(self.credentials.get(key))
        return open_connection(self.uri, self.credentials)

    def get_conn(self) -> Any:
        """The libvirt connection (the SDK's own object, as the Airflow providers' hooks return theirs);
        opened again when the one held was closed or its daemon went away."""
        held = self.__dict__.get("conn")
        if held is not None:
            try:
                alive = held.isAlive() == 1
            except Exception:  # noqa: BLE001 - a closed connection raises instead of answering
                alive = False
            if not alive:
                del self.__dict__["conn"]
        return self.conn

    @cached_property
    def driver(self) -> LibvirtDriver:
        """The migration driver, on this hook's connection."""
        return LibvirtDriver.from_hook(self)

    def test_connection(self) -> tuple[bool, str]:
        try:
            return True, self.driver.check()
        except Exception as err:  # noqa: BLE001 - reported to the UI
            return False, str(err)
