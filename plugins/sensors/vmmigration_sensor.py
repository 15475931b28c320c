"""VMMigrationSensor: done at once when a VMMigration of the cluster (a uid and generation) has no mirror in the
spec store yet, else deferred to VMMigrationWatchTrigger until the cluster's VMMigrations change."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk.bases.sensor import BaseSensorOperator


class VMMigrationSensor(BaseSensorOperator):
    """:param kubernetes_conn_id: the cluster's Airflow connection (type kubernetes)
    :param store_path: the spec store folder (default ``$VMMIGRATION_STORE``)
    :param watch_timeout: seconds one watch waits before the round ends without a change"""

    template_fields: Sequence[str] = ("kubernetes_conn_id",)

    def __init__(self, *, kubernetes_conn_id: str, store_path: str | None = None, watch_timeout: int = 300,
                 **kwargs: Any) -> None:
        kwargs.setdefault("timeout", watch_timeout + 60)
        super().__init__(**kwargs)
        self.kubernetes_conn_id = kubernetes_conn_id
        self.store_path = store_path
        self.watch_timeout = watch_timeout

    def unmirrored(self) -> tuple[list[str], str]:
        """VMMigrations whose uid and generation have no mirror yet, and the list's resourceVersion."""
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        from include.kube_sync import ClusterInventory, Mirrored, mirror_path, read_header
        from include.store import SpecStore

        store = SpecStore(self.store_path) if self.store_path else SpecStore()
        items, version = ClusterInventory(KubernetesHook(conn_id=self.kubernetes_conn_id).get_conn()).migrations()
        missing = []
        for item in items:
            meta = item["metadata"]
            want = Mirrored(meta["namespace"], meta["name"], meta["uid"], int(meta.get("generation") or 1))
            if read_header(mirror_path(store.root, want.namespace, want.name)) != want:
                missing.append(f"{want.namespace}/{want.name}")
        return missing, version

    def execute(self, context: Any) -> Any:
        from triggers.vmmigration_watch import VMMigrationWatchTrigger

        missing, version = self.unmirrored()
        if missing:
            self.log.info("not mirrored yet: %s", ", ".join(missing))
            return {"changed": True, "names": missing}
        self.defer(trigger=VMMigrationWatchTrigger(self.kubernetes_conn_id, version, self.watch_timeout),
                   method_name="execute_complete", timeout=timedelta(seconds=self.watch_timeout + 60))

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> Any:
        self.log.info("the cluster's VMMigrations: %s", event)
        return event
