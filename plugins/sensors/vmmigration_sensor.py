"""VMMigrationSensor: done at once when a VMMigration of the cluster (a uid and generation) is to be mirrored
into the spec store (include.kube_sync.decide), or is mirrored but its generation's run was never started (a round
of the watcher stopped between its mirror and start_runs tasks: killed, marked failed, its worker restarted);
else deferred to VMMigrationWatchTrigger until the cluster's VMMigrations change."""

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

    def _listed(self) -> tuple[list[tuple[dict[str, Any], Any, Any, str]], str]:
        """Each VMMigration of the cluster with what sync does with it (include.kube_sync.decide), and the list's
        resourceVersion."""
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        from include.kube_sync import ClusterInventory, decide
        from include.store import SpecStore

        store = SpecStore(self.store_path) if self.store_path else SpecStore()
        items, version = ClusterInventory(KubernetesHook(conn_id=self.kubernetes_conn_id).get_conn()).migrations()
        return [(item, *decide(store.root, item)) for item in items], version

    def unmirrored(self) -> tuple[list[str], str]:
        """VMMigrations whose uid and generation the mirror task would mirror now, and the list's
        resourceVersion (an edit waiting for its run to end is not counted: the run's end wakes the watch)."""
        from include.kube_sync import WRITE

        listed, version = self._listed()
        return [f"{want.namespace}/{want.name}" for _item, want, _mirror, action in listed if action == WRITE], version

    def execute(self, context: Any) -> Any:
        from include.kube_sync import CURRENT, WRITE, ended
        from include.store import SpecStore, dag_id_for
        from triggers.vmmigration_watch import VMMigrationWatchTrigger, watched, watched_key

        listed, version = self._listed()
        store_root = (SpecStore(self.store_path) if self.store_path else SpecStore()).root
        missing = [f"{want.namespace}/{want.name}" for _item, want, _mirror, action in listed if action == WRITE]
        if missing:
            self.log.info("not mirrored yet: %s", ", ".join(missing))
            return {"changed": True, "names": missing}
        # mirrored, and so due to run, but no run of that generation: the round that mirrored it did not get to
        # start_runs. Asked of Airflow (the run id is the generation's), not of any status.
        unstarted = [f"{want.namespace}/{want.name}" for _item, want, _mirror, action in listed
                     if action == CURRENT and not ended(store_root, want) and not context["ti"].get_dr_count(
                         dag_id=dag_id_for(want.namespace, want.name), run_ids=[want.run_id])]
        if unstarted:
            self.log.info("mirrored, but the run of this generation was never started: %s", ", ".join(unstarted))
            return {"changed": True, "names": unstarted}
        known = {watched_key(item): watched(item) for item, _want, _mirror, _action in listed}
        self.defer(trigger=VMMigrationWatchTrigger(self.kubernetes_conn_id, version, self.watch_timeout, known),
                   method_name="execute_complete", timeout=timedelta(seconds=self.watch_timeout + 60))

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> Any:
        self.log.info("the cluster's VMMigrations: %s", event)
        return event
