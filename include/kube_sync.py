"""VMMigrations found in a Kubernetes cluster, mirrored into the spec store folder, so that the DAG factory makes
their DAGs as it does for files (parsing stays local: no network at parse), each with its run id derived from the
VMMigration's uid and generation (one run per generation, whoever triggers it, however often).

One file per VMMigration, ``<store>/k8s--<namespace>--<name>.yaml`` (0600), whose first line says it is a mirror
and of which uid and generation: the VMMigration (its spec, and its uid and generation as annotations), and the
inventory it names, read from the cluster: the VirtualMachine (``sourceName`` in ``sourceNamespace``), the
Providers (the VM's and ``targetProviderRef``), the ReferenceGrants of the namespaces referred to, and the Secrets
the Providers and the storage name. What is missing is left out, and Validating names it.

A file is rewritten only when its VMMigration's uid or generation changed (a spec edited mid-run makes a new
generation: the running run finds its pin changed and stops with PlanChanged, see include.phases.context; the
new one runs next); a mirror whose VMMigration
is gone from the cluster is removed, once its run (if one started) has ended: a DAG that vanished mid-run would
leave its cleanup undone. Only files this module wrote (the prefix and the first line) are ever
rewritten or removed; nothing else in the folder is touched.

No Airflow here: the caller gives a ``kubernetes.client.ApiClient``.
"""

from __future__ import annotations

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
    #: every VMMigration in the cluster, as mirrored now
    current: tuple[Mirrored, ...]
    #: mirror files removed: their VMMigration is gone from the cluster
    removed: tuple[str, ...]
    #: mirror files of deleted VMMigrations kept while their run goes on (removed once it has ended)
    held: tuple[str, ...] = ()


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

    def _custom(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as err:
            if err.status in (403, 404):
                return None
            raise

    def _secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as err:
            if err.status in (403, 404):
                return None
            raise
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                "type": secret.type or "Opaque", "data": dict(secret.data or {})}

    def _grants(self, namespace: str) -> list[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        try:
            answer = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "referencegrants")
        except ApiException as err:
            if err.status in (403, 404):
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
            provider = add(self._custom("providers", pns, str(pname)))
            secret = ((provider or {}).get("spec") or {}).get("credentialSecretRef") or {}
            if secret.get("name"):
                add(self._secret(secret.get("namespace") or pns, secret["name"]))
        storage_secret = (spec.get("storage") or {}).get("credentialsSecretRef") or {}
        if storage_secret.get("name"):
            add(self._secret(storage_secret.get("namespace") or ns, storage_secret["name"]))
        for other in sorted(namespaces - {ns}):
            for grant in self._grants(other):
                add(grant)
        return docs


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
    """Atomically, 0600 (the file may hold Secrets)."""
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


def sync(inventory: ClusterInventory, store: Path) -> SyncResult:
    """Mirror every VMMigration of the cluster into ``store`` (see the module docstring)."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    items, version = inventory.migrations()
    changed, current, keep = [], [], set()
    for item in items:
        meta = item.get("metadata") or {}
        mine = Mirrored(str(meta["namespace"]), str(meta["name"]), str(meta["uid"]), int(meta.get("generation") or 1))
        current.append(mine)
        path = mirror_path(store, mine.namespace, mine.name)
        keep.add(path.name)
        if read_header(path) == mine and not (meta.get("deletionTimestamp")):
            continue
        if path.exists() and read_header(path) is None:
            continue  # a file of that name that this module did not write: never overwritten
        _write(path, HEADER.format(ns=mine.namespace, name=mine.name, uid=mine.uid, gen=mine.generation),
               inventory.documents(item))
        changed.append(mine)
    removed, held = [], []
    for path in sorted(store.glob(f"{PREFIX}*.yaml")):
        mirrored = read_header(path)
        if path.name in keep or mirrored is None:
            continue
        if _running(store, mirrored):
            # its DAG must stay while its run goes on (a DAG that vanishes mid-run leaves its cleanup undone);
            # the mirror goes once the run has ended, Ready or Failed
            held.append(path.name)
            continue
        path.unlink()
        removed.append(path.name)
    return SyncResult(resource_version=version, changed=tuple(changed), current=tuple(current),
                      removed=tuple(removed), held=tuple(held))


def _running(store: Path, mirrored: Mirrored) -> bool:
    """Whether the migration's run has started and not ended (its status phase neither Ready nor Failed)."""
    from include.store import SpecStore

    specs = SpecStore(store)
    status = specs.read_json(specs.status_path(mirrored.namespace, mirrored.name)) or {}
    return bool(status.get("phase")) and status.get("phase") not in ("Ready", "Failed", "Pending")
