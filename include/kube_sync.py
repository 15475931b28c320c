"""VMMigrations found in a Kubernetes cluster, mirrored into the spec store folder, so that the DAG factory makes
their DAGs as it does for files (parsing stays local: no network at parse), each with its run id derived from the
VMMigration's uid and generation (one run per generation, whoever triggers it, however often).

One file per VMMigration, ``<store>/k8s--<namespace>--<name>.yaml`` (0600), whose first line says it is a mirror
and of which uid and generation: the VMMigration (its spec, and its uid and generation as annotations), and the
inventory it names, read from the cluster: the VirtualMachine (``sourceName`` in ``sourceNamespace``), the
Providers (the VM's and ``targetProviderRef``) and the ReferenceGrants of the namespaces referred to. What is
missing is left out, and Validating names it. Secrets are never mirrored: each task reads the ones it needs from
the cluster, in the migration's namespace (``read_secret``, include.inventory.SecretsFrom).

A file is rewritten only when its VMMigration's uid or generation changed, and never while the run of the
mirrored generation is under way: a spec edited mid-run (a new generation) leaves the running run on the plan it
validated, is reported by an Event (``SpecChangedDuringRun``), and is mirrored (and run) once that run has
ended; a new generation of a migration that ended Ready is not run (``SpecChangedAfterReady``: a migration moves
its VM once). A mirror whose VMMigration is gone from the cluster is removed once its run (if one started) has
ended: a DAG that vanished mid-run would leave its cleanup undone; the run itself finds the VMMigration gone at
its next status write, stops and rolls back (include.kube_status). Only files this module wrote (the prefix and
the first line) are ever rewritten or removed; nothing else in the folder is touched.

No Airflow here: the caller gives a ``kubernetes.client.ApiClient``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

GROUP, VERSION = "infra.virtrigaud.io", "v1beta1"
PREFIX = "k8s--"
HEADER = "# mirrored from the cluster by the VM migration engine; do not edit: VMMigration {ns}/{name} uid {uid} " \
         "generation {gen}"
UID_ANNOTATION = "vmmigration.virtrigaud.io/cluster-uid"
GENERATION_ANNOTATION = "vmmigration.virtrigaud.io/cluster-generation"
log = logging.getLogger(__name__)
_HEADER_RE = re.compile(r"^# mirrored from the cluster by the VM migration engine; do not edit: VMMigration "
                        r"(?P<ns>\S+)/(?P<name>\S+) uid (?P<uid>\S+) generation (?P<gen>\d+)$")


@dataclass(frozen=True)
class Mirrored:
    namespace: str
    name: str
    uid: str
    generation: int

    @property
    def run_id(self) -> str:
        return run_id_for(self.uid, self.generation)


@dataclass(frozen=True)
class SyncResult:
    resource_version: str
    #: mirrors written for a VMMigration or a generation not seen before (each wants its run)
    changed: tuple[Mirrored, ...]
    #: every VMMigration in the cluster as its mirror holds it now (the generation whose run is wanted; a
    #: deferred or completed edit is not in it, nor a name whose file this module did not write)
    current: tuple[Mirrored, ...]
    #: mirror files removed: their VMMigration is gone from the cluster
    removed: tuple[str, ...]
    #: mirror files of deleted VMMigrations kept while their run goes on (removed once it has ended)
    held: tuple[str, ...] = ()
    #: of ``current``, those whose generation's run has not ended (ended: never asked for again, even when
    #: its Airflow run was removed from the database)
    wanted: tuple[Mirrored, ...] = ()
    #: new generations waiting for the run under way to end (its plan is pinned; reported by an Event)
    deferred: tuple[Mirrored, ...] = ()
    #: new generations of migrations that ended Ready: not run (reported by an Event)
    complete: tuple[Mirrored, ...] = ()


def run_id_for(uid: str, generation: int) -> str:
    """The one run of a VMMigration's generation (a second trigger of it is refused by Airflow as a duplicate)."""
    return f"k8s__{uid}__g{int(generation)}"


def mirror_path(store: Path, namespace: str, name: str) -> Path:
    return Path(store) / f"{PREFIX}{namespace}--{name}.yaml"


def read_header(path: Path) -> Mirrored | None:
    """The VMMigration a mirror file is of (None for any file this module did not write)."""
    if not path.name.startswith(PREFIX) or path.suffix != ".yaml":
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline().rstrip("\n")
    except OSError:
        return None
    found = _HEADER_RE.match(first)
    if not found:
        return None
    return Mirrored(found["ns"], found["name"], found["uid"], int(found["gen"]))


class ClusterInventory:
    """Reads VMMigrations and what they name from the cluster (the engine's RBAC: deploy/rbac/engine.yaml)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def migrations(self) -> tuple[list[dict[str, Any]], str]:
        """Every VMMigration in the cluster and the list's resourceVersion (where a watch starts)."""
        answer = self.custom.list_cluster_custom_object(GROUP, VERSION, "vmmigrations")
        return list(answer.get("items") or []), str(answer.get("metadata", {}).get("resourceVersion", ""))

    def event(self, of: Mirrored, etype: str, reason: str, message: str) -> None:
        """An Event on the VMMigration (a courtesy: a refusal is logged, never raised)."""
        from include.kube_status import event_body

        try:
            self.core.create_namespaced_event(of.namespace, event_body(of.namespace, of.name, of.uid, etype, reason,
                                                                       message), _request_timeout=(3, 5))
        except Exception as err:  # noqa: BLE001 - the log has it too
            log.warning("could not create the %s event of %s/%s: %s", reason, of.namespace, of.name,
                        getattr(err, "reason", None) or err)

    def _custom(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise  # 403 too: an API server whose RBAC is not loaded yet says so after a restart; a retry helps

    def _grants(self, namespace: str) -> list[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        try:
            answer = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "referencegrants")
        except ApiException as err:
            if err.status == 404:
                return []
            raise
        return list(answer.get("items") or [])

    def documents(self, migration: dict[str, Any]) -> list[dict[str, Any]]:
        """The VMMigration (metadata cut to what the engine reads) and its inventory, as store documents."""
        meta, spec = migration.get("metadata") or {}, migration.get("spec") or {}
        ns, name = meta["namespace"], meta["name"]
        annotations = dict(meta.get("annotations") or {})
        annotations.pop("kubectl.kubernetes.io/last-applied-configuration", None)
        annotations.update({UID_ANNOTATION: str(meta.get("uid")), GENERATION_ANNOTATION: str(meta.get("generation"))})
        docs: list[dict[str, Any]] = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "VMMigration",
                                       "metadata": {"name": name, "namespace": ns, "annotations": annotations,
                                                    **({"labels": meta["labels"]} if meta.get("labels") else {})},
                                       "spec": spec}]
        seen: set[tuple[str, str, str]] = set()

        def add(doc: dict[str, Any] | None) -> dict[str, Any] | None:
            if doc is None:
                return None
            m = doc.get("metadata") or {}
            key = (str(doc.get("kind")), str(m.get("namespace")), str(m.get("name")))
            if key in seen:
                return doc
            seen.add(key)
            docs.append(_clean(doc))
            return doc

        vm_ns = spec.get("sourceNamespace") or ns
        namespaces = {ns, vm_ns}
        vm = add(self._custom("virtualmachines", vm_ns, str(spec.get("sourceName", ""))))
        providers = []
        if vm is not None:
            ref = (vm.get("spec") or {}).get("providerRef") or {}
            providers.append((ref.get("namespace") or vm_ns, ref.get("name")))
        target = spec.get("targetProviderRef") or {}
        providers.append((target.get("namespace") or ns, target.get("name")))
        for pns, pname in providers:
            if not pname:
                continue
            namespaces.add(pns)
            add(self._custom("providers", pns, str(pname)))
        for other in sorted(namespaces - {ns}):
            for grant in self._grants(other):
                add(grant)
        return docs


def fetch_run_documents(inventory: ClusterInventory, namespace: str, name: str, uid: str,
                        generation: int) -> list[dict[str, Any]]:
    """The documents of the run of ``uid``'s ``generation`` (the VMMigration and the inventory it names, as
    ``ClusterInventory.documents`` mirrors them), read from the cluster now, for the run's Validating: a worker
    needs no mirror file, and what an Airflow run's conf carries is never taken as a spec.

    :raises MigrationDeleted: the VMMigration is gone, or the name belongs to another one now
    :raises PlanChanged: the VMMigration is at another generation than the run's (the run is not started for
        an edit: that generation gets its own run)
    """
    from kubernetes.client.exceptions import ApiException

    from include.errors import MigrationDeleted, PlanChanged

    try:
        item = inventory.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "vmmigrations", name)
    except ApiException as err:
        if err.status == 404:
            raise MigrationDeleted(f"the VMMigration {namespace}/{name} (uid {uid}) is not in the cluster any more",
                                   field="metadata.uid") from None
        raise
    meta = item.get("metadata") or {}
    if str(meta.get("uid")) != uid:
        raise MigrationDeleted(f"the VMMigration {namespace}/{name} of this run (uid {uid}) was deleted; the name "
                               f"now belongs to another VMMigration (uid {meta.get('uid')}), which has its own run",
                               field="metadata.uid")
    if int(meta.get("generation") or 1) != int(generation):
        raise PlanChanged(f"this run is of generation {generation}, and the VMMigration is at generation "
                          f"{meta.get('generation')} now: that generation has its own run", field="metadata.generation")
    return inventory.documents(item)


def present(inventory: ClusterInventory, namespace: str, name: str, uid: str) -> bool:
    """Whether the cluster holds the VMMigration ``namespace/name`` of ``uid``; True when it cannot tell (the API
    server not answering: the run goes on as it would have)."""
    from kubernetes.client.exceptions import ApiException

    try:
        item = inventory.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "vmmigrations", name,
                                                             _request_timeout=(3, 10))
    except ApiException as err:
        if err.status == 404:
            return False
        log.warning("could not tell whether VMMigration %s/%s is still in the cluster: HTTP %s", namespace, name,
                    err.status)
        return True
    except Exception as err:  # noqa: BLE001 - see the docstring
        log.warning("could not tell whether VMMigration %s/%s is still in the cluster: %s", namespace, name,
                    type(err).__name__)
        return True
    return str((item.get("metadata") or {}).get("uid")) == uid


def read_secret(api_client: Any, namespace: str, name: str, *, wait: float = 60.0) -> dict[str, Any] | None:
    """A Secret of the cluster as a store document (None when there is none), read as each task needs it. An API
    server that is away for a moment (a restart, an upgrade, a throttle) is waited for up to ``wait`` seconds."""
    import time

    import urllib3
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from include.errors import ConfigurationError

    deadline, pause = time.monotonic() + wait, 1.0
    while True:
        try:
            secret = client.CoreV1Api(api_client).read_namespaced_secret(name, namespace, _request_timeout=(3, 10))
            break
        except ApiException as err:
            if err.status == 404:
                return None
            if err.status in (401, 403) and time.monotonic() + pause > deadline:
                # after a restart an API server refuses for a few seconds, until its RBAC is loaded
                raise ConfigurationError(f"Secret {namespace}/{name}: the engine's identity may not read it (HTTP "
                                         f"{err.status}); the engine reads Secrets only in the namespaces it serves "
                                         f"(a Role each, deploy/rbac/engine.yaml)") from None
            if err.status not in (401, 403, 429) and err.status < 500 or time.monotonic() + pause > deadline:
                raise
        except (urllib3.exceptions.HTTPError, OSError) as err:
            if time.monotonic() + pause > deadline:
                raise ConnectionError(f"Secret {namespace}/{name}: the cluster's API server did not answer for "
                                      f"{wait:.0f} s ({type(err).__name__})") from None
        log.info("Secret %s/%s: the API server is not answering; trying again in %.0f s", namespace, name, pause)
        time.sleep(pause)
        pause = min(pause * 2, 8.0)
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "type": secret.type or "Opaque", "data": dict(secret.data or {})}


def _clean(doc: dict[str, Any]) -> dict[str, Any]:
    """A cluster object as a store document: apiVersion, kind, name/namespace/labels/annotations, spec, data,
    and the status a VirtualMachine's id is read from."""
    meta = doc.get("metadata") or {}
    out: dict[str, Any] = {"apiVersion": doc.get("apiVersion"), "kind": doc.get("kind"),
                           "metadata": {k: meta[k] for k in ("name", "namespace", "labels", "annotations")
                                        if meta.get(k)}}
    for key in ("spec", "data", "type", "status"):
        if key in doc and doc[key] is not None:
            out[key] = doc[key]
    return out


def _write(path: Path, header: str, docs: Iterable[dict[str, Any]]) -> None:
    """Atomically, 0600 (the inventory is the operator's business only)."""
    fd, tmp = tempfile.mkstemp(prefix=".k8s-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(header + "\n")
            yaml.safe_dump_all(list(docs), fh, sort_keys=False)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: what sync does with a VMMigration of the cluster (``decide``)
CURRENT, WRITE, FOREIGN, DEFERRED, COMPLETE = "current", "write", "foreign", "deferred", "complete"


def _of(item: dict[str, Any]) -> Mirrored:
    meta = item.get("metadata") or {}
    return Mirrored(str(meta["namespace"]), str(meta["name"]), str(meta["uid"]), int(meta.get("generation") or 1))


def decide(store: Path, item: dict[str, Any]) -> tuple[Mirrored, Mirrored | None, str]:
    """(the VMMigration as the cluster has it, its mirror as it is, what sync does):

    - ``current``: mirrored as it is; ``foreign``: a file of that name this module did not write (never touched);
    - ``write``: a VMMigration or generation not mirrored yet, and no run of the mirror under way;
    - ``deferred``: a new generation (or a new VMMigration of the same name) while the mirror's run is under way:
      the running run keeps the plan it validated, the mirror stays as it is until that run has ended;
    - ``complete``: a new generation of a VMMigration whose run ended Ready: a migration moves its VM once, the
      edit is not run (a new VMMigration is).
    """
    mine = _of(item)
    path = mirror_path(store, mine.namespace, mine.name)
    header = read_header(path)
    if header == mine:
        return mine, header, CURRENT
    if header is None:
        return mine, None, FOREIGN if path.exists() else WRITE
    phase = _phase(store, header, item)
    if _under_way(store, header, phase):
        return mine, header, DEFERRED
    if phase == "Ready" and header.uid == mine.uid:
        return mine, header, COMPLETE
    return mine, header, WRITE


def sync(inventory: ClusterInventory, store: Path) -> SyncResult:
    """Mirror every VMMigration of the cluster into ``store`` (see the module docstring and ``decide``)."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    items, version = inventory.migrations()
    changed, current, keep, deferred, complete = [], [], set(), [], []
    for item in items:
        mine, header, action = decide(store, item)
        if action != FOREIGN:
            # what the mirror holds now, whose run start_runs asks for: a deferred or completed edit is not it
            current.append(header if action in (DEFERRED, COMPLETE) and header is not None else mine)
        path = mirror_path(store, mine.namespace, mine.name)
        keep.add(path.name)
        if action == WRITE:
            _write(path, HEADER.format(ns=mine.namespace, name=mine.name, uid=mine.uid, gen=mine.generation),
                   inventory.documents(item))
            changed.append(mine)
        elif action in (DEFERRED, COMPLETE) and header is not None:
            (deferred if action == DEFERRED else complete).append(mine)
            _report(inventory, store, mine, header, action)
    removed, held = [], []
    for path in sorted(store.glob(f"{PREFIX}*.yaml")):
        mirrored = read_header(path)
        if path.name in keep or mirrored is None:
            continue
        if _under_way(store, mirrored, _phase(store, mirrored, None)):
            # its DAG must stay while its run goes on (a DAG that vanishes mid-run leaves its cleanup undone);
            # the mirror goes once the run has ended, finalize_migration done
            held.append(path.name)
            continue
        path.unlink()
        _memo(store, mirrored).unlink(missing_ok=True)
        removed.append(path.name)
    return SyncResult(resource_version=version, changed=tuple(changed), current=tuple(current),
                      removed=tuple(removed), held=tuple(held), deferred=tuple(deferred), complete=tuple(complete),
                      wanted=tuple(m for m in current if not ended(store, m)))


def _phase(store: Path, mirrored: Mirrored, item: dict[str, Any] | None) -> str | None:
    """The phase of the mirror's migration: its run's status file, else (no file here) the cluster's status of
    that same VMMigration."""
    from include.runstate import STATUS
    from include.store import SpecStore

    status = SpecStore(store).state.read(mirrored.namespace, mirrored.name, STATUS)
    if status is None and item is not None and str((item.get("metadata") or {}).get("uid")) == mirrored.uid:
        status = item.get("status") or {}
    return (status or {}).get("phase")


def ended(store: Path, mirrored: Mirrored) -> bool:
    """Whether the run of the mirror's uid and generation has ended (its finalize_migration done): it is never
    started again, whatever Airflow's database still holds."""
    from include.phases.context import SPEC
    from include.store import SpecStore

    specs = SpecStore(store)
    saved = specs.state.read(mirrored.namespace, mirrored.name, SPEC) or {}
    if (saved.get("uid"), saved.get("generation")) != (mirrored.uid, mirrored.generation):
        return False
    return specs.run_record(mirrored.namespace, mirrored.name).get("finalized") is True


def _under_way(store: Path, mirrored: Mirrored, phase: str | None) -> bool:
    """Whether the mirror's run (its status at ``phase``) has started and not ended: its phase is not final, or
    it is and the run's finalize_migration has not finished (the failure is recorded before finalize rolls
    back)."""
    from include.store import SpecStore

    if phase in (None, "", "Pending"):
        return False
    if phase not in ("Ready", "Failed"):
        return True
    record = SpecStore(store).run_record(mirrored.namespace, mirrored.name)
    return bool(record.get("run")) and "finalized" in record and record["finalized"] is None


def _memo(store: Path, mirrored: Mirrored) -> Path:
    return Path(store) / f".{PREFIX}{mirrored.namespace}--{mirrored.name}.reported"


def _report(inventory: ClusterInventory, store: Path, mine: Mirrored, header: Mirrored, action: str) -> None:
    """Say once per generation, in an Event on the VMMigration and in the log, that an edit is not run (yet)."""
    memo = _memo(store, header)
    said = f"{mine.uid} {mine.generation} {action}"
    try:
        if memo.read_text() == said:
            return
    except OSError:
        pass
    if action == DEFERRED:
        what = (f"generation {mine.generation}" if mine.uid == header.uid
                else f"a new VMMigration of that name (uid {mine.uid})")
        reason = "SpecChangedDuringRun"
        message = (f"{what} arrived while the run of generation {header.generation} is under way: that run keeps "
                   f"the plan it validated; {what} is taken up once it has ended")
    else:
        reason = "SpecChangedAfterReady"
        message = (f"generation {mine.generation} arrived after the migration of generation {header.generation} "
                   f"ended Ready: a migration moves its VM once, so the edit is not run; create a new VMMigration "
                   f"to migrate again")
    log.info("VMMigration %s/%s: %s", mine.namespace, mine.name, message)
    inventory.event(mine, "Warning" if action == DEFERRED else "Normal", reason, message)
    try:
        memo.write_text(said)
    except OSError:
        pass
