"""VMMigrationWatchTrigger against the real kube-apiserver, as the engine's ServiceAccount: with the VMMigrations
it was listed with (``known``), the status patches of a running migration (progress, message, its phases) do not
fire it, and its run's end does; without ``known`` every change does."""

from __future__ import annotations

import uuid

import pytest

from include.kube_sync import ClusterInventory
from tests.e2e.kube_world import GROUP, VERSION, _connect, apply_bare
from triggers.vmmigration_watch import VMMigrationWatchTrigger, watched, watched_key

pytestmark = pytest.mark.usefixtures("clean_cluster")


def _status(kube_api, name: str, status: dict) -> None:
    kube_api.request("PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}/status",
                     body={"status": status}, headers={"Content-Type": "application/merge-patch+json"})


def test_a_running_migrations_status_does_not_wake_the_watcher_and_its_end_does(kube_api, engine, monkeypatch):
    _connect(monkeypatch, kube_api, engine)
    name = f"wake-{uuid.uuid4().hex[:6]}"
    apply_bare(kube_api, name)
    with kube_api.client(engine) as api:
        items, version = ClusterInventory(api).migrations()
    known = {watched_key(item): watched(item) for item in items}
    assert known[f"default/{name}"][3] == ""
    _status(kube_api, name, {"phase": "Validating", "progress": 2})
    _status(kube_api, name, {"phase": "Transferring", "progress": 40, "message": "Uploading disk (40% complete)"})

    quiet = VMMigrationWatchTrigger("vmmigration_k8s", version, timeout=2, known=known).watch_once()
    assert quiet == {"changed": False, "resourceVersion": version}, "progress, messages and phases: no change"
    every = VMMigrationWatchTrigger("vmmigration_k8s", version, timeout=10).watch_once()
    assert every["type"] == "MODIFIED" and every["watched"][3] == "", "without known, the first patch fires"

    _status(kube_api, name, {"phase": "Ready", "progress": 100})
    woke = VMMigrationWatchTrigger("vmmigration_k8s", version, timeout=10, known=known).watch_once()
    assert (woke["name"], woke["type"], woke["watched"][3]) == (f"default/{name}", "MODIFIED", "Ready"), woke
    trigger = VMMigrationWatchTrigger("vmmigration_k8s", version, timeout=10, known=known)
    path, kwargs = trigger.serialize()
    assert VMMigrationWatchTrigger(**kwargs).known == known and path.endswith(".VMMigrationWatchTrigger")
