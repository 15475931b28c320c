"""A migration's status written back to its VMMigration in a Kubernetes cluster: ``/status`` patched (phase,
progress, conditions, times, message, per-disk progress) and Events for phase changes, retries and failures, so
that ``kubectl get vmmigration -w`` and ``kubectl describe vmmigration`` tell the story.

The status document itself is made by the engine exactly as for a folder (``include.status``); ``MirroredSink``
keeps it in the run state (``status``: a file beside the spec, or a row of the SQL run state) and publishes
each change to the cluster under that document's lock, so that two tasks' writes reach the cluster in the order
they were made.

Rules:

- A status write never fails a phase and never holds a disk copy up for long: each request has a short
  timeout and one retry (on a conflict, a throttle or a server error); after a failure the cluster is left
  alone for ``BACKOFF`` seconds except for significant changes, and the next write sends the whole status
  again (a merge patch of the whole ``status``: nothing is lost by a skipped write).
- Progress alone is published at most every ``INTERVAL`` seconds per migration (the time is kept beside the
  status file, so it holds across the tasks of a run); a phase, a condition, a failure or Ready at once.
- A VMMigration that is not in the cluster (a folder-only migration) is skipped quietly after the first 404,
  logged once.
- The status is replaced whole (a JSON patch), so keys the run removed go from the cluster too. A VMMigration
  mirrored from the cluster (``include.kube_sync``) is patched only when its uid is the run's (a JSON patch
  ``test`` of ``/metadata/uid``), so that a VMMigration deleted and made again under the same name never
  receives the old run's status. When the
  cluster answers that it is gone (404, or the uid no longer matching), the run is told (``MigrationDeleted``
  from ``MirroredSink.update``): it stops and rolls back what it created, per its validated cleanupPolicy.

No Airflow here: the caller gives a ``kubernetes.client.ApiClient`` factory (the Airflow hook's, in the
pipeline).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GROUP, VERSION, PLURAL, KIND = "infra.virtrigaud.io", "v1beta1", "vmmigrations", "VMMigration"
#: seconds between two progress-only patches of one migration
INTERVAL = 5.0
#: seconds the cluster is left alone (but for significant changes) after a failed write
BACKOFF = 30.0
#: each request's (connect, read) timeout
TIMEOUT = (3, 5)
COMPONENT = "vmmigration-engine"

log = logging.getLogger(__name__)


def _shape(status: dict[str, Any] | None) -> tuple[Any, ...]:
    """What makes a change significant: the phase, each condition's type/status/reason/message, the outcome."""
    s = status or {}
    conds = tuple((c.get("type"), c.get("status"), c.get("reason"), c.get("message"))
                  for c in s.get("conditions") or ())
    return s.get("phase"), conds, s.get("completionTime"), s.get("message") if s.get("phase") in (
        "Ready", "Failed") else None


def events_between(before: dict[str, Any] | None, after: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events a change makes: a phase entered, a retry noted, a failure, Ready."""
    before = before or {}
    out: list[tuple[str, str, str]] = []
    old, new = before.get("phase"), after.get("phase")
    if new != old and new:
        if new == "Failed":
            failed = next((c for c in after.get("conditions") or () if c.get("status") == "False"), {})
            out.append(("Warning", str(failed.get("reason") or "Failed"),
                        str(after.get("message") or failed.get("message") or "the migration failed")))
        elif new == "Ready":
            out.append(("Normal", "Ready", str(after.get("message") or "the migration is complete")))
        else:
            out.append(("Normal", f"Phase{new}", str(after.get("message") or f"phase {new}")))
    was = {c.get("type"): c for c in before.get("conditions") or ()}
    for cond in after.get("conditions") or ():
        prev = was.get(cond.get("type")) or {}
        if cond.get("reason") == "Retrying" and (prev.get("reason"), prev.get("message")) != (
                "Retrying", cond.get("message")):
            out.append(("Warning", "Retrying", f"{cond.get('type')}: {cond.get('message')}"))
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ClusterStatus:
    """Publishes one migration's status changes to its VMMigration (see the module docstring)."""

    def __init__(self, client_factory: Callable[[], Any], *, logger: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._factory = client_factory
        self._client: Any = None
        self.logger = logger or log
        self.clock = clock
        self._absent: set[tuple[str, str]] = set()
        #: migrations found deleted from the cluster (by the uid their run was for)
        self._gone: dict[tuple[str, str], str] = {}

    def gone(self, namespace: str, name: str) -> str | None:
        """The uid of the VMMigration found deleted from the cluster, None while it is there."""
        return self._gone.get((namespace, name))

    def _api(self) -> Any:
        from kubernetes import client

        if self._client is None:
            self._client = self._factory()
        return client.CustomObjectsApi(self._client), client.CoreV1Api(self._client)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """One request, retried once on a conflict, a throttle or a server error; raises the last error."""
        from kubernetes.client.exceptions import ApiException

        for attempt in (1, 2):
            try:
                return fn()
            except ApiException as err:
                if attempt == 1 and (err.status in (409, 429) or err.status >= 500):
                    time.sleep(0.3)
                    continue
                raise
            except OSError:
                if attempt == 1:
                    time.sleep(0.3)
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def publish(self, namespace: str, name: str, before: dict[str, Any] | None, after: dict[str, Any],
                memo: Path | None = None, *, uid: str | None = None) -> bool:
        """Patch the VMMigration's status (throttled, see the module) and create its Events; False when nothing
        was written (skipped, absent, gone, or failed: logged, never raised). With ``uid`` (a migration mirrored
        from the cluster) only that very object is patched; see ``gone``."""
        from kubernetes.client.exceptions import ApiException

        key = (namespace, name)
        if key in self._absent or key in self._gone:
            return False
        state = _read(memo)
        if uid and state.get("gone") == uid:  # found deleted by an earlier task of this run
            self._gone[key] = uid
            return False
        significant = _shape(before) != _shape(after)
        now = self.clock()
        if not significant and (now - float(state.get("patchedAt", 0)) < INTERVAL
                                or now - float(state.get("failedAt", 0)) < BACKOFF):
            return False
        objects, core = self._api()
        # a JSON patch replacing the whole status (keys the run removed go from the cluster too), with the run's
        # uid tested first: the status subresource ignores metadata in a merge patch, a "test" op it does not
        body: list[dict[str, Any]] = [{"op": "add", "path": "/status", "value": copy.deepcopy(after)}]
        if uid:
            body.insert(0, {"op": "test", "path": "/metadata/uid", "value": uid})
        try:
            answer = self._call(lambda: objects.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, body, _request_timeout=TIMEOUT,
                _content_type="application/json-patch+json"))
        except ApiException as err:
            if uid and (err.status == 404 or (err.status == 422 and self._other_uid(objects, namespace, name, uid))):
                self._gone[key] = uid
                self.logger.warning("VMMigration %s/%s (uid %s) was deleted from the cluster", namespace, name, uid)
                _write(memo, dict(state, gone=uid))
                return False
            if err.status == 404:
                self._absent.add(key)
                self.logger.info("VMMigration %s/%s is not in the cluster: its status stays local", namespace, name)
                return False
            self.logger.warning("could not write the status of %s/%s to the cluster: HTTP %s %s: %s", namespace, name,
                                err.status, err.reason, _api_message(err))
            _write(memo, dict(state, failedAt=now))
            return False
        except Exception as err:  # noqa: BLE001 - a status write never fails a phase
            self.logger.warning("could not write the status of %s/%s to the cluster: %s: %s", namespace, name,
                                type(err).__name__, err)
            _write(memo, dict(state, failedAt=now))
            return False
        _write(memo, {"patchedAt": now})
        uid = (answer or {}).get("metadata", {}).get("uid")
        for etype, reason, message in events_between(before, after):
            self._event(core, namespace, name, uid, etype, reason, message)
        return True

    def _other_uid(self, objects: Any, namespace: str, name: str, uid: str) -> bool:
        """Whether ``namespace/name`` is gone or now another VMMigration than ``uid`` (a 422 may also be a status
        the schema refuses: only the object itself says which)."""
        from kubernetes.client.exceptions import ApiException

        try:
            obj = self._call(lambda: objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                                          _request_timeout=TIMEOUT))
        except ApiException as err:
            return err.status == 404
        except Exception:  # noqa: BLE001 - not known: not gone
            return False
        return str((obj or {}).get("metadata", {}).get("uid")) != uid

    def _event(self, core: Any, namespace: str, name: str, uid: str | None, etype: str, reason: str,
               message: str) -> None:
        body = event_body(namespace, name, uid, etype, reason, message)
        try:
            self._call(lambda: core.create_namespaced_event(namespace, body, _request_timeout=TIMEOUT))
        except Exception as err:  # noqa: BLE001 - an event is a courtesy; the status carries the facts
            self.logger.warning("could not create the %s event of %s/%s: %s", reason, namespace, name,
                                getattr(err, "reason", None) or err)


def _api_message(err: Any) -> str:
    """The API server's own message of a refusal (its Status object), cut short."""
    try:
        return str(json.loads(err.body or "{}").get("message") or "")[:300]
    except (ValueError, AttributeError, TypeError):
        return ""


def event_body(namespace: str, name: str, uid: str | None, etype: str, reason: str, message: str) -> dict[str, Any]:
    """A core/v1 Event about the VMMigration ``namespace/name`` (what ``kubectl describe`` lists)."""
    stamp = _now()
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": namespace},
        "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": name,
                           "namespace": namespace, **({"uid": uid} if uid else {})},
        "reason": reason[:128], "message": message[:1024], "type": etype, "count": 1,
        "firstTimestamp": stamp, "lastTimestamp": stamp,
        "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
    }


def _read(memo: Path | None) -> dict[str, Any]:
    if memo is None or not memo.exists():
        return {}
    try:
        return json.loads(memo.read_text())
    except (OSError, ValueError):
        return {}


def _write(memo: Path | None, data: dict[str, Any]) -> None:
    if memo is None:
        return
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)  # with the SQL run state, nothing else makes the folder
        memo.write_text(json.dumps(data))
    except OSError:
        pass


class MirroredSink:
    """A status sink that keeps the status in the run's status file and publishes each change to the cluster,
    under the file's lock (see the module docstring). For a migration mirrored from the cluster, ``update``
    raises ``MigrationDeleted`` once the cluster says its VMMigration is gone (the status file has the change)."""

    def __init__(self, store: Any, cluster: ClusterStatus) -> None:
        self.store = store
        self.cluster = cluster
        self._expected: dict[tuple[str, str], str] = {}

    def expect(self, namespace: str, name: str, uid: str) -> None:
        """The run is of the cluster VMMigration ``uid`` (its conf says; no mirror file needed)."""
        self._expected[(namespace, name)] = uid

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        from include.runstate import STATUS

        return self.store.state.read(namespace, name, STATUS)

    def cluster_uid(self, namespace: str, name: str) -> str | None:
        """The uid of the cluster VMMigration this migration's mirror (and so its run) is of; None for a
        migration that is not a mirror."""
        from include.kube_sync import mirror_path, read_header

        mirrored = read_header(mirror_path(self.store.root, namespace, name))
        return mirrored.uid if mirrored is not None else None

    def update(self, namespace: str, name: str, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """The uid the run is of: as ``expect`` was told, else the mirror file's."""
        from include.errors import MigrationDeleted
        from include.runstate import STATUS
        from include.status import new_status

        uid = self._expected.get((namespace, name)) or self.cluster_uid(namespace, name)
        try:
            memo: Path | None = self.store.status_path(namespace, name).with_name("status.json.cluster")
        except ValueError:
            memo = None

        def apply(doc: dict[str, Any]) -> dict[str, Any]:
            before = copy.deepcopy(doc) if doc else None
            if not doc:
                doc.update(new_status())
            mutate(doc)
            # published under the status document's lock: two tasks' writes reach the cluster in their order
            self.cluster.publish(namespace, name, before, doc, memo=memo, uid=uid)
            return copy.deepcopy(doc)

        status = self.store.state.update(namespace, name, STATUS, apply)
        if uid and self.cluster.gone(namespace, name) == uid:
            raise MigrationDeleted(f"the VMMigration {namespace}/{name} (uid {uid}) was deleted from the cluster "
                                   f"while its run was under way: the run stops here and rolls back what it "
                                   f"created (cleanupPolicy as validated)", field="metadata.uid")
        return status
