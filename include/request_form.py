"""The trigger form of ``dags/vmmigration_request.py``: one VMMigration, entered as flat fields.

Three parts, none of which imports Airflow at module level:

- :func:`choices`: what the spec store offers (VirtualMachines with their source Provider, Providers with their
  type, namespaces, Secret names), read from a :class:`include.store.StoreIndex` (local files, no network). They
  become proposals (JSON schema ``examples`` with ``values_display``), never an ``enum``: a VM added after the
  last parse is still accepted by the form, and the inventory check at submit names what does not exist.
- :func:`param_schemas` / :func:`params`: one JSON schema per field (type, pattern, enum, bounds, the guide's
  default, title, description, section), as strict as ``include.spec`` is field by field, so that Airflow refuses
  a bad trigger (HTTP 400 naming the param) before any run exists. Rules across fields (``storage.bucket``
  required for ``s3``) are checked at submit by ``include.submit.check``, each error naming its spec field and
  the form field it came from (:func:`describe`).
- :func:`build_document`: the form's values (the run's ``params``) as a VMMigration document per the guide.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from include.spec import (
    API_VERSION,
    DISK_FORMATS,
    KIND,
    MAX_ATTEMPTS,
    MAX_CPU,
    MAX_DISK_GB,
    MAX_MEMORY_MB,
    NAME_MAX,
    NAMESPACE_MAX,
    STORAGE_TYPES,
    FieldError,
    SpecValidationError,
    show,
)

if TYPE_CHECKING:
    from include.store import StoreIndex

SOURCE, TARGET, STORAGE, HINTS, POLICY = ("Source", "Target", "Intermediate storage", "Disks and hints",
                                          "Cleanup and retry")
SECTIONS = (SOURCE, TARGET, STORAGE, HINTS, POLICY)
#: at most this many proposals per field (the serialized DAG and the drop-down stay small with a big store)
MAX_CHOICES = 1000

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = rf"{_LABEL}(\.{_LABEL})*"
NAME_PATTERN = rf"^{_SUBDOMAIN}$"
NAMESPACE_PATTERN = rf"^{_LABEL}$"
#: ``name`` or ``namespace/name``
REF_PATTERN = rf"^({_LABEL}/)?{_SUBDOMAIN}$"
REF_MAX = NAMESPACE_MAX + 1 + NAME_MAX
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
ENDPOINT_PATTERN = r"^[^\s]+$"
PATH_PATTERN = r"^/[^\n\r\x00]*$"
# as include.spec's _STORAGE_NAME, _NET_NAME and _PORT_GROUP (letters, digits, a few marks, single inner spaces)
STORAGE_HINT_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_.:()-]| (?! )){0,127}$"
NET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
PORT_GROUP_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_.:-]| (?! )){0,63}$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_KEY_PATTERN = rf"^({_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"


@dataclass(frozen=True)
class VMChoice:
    """A VirtualMachine of the store and the Provider it runs on."""

    namespace: str
    name: str
    provider: str | None = None  # namespace/name
    provider_type: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def label(self) -> str:
        on = self.provider or "no provider"
        return f"{self.ref} (on {on}{f', {self.provider_type}' if self.provider_type else ''})"


@dataclass(frozen=True)
class ProviderChoice:
    namespace: str
    name: str
    type: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def label(self) -> str:
        return f"{self.ref} ({self.type or 'no type'})"


@dataclass(frozen=True)
class Choices:
    vms: tuple[VMChoice, ...] = ()
    providers: tuple[ProviderChoice, ...] = ()
    namespaces: tuple[str, ...] = ("default",)
    #: Secret names (never their data), for the storage credentials field
    secrets: tuple[str, ...] = ()


def _spec(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = doc.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def choices(index: StoreIndex) -> Choices:
    """The VirtualMachines, Providers, namespaces and Secret names of a store index, sorted."""
    providers: dict[tuple[str, str], ProviderChoice] = {}
    vms: list[VMChoice] = []
    secrets: set[str] = set()
    namespaces = {"default"}
    for (kind, ns, name), doc in index.objects.items():
        if kind == "Provider":
            ptype = _spec(doc).get("type")
            providers[(ns, name)] = ProviderChoice(ns, name, ptype if isinstance(ptype, str) else None)
            namespaces.add(ns)
        elif kind == "Secret":
            secrets.add(name)
    for (kind, ns, name), doc in index.objects.items():
        if kind != "VirtualMachine":
            continue
        ref = _spec(doc).get("providerRef")
        ref = ref if isinstance(ref, Mapping) else {}
        pname = ref.get("name") if isinstance(ref.get("name"), str) else None
        pns = ref.get("namespace") if isinstance(ref.get("namespace"), str) and ref.get("namespace") else ns
        provider = providers.get((pns, pname)) if pname else None
        vms.append(VMChoice(ns, name, f"{pns}/{pname}" if pname else None, provider.type if provider else None))
        namespaces.add(ns)
    for entry in index.migrations.values():
        namespaces.add(entry.namespace)
    return Choices(vms=tuple(sorted(vms, key=lambda v: (v.namespace, v.name))),
                   providers=tuple(sorted(providers.values(), key=lambda p: (p.namespace, p.name))),
                   namespaces=tuple(sorted(namespaces)), secrets=tuple(sorted(secrets)))


# -- the fields ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormField:
    """One param of the form: its JSON schema, and the spec field it fills (for error messages)."""

    key: str
    spec_path: str
    schema: dict[str, Any]
    description: str
    #: no default: the param is required (Airflow refuses a trigger without it)
    default: Any = field(default=None)
    required: bool = False


def _opt(kind: str) -> list[str]:
    return ["null", kind]


def _proposals(schema: dict[str, Any], values: list[tuple[str, str]]) -> dict[str, Any]:
    """Proposals for a free-text field: ``examples`` with their labels (``values_display``)."""
    values = values[:MAX_CHOICES]
    if values:
        schema["examples"] = [v for v, _ in values]
        schema["values_display"] = {v: label for v, label in values}
    return schema


def form_fields(found: Choices | None = None) -> tuple[FormField, ...]:
    """Every field of the form, in form order; proposals from ``found`` (the store's choices)."""
    found = found or Choices()
    f = FormField
    return (
        # -- Source
        f("migration_name", "metadata.name", {
            "type": "string", "pattern": NAME_PATTERN, "minLength": 1, "maxLength": NAME_MAX,
            "title": "Migration name", "section": SOURCE},
          "The VMMigration's metadata.name (lowercase letters, digits, '-' and '.'); its DAG is "
          "vmmigration__<namespace>__<name>.", required=True),
        f("namespace", "metadata.namespace", _proposals({
            "type": "string", "pattern": NAMESPACE_PATTERN, "minLength": 1, "maxLength": NAMESPACE_MAX,
            "title": "Namespace", "section": SOURCE}, [(n, n) for n in found.namespaces]),
          "The VMMigration's metadata.namespace.", default="default"),
        f("source_vm", "spec.sourceName", _proposals({
            "type": "string", "pattern": REF_PATTERN, "minLength": 1, "maxLength": REF_MAX,
            "title": "Source VM", "section": SOURCE}, [(v.ref, v.label) for v in found.vms]),
          "The VirtualMachine to migrate, as namespace/name (spec.sourceNamespace/spec.sourceName) or name "
          "(in the migration's namespace).", required=True),
        f("labels", "metadata.labels", {
            "type": _opt("object"), "title": "Labels", "section": SOURCE,
            "propertyNames": {"pattern": LABEL_KEY_PATTERN, "maxLength": 317},
            "additionalProperties": {"type": "string", "pattern": LABEL_VALUE_PATTERN, "maxLength": 63}},
          "Optional metadata.labels of the VMMigration, as a JSON object of strings."),
        # -- Target
        f("target_provider", "spec.targetProviderRef", _proposals({
            "type": "string", "pattern": REF_PATTERN, "minLength": 1, "maxLength": REF_MAX,
            "title": "Target provider", "section": TARGET}, [(p.ref, p.label) for p in found.providers]),
          "The Provider the VM moves to, as namespace/name or name (spec.targetProviderRef).", required=True),
        f("target_name", "spec.targetName", {
            "type": _opt("string"), "pattern": NAME_PATTERN, "maxLength": NAME_MAX,
            "title": "Target VM name", "section": TARGET},
          "The new VM's name (spec.targetName); empty: the source VM's name."),
        f("target_disk_format", "spec.targetDiskFormat", {
            "type": _opt("string"), "enum": [None, *DISK_FORMATS], "title": "Target disk format",
            "section": TARGET,
            "values_display": {"null": "the target's native format", **{d: d for d in DISK_FORMATS}}},
          "spec.targetDiskFormat: qcow2, vmdk or raw; empty: the target hypervisor's native format."),
        f("target_storage_hint", "spec.targetStorageHint", {
            "type": _opt("string"), "pattern": STORAGE_HINT_PATTERN, "maxLength": 128,
            "title": "Target storage", "section": TARGET},
          "spec.targetStorageHint: a libvirt pool, a vSphere datastore, a Proxmox storage; empty: the Provider's "
          "default."),
        # -- Intermediate storage
        f("storage_type", "spec.storage.type", {
            "type": "string", "enum": list(STORAGE_TYPES), "title": "Storage type", "section": STORAGE,
            "values_display": {"s3": "S3 (bucket)", "http": "HTTP (WebDAV endpoint)", "nfs": "NFS (mounted share)"}},
          "spec.storage.type: where the disks travel through.", required=True),
        f("storage_bucket", "spec.storage.bucket", {
            "type": _opt("string"), "pattern": BUCKET_PATTERN, "title": "S3 bucket", "section": STORAGE},
          "spec.storage.bucket (s3 only, required there)."),
        f("storage_endpoint", "spec.storage.endpoint", {
            "type": _opt("string"), "pattern": ENDPOINT_PATTERN, "maxLength": 2048, "title": "Storage endpoint",
            "section": STORAGE},
          "spec.storage.endpoint: the S3 endpoint (empty: AWS), the http(s):// URL (http, required), the NFS "
          "server (nfs, informative)."),
        f("storage_region", "spec.storage.region", {
            "type": _opt("string"), "pattern": ENDPOINT_PATTERN, "maxLength": 64, "title": "S3 region",
            "section": STORAGE},
          "spec.storage.region (s3); empty: us-east-1."),
        f("storage_path", "spec.storage.path", {
            "type": _opt("string"), "pattern": PATH_PATTERN, "maxLength": 4096, "title": "NFS path",
            "section": STORAGE},
          "spec.storage.path (nfs only, required there): the share's mount point on the workers."),
        f("storage_credentials_secret", "spec.storage.credentialsSecretRef", _proposals({
            "type": _opt("string"), "pattern": NAME_PATTERN, "maxLength": NAME_MAX,
            "title": "Storage credentials Secret", "section": STORAGE}, [(s, s) for s in found.secrets]),
          "spec.storage.credentialsSecretRef.name: a Secret in the migration's namespace (required for s3; the "
          "bearer token for http)."),
        # -- Disks and hints
        f("network_hints", "spec.targetNetworkHints", {
            "type": _opt("array"), "title": "Network hints", "section": HINTS, "maxItems": 64,
            "items": {"type": "object", "additionalProperties": False, "required": ["name"],
                      "properties": {"name": {"type": "string", "pattern": NET_NAME_PATTERN},
                                     "network": {"type": "string", "pattern": PORT_GROUP_PATTERN},
                                     "bridge": {"type": "string", "pattern": NET_NAME_PATTERN}},
                      "oneOf": [{"required": ["network"]}, {"required": ["bridge"]}]}},
          'spec.targetNetworkHints, a JSON list: [{"name": "eth0", "bridge": "virbr0"}] (libvirt, Proxmox) or '
          '[{"name": "eth0", "network": "VM Network"}] (vSphere).', default=[]),
        f("cpu", "spec.targetResourceHints.cpu", {
            "type": _opt("integer"), "minimum": 1, "maximum": MAX_CPU, "title": "vCPUs", "section": HINTS},
          "spec.targetResourceHints.cpu; empty: as the source VM."),
        f("memory_mb", "spec.targetResourceHints.memory", {
            "type": _opt("integer"), "minimum": 16, "maximum": MAX_MEMORY_MB, "title": "Memory (MiB)",
            "section": HINTS},
          "spec.targetResourceHints.memory in MiB (the guide's MB); empty: as the source VM."),
        f("disk_gb", "spec.targetResourceHints.disk", {
            "type": _opt("integer"), "minimum": 1, "maximum": MAX_DISK_GB, "title": "Disk (GiB)", "section": HINTS},
          "spec.targetResourceHints.disk in GiB (the guide's GB); empty: as the source disks."),
        # -- Cleanup and retry (the guide's defaults)
        f("delete_intermediate", "spec.cleanupPolicy.deleteIntermediate", {
            "type": "boolean", "title": "Delete intermediate files", "section": POLICY},
          "spec.cleanupPolicy.deleteIntermediate: remove the disks from the storage after the migration.",
          default=True),
        f("delete_snapshot", "spec.cleanupPolicy.deleteSnapshot", {
            "type": "boolean", "title": "Delete the source snapshot", "section": POLICY},
          "spec.cleanupPolicy.deleteSnapshot.", default=True),
        f("delete_source", "spec.cleanupPolicy.deleteSource", {
            "type": "boolean", "title": "Delete the source VM (dangerous)", "section": POLICY},
          "spec.cleanupPolicy.deleteSource: delete the source VM after a successful migration.", default=False),
        f("max_attempts", "spec.retryPolicy.maxAttempts", {
            "type": "integer", "minimum": 0, "maximum": MAX_ATTEMPTS, "title": "Retries per phase",
            "section": POLICY},
          "spec.retryPolicy.maxAttempts.", default=3),
        f("backoff_duration", "spec.retryPolicy.backoffDuration", {
            "type": "string", "pattern": DURATION_PATTERN, "maxLength": 64, "title": "First retry delay",
            "section": POLICY},
          "spec.retryPolicy.backoffDuration, such as 30s, 5m or 1h30m (doubled at each retry).", default="5m"),
        f("max_backoff_duration", "spec.retryPolicy.maxBackoffDuration", {
            "type": "string", "pattern": DURATION_PATTERN, "maxLength": 64, "title": "Longest retry delay",
            "section": POLICY},
          "spec.retryPolicy.maxBackoffDuration, at most 24h.", default="30m"),
    )


FIELDS = form_fields()
KEYS = tuple(f.key for f in FIELDS)


def param_schemas(found: Choices | None = None) -> dict[str, dict[str, Any]]:
    """Each param's keyword arguments for ``airflow.sdk.Param``: ``default`` (absent when required),
    ``description`` and the JSON schema keywords."""
    out: dict[str, dict[str, Any]] = {}
    for f in form_fields(found):
        kwargs: dict[str, Any] = {"description": f.description, **f.schema}
        if not f.required:
            kwargs["default"] = f.default
        out[f.key] = kwargs
    return out


def params(found: Choices | None = None) -> dict[str, Any]:
    """The form as ``airflow.sdk.Param`` objects (the DAG's ``params``)."""
    from airflow.sdk import Param

    return {key: Param(kwargs.pop("default"), **kwargs) if "default" in kwargs else Param(**kwargs)
            for key, kwargs in param_schemas(found).items()}


# -- values -> VMMigration ----------------------------------------------------------------------------------------


class FormError(SpecValidationError):
    """Form values that do not make a VMMigration; each error names the form field (and the spec field)."""


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _split_ref(value: str, default_namespace: str) -> tuple[str, str]:
    ns, _, name = value.rpartition("/")
    return (ns or default_namespace), name


def build_document(values: Mapping[str, Any]) -> dict[str, Any]:
    """The VMMigration document the form's values describe (``values``: the run's params, defaults filled in
    for whatever was not given). Only what was entered is written, plus the guide's cleanup and retry policies
    in full; ``include.submit.check`` then checks it as Validating would.

    :raises FormError: a field that is not a form field (the closest one suggested), a required one missing or
        blank, or a value of the wrong type; each error names the form field
    """
    errors: list[FieldError] = []
    for key in values:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1, cutoff=0.6) if len(str(key)) <= 64 else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(FieldError(_form_path(str(key)), f"not a field of the form{hint}"))
    v = {f.key: values.get(f.key, f.default) for f in FIELDS}
    for f in FIELDS:
        value = v[f.key]
        if f.required and _blank(value):
            errors.append(FieldError(_form_path(f.key), f"required ({f.spec_path})"))
        elif f.schema["type"] in ("string", _opt("string")) and not _blank(value) and not isinstance(value, str):
            errors.append(FieldError(_form_path(f.key), f"must be a string, got {show(value)}"))
    if errors:
        raise FormError(errors)
    text = {k: (x.strip() if isinstance(x, str) else x) for k, x in v.items()}
    namespace = text["namespace"] if not _blank(text["namespace"]) else "default"
    source_ns, source_name = _split_ref(text["source_vm"], namespace)
    target_ns, target_name = _split_ref(text["target_provider"], namespace)
    spec: dict[str, Any] = {
        "sourceName": source_name,
        "sourceNamespace": source_ns,
        "targetProviderRef": {"name": target_name, "namespace": target_ns},
    }
    for key, spec_key in (("target_name", "targetName"), ("target_storage_hint", "targetStorageHint"),
                          ("target_disk_format", "targetDiskFormat")):
        if not _blank(text[key]):
            spec[spec_key] = text[key]
    storage: dict[str, Any] = {"type": text["storage_type"]}
    for key in ("bucket", "endpoint", "region", "path"):
        if not _blank(text[f"storage_{key}"]):
            storage[key] = text[f"storage_{key}"]
    if not _blank(text["storage_credentials_secret"]):
        storage["credentialsSecretRef"] = {"name": text["storage_credentials_secret"], "namespace": namespace}
    spec["storage"] = storage
    if text["network_hints"]:
        spec["targetNetworkHints"] = text["network_hints"]
    resources = {spec_key: text[key] for key, spec_key in (("cpu", "cpu"), ("memory_mb", "memory"),
                                                           ("disk_gb", "disk")) if text[key] is not None}
    if resources:
        spec["targetResourceHints"] = resources
    spec["cleanupPolicy"] = {"deleteIntermediate": text["delete_intermediate"],
                             "deleteSnapshot": text["delete_snapshot"], "deleteSource": text["delete_source"]}
    spec["retryPolicy"] = {"maxAttempts": text["max_attempts"], "backoffDuration": text["backoff_duration"],
                           "maxBackoffDuration": text["max_backoff_duration"]}
    metadata: dict[str, Any] = {"name": text["migration_name"], "namespace": namespace}
    if text["labels"]:
        metadata["labels"] = text["labels"]
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def _form_path(key: str) -> str:
    return f"params.{key}" if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key) else f"params[{show(key)}]"


_BY_SPEC_PATH = sorted(((f.spec_path, f) for f in FIELDS), key=lambda p: -len(p[0]))
_EXTRA = {"spec.sourceNamespace": "source_vm", "spec.storage": "storage_type", "spec": "migration_name"}


def form_field_for(spec_path: str) -> str | None:
    """The form field a spec field path comes from (``spec.targetNetworkHints[0].bridge`` -> ``network_hints``)."""
    if spec_path.startswith("params"):
        return None
    for path, f in _BY_SPEC_PATH:
        if spec_path == path or spec_path.startswith((f"{path}.", f"{path}[")):
            return f.key
    for path, key in _EXTRA.items():
        if spec_path == path or spec_path.startswith((f"{path}.", f"{path}[")):
            return key
    return None


def describe(errors: list[FieldError]) -> list[str]:
    """One line per error: the spec field, the form field it came from, the problem."""
    lines = []
    for err in errors:
        key = form_field_for(err.path)
        lines.append(f"{err.path} (form field {key}): {err.message}" if key else str(err))
    return lines


# -- submitting ---------------------------------------------------------------------------------------------------


def submit(values: Mapping[str, Any], store: Any, *, via: str, by: str = "?", api_client: Any = None) -> Any:
    """The form as a VMMigration, checked, then written into ``store`` (an ``include.store.SpecStore``) or, with
    ``api_client`` (a ``kubernetes.client.ApiClient``), created in the cluster; returns the
    ``include.submit.Submitted``. In the store, the check follows every reference through the store's inventory,
    as Validating will; in a cluster, the spec's own rules (Validating follows the references from the cluster,
    whose VMs the store may not mirror yet).

    :raises FormError: the values do not make a VMMigration (nothing was written)
    :raises SpecValidationError: the VMMigration is refused, each error naming its field (nothing was written)
    """
    from include.inventory import BundleInventory
    from include.submit import check, submit_to_cluster, submit_to_store

    doc = build_document(values)
    errors = check(doc, None if api_client is not None else BundleInventory(store.index().objects))
    if errors:
        raise SpecValidationError(errors)
    if api_client is not None:
        return submit_to_cluster(api_client, doc, via=via, by=by)
    return submit_to_store(store, doc, via=via, by=by)


def refusal(values: Mapping[str, Any], err: SpecValidationError) -> str:
    """What a refused form says: the migration, then one line per error naming the spec and the form field."""
    name, ns = values.get("migration_name"), values.get("namespace") or "default"
    what = f"VMMigration {ns}/{name}" if isinstance(name, str) and isinstance(ns, str) else "the form"
    return f"{what} refused (nothing was written):\n" + "\n".join(f"- {line}" for line in describe(err.errors))
