"""A VMMigration submitted from Airflow (the trigger form, a wave plan) becomes an ordinary VMMigration: checked as
Validating would check it, then written into the spec store as a file of its own, or created in the cluster, so
that the DAG factory makes its DAG as for any other and the same per-migration pipeline runs it. There is no
second pipeline: what is submitted here is only ever run by its own ``vmmigration__<namespace>__<name>`` DAG.

A submission never overwrites what it did not write. The store file is ``<store>/submitted--<ns>.<name>.yaml``
(a namespace holds no ``.``, so two migrations never share a file), whose first line says it was submitted and by
whom (``HEADER``: the form's run, the wave plan); a VMMigration of that name defined anywhere else (a file of the
operator's, a mirror of the cluster) refuses the submission. Submitting the same spec again is a no-op (a re-run
of a wave). A different spec replaces the file only after the migration Failed, or, before its first run has
started (no status yet, or Pending), only for the same submitter (a retry of the same form run, the same plan):
a second person's form never replaces the first one's migration while it waits for its run. A migration that
ended Ready, or is under way, is never replaced (a migration moves its VM once).

No Airflow here.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from include.inventory import BundleInventory, resolve
from include.spec import KIND, FieldError, SpecValidationError, parse_vmmigration
from include.store import SpecStore, dag_id_for, locked

API_VERSION = "infra.virtrigaud.io/v1beta1"
PREFIX = "submitted--"
HEADER = "# submitted through Airflow ({via}) by {by} to the VM migration engine: VMMigration {ns}/{name}"
_BY = re.compile(r"^# submitted through Airflow \(.*\) by (\S+) to the VM migration engine: ")
#: the phases of a migration whose first run has not started
_NOT_STARTED = ("Pending", None)


@dataclass(frozen=True)
class Submitted:
    """Where a submitted VMMigration went and how its DAG run is started."""

    namespace: str
    name: str
    #: "store" or "cluster"
    where: str
    #: False when the same spec was there already (nothing was written)
    written: bool
    #: the run id to trigger (a cluster VMMigration's run id is its generation's, include.kube_sync.run_id_for)
    run_id: str | None = None
    conf: dict[str, Any] = field(default_factory=dict)
    #: the phase of the migration's status when it was submitted (Ready: nothing left to do)
    phase: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def dag_id(self) -> str:
        return dag_id_for(self.namespace, self.name)


def submitted_path(store: SpecStore, namespace: str, name: str) -> Path:
    """``submitted--<ns>.<name>.yaml``: unambiguous, since a namespace (a DNS label) has no ``.``."""
    return store.root / f"{PREFIX}{namespace}.{name}.yaml"


def normalized(doc: dict[str, Any]) -> dict[str, Any]:
    """The document as it is written: apiVersion and kind set, the namespace explicit, no status."""
    out = copy.deepcopy(doc)
    out["apiVersion"] = API_VERSION
    out["kind"] = KIND
    meta = out.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise SpecValidationError([FieldError("metadata", "must be a mapping")])
    meta.setdefault("namespace", "default")
    out.pop("status", None)
    return out


def check(doc: dict[str, Any], inventory: BundleInventory | None) -> list[FieldError]:
    """Every problem of ``doc`` (a VMMigration document), each naming its field: the spec's own rules, then
    (when an inventory is given) every reference followed as Validating follows it. An empty list: valid."""
    try:
        migration = parse_vmmigration(doc)
    except SpecValidationError as err:
        return list(err.errors)
    from include.storage.http import refuse_userinfo

    try:  # credentials come from Secrets only: never written into a spec file or a run's conf
        refuse_userinfo(migration.spec.storage.endpoint)
    except Exception as err:  # noqa: BLE001 - its message names the field and hides the userinfo
        return [FieldError("spec.storage.endpoint", str(err).removeprefix("spec.storage.endpoint: "))]
    if inventory is None:
        return []
    try:
        resolve(migration, inventory)
    except SpecValidationError as err:
        return list(err.errors)
    return []


def _owner(store: SpecStore, namespace: str, name: str) -> Path | None:
    """The spec file that defines VMMigration namespace/name, if any."""
    entry = store.index().migrations.get(f"{namespace}/{name}")
    return entry.path if entry is not None else None


def submit_to_store(store: SpecStore, doc: dict[str, Any], *, via: str, by: str,
                    check_inventory: bool = True) -> Submitted:
    """Check ``doc`` and write it into the store as its own file; see the module doc for what is refused.
    ``by`` names the submitter (the form's ``dag_id/run_id``, a wave plan's DAG id; no spaces).

    :raises SpecValidationError: the problems, each naming its field (nothing was written)
    """
    doc = normalized(doc)
    index = store.index()
    errors = check(doc, BundleInventory(index.objects) if check_inventory else None)
    if errors:
        raise SpecValidationError(errors)
    ns, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
    path = submitted_path(store, ns, name)
    store.root.mkdir(parents=True, exist_ok=True)
    by = re.sub(r"\s", "_", by) or "?"
    with locked(path):  # .submitted--<ns>.<name>.yaml.lock beside it
        owner = _owner(store, ns, name)
        if owner is not None and owner != path:
            raise _taken(ns, name, f"is already defined in {owner.name}")
        status = _status(store, ns, name)
        phase = status.get("phase") if status else None
        if path.exists():
            current, header = _read(path)
            meta = current.get("metadata") if isinstance(current, dict) else None
            if not isinstance(meta, dict) or (meta.get("namespace"), meta.get("name")) != (ns, name):
                raise _taken(ns, name, f"would replace {path.name}, which holds another document")
            if _same(current, doc):
                return Submitted(ns, name, "store", False, phase=phase)
            if phase == "Ready":
                raise _taken(ns, name, "has moved its VM already (Ready)")
            if phase in _NOT_STARTED and header != by:
                raise _taken(ns, name, f"was submitted by {header or 'someone else'} and waits for its run")
            if phase not in _NOT_STARTED and phase != "Failed":
                raise _taken(ns, name, f"is being migrated ({phase}); its spec cannot change now")
        _write(path, HEADER.format(via=via, by=by, ns=ns, name=name), doc)
    return Submitted(ns, name, "store", True, phase=phase)


def _taken(ns: str, name: str, why: str) -> SpecValidationError:
    return SpecValidationError([FieldError("metadata.name", f"VMMigration {ns}/{name} {why}; choose another name")])


def _status(store: SpecStore, namespace: str, name: str) -> dict[str, Any] | None:
    from include.store import FileStatusSink

    try:
        return FileStatusSink(store).get(namespace, name)
    except Exception:  # noqa: BLE001 - no status yet (or none readable) is a migration that never ran
        return None


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _read(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The submitted document and who submitted it (from the first line)."""
    try:
        text = path.read_text()
        docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    except (OSError, UnicodeError, yaml.YAMLError):
        return None, None
    match = _BY.match(text.partition("\n")[0])
    return (docs[0] if len(docs) == 1 else None), (match.group(1) if match else None)


def _write(path: Path, header: str, doc: dict[str, Any]) -> None:
    text = f"{header}\n" + yaml.safe_dump(doc, sort_keys=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_VIA_ANNOTATION = "vmmigration.virtrigaud.io/submitted-via"
#: the submitter (the form's run): only its own retry is taken for the same submission
_BY_ANNOTATION = "vmmigration.virtrigaud.io/submitted-by"


class ClusterRefused(RuntimeError):
    """The cluster refused the create for a reason no retry mends (no permission, no VMMigration resource);
    the message says what to grant or install. Nothing was created."""


#: what the identity that submits needs (deploy/rbac/submitter.yaml grants it, per namespace)
SUBMITTER_RBAC = "deploy/rbac/submitter.yaml"


def submit_to_cluster(api_client: Any, doc: dict[str, Any], *, via: str, by: str) -> Submitted:
    """Create ``doc`` in the cluster (checked for the spec's own rules first; references are followed by
    Validating from the cluster, as for any VMMigration applied with kubectl). An existing VMMigration of that
    name is never replaced: the submission is refused naming metadata.name, unless it is this very submission
    (same ``via``, same submitter ``by``, same spec: a retry whose first create went through), which is then
    returned unwritten.

    :raises SpecValidationError: the problems, each naming its field (nothing was created)
    :raises ClusterRefused: no permission to create (or read) VMMigrations there, or no such resource
    """
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    from include.kube_sync import GROUP, VERSION, run_id_for

    doc = normalized(doc)
    errors = check(doc, None)
    if errors:
        raise SpecValidationError(errors)
    ns, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
    doc["metadata"].setdefault("annotations", {}).update({_VIA_ANNOTATION: via, _BY_ANNOTATION: by})
    api = CustomObjectsApi(api_client)
    try:
        made = api.create_namespaced_custom_object(GROUP, VERSION, ns, "vmmigrations", doc)
    except ApiException as err:
        if err.status == 409:
            # a retry whose first create went through (its reply lost): the same submission, not a clash
            try:
                there = api.get_namespaced_custom_object(GROUP, VERSION, ns, "vmmigrations", name)
            except ApiException as again:
                if again.status in (401, 403):
                    raise ClusterRefused(
                        f"VMMigration {ns}/{name} exists in the cluster, and it cannot be read to tell whether "
                        f"it is this submission's (HTTP {again.status}: {_reason(again)}); the form's identity "
                        f"needs get on vmmigrations there ({SUBMITTER_RBAC})") from None
                raise  # deleted since (404) or the server away: a retry looks again
            annotations = (there.get("metadata") or {}).get("annotations") or {}
            if (annotations.get(_VIA_ANNOTATION), annotations.get(_BY_ANNOTATION)) == (via, by) and _same(
                    there.get("spec"), doc.get("spec")):
                meta = there["metadata"]
                uid, generation = meta["uid"], int(meta.get("generation") or 1)
                return Submitted(ns, name, "cluster", False, run_id=run_id_for(uid, generation),
                                 conf={"uid": uid, "generation": generation},
                                 phase=(there.get("status") or {}).get("phase"))
            raise SpecValidationError([FieldError("metadata.name", f"VMMigration {ns}/{name} exists in the cluster "
                                                                   f"already; choose another name")]) from None
        if err.status in (400, 422):
            raise SpecValidationError([FieldError("spec", f"refused by the cluster: {_reason(err)}")]) from None
        _refused_for_good(err, ns)
        raise
    meta = made["metadata"]
    uid, generation = meta["uid"], int(meta.get("generation") or 1)
    return Submitted(ns, name, "cluster", True, run_id=run_id_for(uid, generation),
                     conf={"uid": uid, "generation": generation})


def _refused_for_good(err: Any, namespace: str) -> None:
    """Raise ClusterRefused for a refused create that a retry does not mend; return for the rest (5xx, 429)."""
    if err.status == 401:
        raise ClusterRefused(f"the cluster rejected the credentials of the form's kubernetes connection (HTTP 401: "
                             f"{_reason(err)}): an expired or revoked token? Nothing was created") from None
    if err.status == 403:
        raise ClusterRefused(f"the cluster refused to create VMMigrations in namespace {namespace} (HTTP 403: "
                             f"{_reason(err)}); the identity of the form's kubernetes connection needs create and "
                             f"get on vmmigrations.infra.virtrigaud.io there ({SUBMITTER_RBAC}), nothing was "
                             f"created") from None
    if err.status == 404:
        details = _body(err).get("details") or {}
        if details.get("kind") == "namespaces":
            raise ClusterRefused(f"the cluster has no namespace {namespace} (HTTP 404: {_reason(err)}); set the "
                                 f"form's namespace to one that exists, nothing was created") from None
        raise ClusterRefused(f"the cluster has no VMMigration resource (HTTP 404: {_reason(err)}); apply the CRDs "
                             f"of deploy/crds/, nothing was created") from None


def _body(err: Any) -> dict[str, Any]:
    try:
        body = json.loads(err.body or "{}")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _reason(err: Any) -> str:
    """The API server's message of a refusal (its Status object), else the HTTP status line's reason."""
    return str(_body(err).get("message") or err.reason)[:500]
