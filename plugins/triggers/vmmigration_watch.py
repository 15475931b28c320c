"""VMMigrationWatchTrigger: waits in the triggerer for the cluster's VMMigrations to change (a Kubernetes watch
from a resourceVersion), so that the watcher DAG wakes up only when there is something to mirror.

What counts as a change is what the mirror acts on (``watched``): a VMMigration added or deleted, a new uid or
generation, a deletion begun, and its run ending (Ready, Failed: an edit held back while it ran is taken up then,
include.kube_sync.decide). A running migration patches its status every few seconds (progress, messages, each
phase); those patches are MODIFIED events too, and waking the watcher DAG for each would run a round of its tasks
(a start_runs task per VMMigration of the cluster) every few seconds for as long as any migration runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

GROUP, VERSION, PLURAL = "infra.virtrigaud.io", "v1beta1", "vmmigrations"


def watched(obj: dict[str, Any]) -> list[Any]:
    """What of a VMMigration the watcher acts on: its uid and generation, whether its deletion has begun, and
    whether its run has ended (its phase ``Ready`` or ``Failed``; ``""`` for any other phase or none)."""
    meta = obj.get("metadata") or {}
    phase = str((obj.get("status") or {}).get("phase") or "")
    ended = phase if phase in ("Ready", "Failed") else ""
    return [str(meta.get("uid")), int(meta.get("generation") or 1), bool(meta.get("deletionTimestamp")), ended]


def watched_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


class VMMigrationWatchTrigger(BaseTrigger):
    """Fires once: on the first added, modified or deleted VMMigration after ``resource_version`` (``changed``),
    on 410 Gone (the version is too old: ``relist``, the sync lists everything again), or after ``timeout``
    seconds without a change (``changed`` false: the next round starts a new watch).

    :param known: the VMMigrations as listed at ``resource_version``, ``{"ns/name": watched(obj)}``; an added or
        modified one whose ``watched`` is the same is no change (its status's progress or message moved). None:
        every event is a change."""

    def __init__(self, kubernetes_conn_id: str, resource_version: str, timeout: int = 300,
                 known: dict[str, list[Any]] | None = None) -> None:
        super().__init__()
        self.kubernetes_conn_id = kubernetes_conn_id
        self.resource_version = resource_version
        self.timeout = timeout
        self.known = known

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("triggers.vmmigration_watch.VMMigrationWatchTrigger",
                {"kubernetes_conn_id": self.kubernetes_conn_id, "resource_version": self.resource_version,
                 "timeout": self.timeout, "known": self.known})

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
                if (self.known is not None and event.get("type") in ("ADDED", "MODIFIED")
                        and self.known.get(watched_key(obj)) == watched(obj)):
                    continue  # its run's progress, message or phase moved: nothing to mirror or start
                meta = obj.get("metadata") or {}
                return {"changed": True, "type": event.get("type"), "name": watched_key(obj),
                        "watched": watched(obj), "resourceVersion": meta.get("resourceVersion")}
        except ApiException as err:
            if err.status == 410:
                return {"changed": True, "relist": True, "resourceVersion": None}
            raise
        finally:
            stream.stop()
        return {"changed": False, "resourceVersion": self.resource_version}
