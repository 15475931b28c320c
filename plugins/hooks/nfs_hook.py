"""NfsStorageHook: intermediate storage on a mounted NFS share."""

from __future__ import annotations

from functools import cached_property

from airflow.sdk import BaseHook

from include.errors import ConfigurationError
from include.storage.nfs import NfsStorage


class NfsStorageHook(BaseHook):
    """A mounted share: ``path`` from the VMMigration's ``spec.storage.path``, else the connection's
    ``extra.path``.

    :param nfs_conn_id: Airflow connection id, used only when ``path`` is not given.
    :param path: the share's mount point on this host.
    :param endpoint: the NFS server, for messages only (the share is mounted already).
    """

    conn_name_attr = "nfs_conn_id"
    default_conn_name = "nfs_default"
    conn_type = "nfs"
    hook_name = "NFS share"

    def __init__(self, nfs_conn_id: str = default_conn_name, *, path: str | None = None,
                 endpoint: str | None = None) -> None:
        super().__init__()
        self.nfs_conn_id = nfs_conn_id
        self.path = path
        self.endpoint = endpoint

    @cached_property
    def storage(self) -> NfsStorage:
        path = self.path
        if not path:
            conn = self.get_connection(self.nfs_conn_id)
            path = conn.extra_dejson.get("path")
        if not path:
            raise ConfigurationError(f"no NFS path: set spec.storage.path or {self.nfs_conn_id}'s extra.path")
        return NfsStorage(path, self.endpoint)

    def get_conn(self) -> NfsStorage:
        return self.storage
