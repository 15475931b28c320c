"""VMMigrationWatchTrigger: waits in the triggerer for the cluster's VMMigrations to change (a Kubernetes watch
from a resourceVersion), so that the watcher DAG wakes up only when there is something to mirror."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

GROUP, VERSION, PLURAL = "infra.virtrigaud.io", "v1beta1", "vmmigrations"


class VMMigrationWatchTrigger(BaseTrigger):
    """Fires once: on the first added, modified or deleted VMMigration after ``resource_version`` (``changed``),
    on 410 Gone (the version is too old: ``relist``, the sync lists everything again), or after ``timeout``
    seconds without a change (``changed`` false: the next round starts a new watch)."""

    def __init__(self, kubernetes_conn_id: str, resource_version: str, timeout: int = 300) -> None:
        super().__init__()
        self.kubernetes_conn_id = kubernetes_conn_id
        self.resource_version = resource_version
        self.timeout = timeout

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("triggers.vmmigration_watch.VMMigrationWatchTrigger",
                {"kubernetes_conn_id": self.kubernetes_conn_id, "resource_version": self.resource_version,
                 "timeout": self.timeout})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # the official client is synchronous; its watch runs in a thread, the triggerer's loop stays free
        yield TriggerEvent(await asyncio.to_thread(self.watch_once))

    def watch_once(self) -> dict[str, Any]:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
        from kubernetes import client, watch
        from kubernetes.client.exceptions import ApiException

        api = client.CustomObjectsApi(KubernetesHook(conn_id=self.kubernetes_conn_id).get_conn())
        stream = watch.Watch()
        try:
            # the server ends the watch after ``timeout``; the client's own read timeout is set past that
            for event in stream.stream(api.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                                       resource_version=self.resource_version, timeout_seconds=self.timeout,
                                       _request_timeout=(10, self.timeout + 30)):
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    if obj.get("code") == 410:
                        return {"changed": True, "relist": True, "resourceVersion": None}
                    return {"changed": True, "relist": True, "resourceVersion": None,
                            "error": str(obj.get("message"))}
                meta = obj.get("metadata") or {}
                return {"changed": True, "type": event.get("type"), "name": f"{meta.get('namespace')}/"
                        f"{meta.get('name')}", "resourceVersion": meta.get("resourceVersion")}
        except ApiException as err:
            if err.status == 410:
                return {"changed": True, "relist": True, "resourceVersion": None}
            raise
        finally:
            stream.stop()
        return {"changed": False, "resourceVersion": self.resource_version}
