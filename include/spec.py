"""The VMMigration contract: the user guide's ``spec`` fields, their defaults and their validation.

Parsing never stops at the first problem: every error is collected with the path of the field
it concerns (``spec.storage.bucket: required when type is s3``) so that ``validate`` can print
them all at once. Unknown fields are errors too, with the closest known name suggested.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

API_GROUP = "infra.virtrigaud.io"
API_VERSION = f"{API_GROUP}/v1beta1"
KIND = "VMMigration"

DISK_FORMATS = ("qcow2", "vmdk", "raw")
STORAGE_TYPES = ("s3", "http", "nfs")

_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}

#: Kubernetes' limits: a namespace is a DNS label, an object name a DNS subdomain.
NAMESPACE_MAX = 63
NAME_MAX = 253
#: The longest retryPolicy duration (backoffDuration, maxBackoffDuration) that is accepted.
MAX_RETRY_DURATION = 24 * 3600
MAX_ATTEMPTS = 100
MAX_CPU = 4096
MAX_MEMORY_MB = 64 * 1024 * 1024  # 64 TiB
MAX_DISK_GB = 1024 * 1024  # 1 PiB
# A NIC name, a libvirt/Proxmox bridge: letters, digits and ``_ . : -``; a vSphere port group
# ("VM Network") may also hold single inner spaces.
_NET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_PORT_GROUP = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]| (?! )){0,63}(?<! )")
# A libvirt pool, a vSphere datastore ("datastore1", "datastore1 (1)"), a Proxmox storage ("local-lvm").
_STORAGE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.:()-]| (?! )){0,127}(?<! )")
_NET_WHAT = "interface or bridge name (letters, digits, '_', '.', ':' and '-', at most 64)"
_SHOW_MAX = 80


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of a VMMigration."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecValidationError(ValueError):
    """A VMMigration failed validation; ``errors`` lists every problem with its field path."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))

    def __reduce__(self):
        return (self.__class__, (self.errors,))


def parse_duration(text: str) -> float:
    """Parse a Go-style duration (``5m``, ``1h30m``, ``90s``) into seconds.

    :raises ValueError: when the text is not a positive duration.
    """
    text = str(text).strip()
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(f"{show(text)} is not a duration such as 30s, 5m or 1h30m")
    return total


def _dns_problem(value: Any, limit: int, pattern: re.Pattern[str], what: str) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {_type_name(value)}"
    if len(value) > limit:
        return f"{show(value)} is longer than {limit} characters"
    if not pattern.fullmatch(value):
        return f"{show(value)} is not a valid {what}"
    return None


def name_problem(value: Any) -> str | None:
    """Why ``value`` is not a Kubernetes object name (a DNS-1123 subdomain), or None when it is one."""
    return _dns_problem(value, NAME_MAX, _DNS1123, "name (lowercase letters, digits, '-' and '.')")


def namespace_problem(value: Any) -> str | None:
    """Why ``value`` is not a Kubernetes namespace (a DNS-1123 label), or None when it is one."""
    return _dns_problem(value, NAMESPACE_MAX, _DNS_LABEL, "namespace (lowercase letters, digits and '-')")


def show(value: Any) -> str:
    """``repr(value)``, cut to a readable length (error messages quote what they refuse)."""
    text = repr(value)
    return text if len(text) <= _SHOW_MAX else f"{text[:_SHOW_MAX - 20]}...{text[-12:]} ({len(str(value))} chars)"


def format_duration(seconds: float) -> str:
    """Render seconds the way the guide writes durations (``5m``, ``1h30m``, ``45s``)."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return out or "0s"


@dataclass(frozen=True)
class ObjectRef:
    name: str
    namespace: str


@dataclass(frozen=True)
class NetworkHint:
    name: str
    network: str | None = None
    bridge: str | None = None


@dataclass(frozen=True)
class ResourceHints:
    cpu: int | None = None
    memory: int | None = None  # MB
    disk: int | None = None  # GB


@dataclass(frozen=True)
class StorageSpec:
    type: str
    bucket: str | None = None
    endpoint: str | None = None
    region: str | None = None
    path: str | None = None
    credentialsSecretRef: ObjectRef | None = None


@dataclass(frozen=True)
class CleanupPolicy:
    deleteIntermediate: bool = True
    deleteSnapshot: bool = True
    deleteSource: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    maxAttempts: int = 3
    backoffDuration: str = "5m"
    maxBackoffDuration: str = "30m"

    @property
    def backoff_seconds(self) -> float:
        return parse_duration(self.backoffDuration)

    @property
    def max_backoff_seconds(self) -> float:
        return parse_duration(self.maxBackoffDuration)


@dataclass(frozen=True)
class VMMigrationSpec:
    sourceName: str
    sourceNamespace: str
    targetProviderRef: ObjectRef
    targetName: str
    storage: StorageSpec
    targetStorageHint: str | None = None
    targetDiskFormat: str | None = None
    targetNetworkHints: tuple[NetworkHint, ...] = ()
    targetResourceHints: ResourceHints = field(default_factory=ResourceHints)
    cleanupPolicy: CleanupPolicy = field(default_factory=CleanupPolicy)
    retryPolicy: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True)
class VMMigration:
    name: str
    namespace: str
    spec: VMMigrationSpec
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        """The normalised resource, defaults filled in (what ``plan --json`` and the store show)."""
        spec = asdict(self.spec)
        spec["targetNetworkHints"] = [
            {k: v for k, v in hint.items() if v is not None} for hint in spec["targetNetworkHints"]
        ]
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": dict(self.labels)},
            "spec": _drop_none(spec),
        }


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


class _Reader:
    """Walks a raw mapping, collecting typed values and field errors."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def mapping(self, raw: Any, path: str, known: tuple[str, ...]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.error(path or "(document)", f"must be an object, got {_type_name(raw)}")
            return {}
        for key in raw:
            if key not in known:
                close = (difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                         if isinstance(key, str) and len(key) <= 64 else [])
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known fields: {', '.join(known)})"
                self.error(_key_path(path, key), f"unknown field{hint}")
        return raw

    def string(self, raw: dict, key: str, path: str, *, required: bool = False, default: str | None = None,
               dns: bool = False, namespace: bool = False, enum: tuple[str, ...] | None = None,
               pattern: re.Pattern[str] | None = None, what: str = "") -> str | None:
        """A string field; ``dns``/``namespace`` check Kubernetes' name rules, ``pattern`` any other."""
        value = raw.get(key)
        where = f"{path}.{key}"
        if value is None or value == "":
            if required:
                self.error(where, "required")
            return default
        if not isinstance(value, str):
            self.error(where, f"must be a string, got {_type_name(value)}")
            return default
        if enum is not None and value not in enum:
            close = difflib.get_close_matches(value, enum, n=1, cutoff=0.5) if len(value) <= 64 else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.error(where, f"must be one of {', '.join(enum)}, got {show(value)}{hint}")
            return default
        problem = namespace_problem(value) if namespace else name_problem(value) if dns else None
        if problem is None and pattern is not None and not pattern.fullmatch(value):
            problem = f"{show(value)} is not a valid {what or 'value'}"
        if problem:
            self.error(where, problem)
            return default
        return value

    def integer(self, raw: dict, key: str, path: str, *, minimum: int, maximum: int,
                default: int | None = None) -> int | None:
        value = raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(f"{path}.{key}", f"must be an integer, got {_type_name(value)}")
            return default
        if value < minimum:
            self.error(f"{path}.{key}", f"must be at least {minimum}, got {_show_int(value)}")
            return default
        if value > maximum:
            self.error(f"{path}.{key}", f"must be at most {maximum}, got {_show_int(value)}")
            return default
        return value

    def boolean(self, raw: dict, key: str, path: str, default: bool) -> bool:
        value = raw.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.error(f"{path}.{key}", f"must be true or false, got {show(value)}")
            return default
        return value

    def duration(self, raw: dict, key: str, path: str, default: str, *, maximum: float) -> str:
        value = raw.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self.error(f"{path}.{key}", f"must be a duration such as 30s, 5m or 1h30m, got {_type_name(value)}")
            return default
        try:
            seconds = parse_duration(value)
        except ValueError:
            self.error(f"{path}.{key}", f"{show(value)} is not a duration such as 30s, 5m or 1h30m")
            return default
        if seconds <= 0:
            self.error(f"{path}.{key}", "must be longer than 0s")
            return default
        if seconds > maximum:
            self.error(f"{path}.{key}", f"{show(value)} is longer than the maximum {format_duration(maximum)}")
            return default
        return value

    def ref(self, raw: dict, key: str, path: str, default_namespace: str, *, required: bool) -> ObjectRef | None:
        where = f"{path}.{key}"
        if raw.get(key) is None:
            if required:
                self.error(where, "required")
            return None
        body = self.mapping(raw.get(key), where, ("name", "namespace"))
        name = self.string(body, "name", where, required=True, dns=True)
        namespace = self.string(body, "namespace", where, default=default_namespace, namespace=True)
        if name is None:
            return None
        return ObjectRef(name=name, namespace=namespace or default_namespace)


def _key_path(path: str, key: Any) -> str:
    """The path of a (possibly odd) key: ``spec.foo``, or ``spec['a.b\\n']`` when it is no plain word."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{show(key)}]" if path else f"[{show(key)}]"


def _show_int(value: int) -> str:
    return str(value) if abs(value) < 10**30 else "a number of more than 30 digits"


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


SPEC_FIELDS = ("sourceName", "sourceNamespace", "targetProviderRef", "targetName", "targetStorageHint",
               "targetDiskFormat", "targetNetworkHints", "targetResourceHints", "storage", "cleanupPolicy",
               "retryPolicy")
STORAGE_FIELDS = ("type", "bucket", "endpoint", "region", "path", "credentialsSecretRef")


def parse_vmmigration(doc: Any) -> VMMigration:
    """Parse one VMMigration document (as loaded from YAML) into the model.

    :raises SpecValidationError: with every problem found, each naming its field path.
    """
    r = _Reader()
    top = r.mapping(doc, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    if not isinstance(doc, dict):
        raise SpecValidationError(r.errors or [FieldError("(document)", "must be a VMMigration object")])
    if top.get("apiVersion") != API_VERSION:
        r.error("apiVersion", f"must be {API_VERSION}, got {show(top.get('apiVersion'))}")
    if top.get("kind") != KIND:
        r.error("kind", f"must be {KIND}, got {show(top.get('kind'))}")
    meta_raw = top.get("metadata") if isinstance(top.get("metadata"), dict) else {}
    if not isinstance(top.get("metadata"), dict):
        r.error("metadata", "required")
    name = r.string(meta_raw, "name", "metadata", required=True, dns=True)
    namespace = r.string(meta_raw, "namespace", "metadata", default="default", namespace=True) or "default"
    labels = meta_raw.get("labels") or {}
    if not isinstance(labels, dict):
        r.error("metadata.labels", "must be an object")
        labels = {}
    annotations = meta_raw.get("annotations") or {}
    if not isinstance(annotations, dict):
        r.error("metadata.annotations", "must be an object")
        annotations = {}

    if top.get("spec") is None:
        r.error("spec", "required")
    spec = r.mapping(top.get("spec"), "spec", SPEC_FIELDS)
    source_name = r.string(spec, "sourceName", "spec", required=True, dns=True)
    source_ns = r.string(spec, "sourceNamespace", "spec", default=namespace, namespace=True) or namespace
    target_ref = r.ref(spec, "targetProviderRef", "spec", namespace, required=True)
    target_name = r.string(spec, "targetName", "spec", default=source_name, dns=True)
    storage_hint = r.string(spec, "targetStorageHint", "spec", pattern=_STORAGE_NAME,
                            what="storage name (letters, digits, '_', '.', ':', '-', '(', ')' and inner spaces, "
                                 "at most 128)")
    disk_format = r.string(spec, "targetDiskFormat", "spec", enum=DISK_FORMATS)

    hints: list[NetworkHint] = []
    raw_hints = spec.get("targetNetworkHints")
    if raw_hints is not None and not isinstance(raw_hints, list):
        r.error("spec.targetNetworkHints", f"must be a list, got {_type_name(raw_hints)}")
        raw_hints = []
    for i, raw_hint in enumerate(raw_hints or []):
        where = f"spec.targetNetworkHints[{i}]"
        body = r.mapping(raw_hint, where, ("name", "network", "bridge"))
        hint_name = r.string(body, "name", where, required=True, pattern=_NET_NAME, what=_NET_WHAT)
        network = r.string(body, "network", where, pattern=_PORT_GROUP,
                           what="network name (letters, digits, '_', '.', ':', '-' and inner spaces, at most 64)")
        bridge = r.string(body, "bridge", where, pattern=_NET_NAME, what=_NET_WHAT)
        if network and bridge:
            r.error(where, "set either network or bridge, not both")
        elif body.get("network") in (None, "") and body.get("bridge") in (None, ""):
            r.error(where, "needs a network (vSphere) or a bridge (libvirt, Proxmox)")
        if hint_name:
            hints.append(NetworkHint(name=hint_name, network=network, bridge=bridge))
    names = [h.name for h in hints]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        r.error("spec.targetNetworkHints", f"interface name {show(dup)} appears more than once")

    res_raw = r.mapping(spec.get("targetResourceHints"), "spec.targetResourceHints", ("cpu", "memory", "disk"))
    resources = ResourceHints(
        cpu=r.integer(res_raw, "cpu", "spec.targetResourceHints", minimum=1, maximum=MAX_CPU),
        memory=r.integer(res_raw, "memory", "spec.targetResourceHints", minimum=16, maximum=MAX_MEMORY_MB),
        disk=r.integer(res_raw, "disk", "spec.targetResourceHints", minimum=1, maximum=MAX_DISK_GB),
    )

    storage = _parse_storage(r, spec, namespace)

    cp_raw = r.mapping(spec.get("cleanupPolicy"), "spec.cleanupPolicy",
                       ("deleteIntermediate", "deleteSnapshot", "deleteSource"))
    cleanup = CleanupPolicy(
        deleteIntermediate=r.boolean(cp_raw, "deleteIntermediate", "spec.cleanupPolicy", True),
        deleteSnapshot=r.boolean(cp_raw, "deleteSnapshot", "spec.cleanupPolicy", True),
        deleteSource=r.boolean(cp_raw, "deleteSource", "spec.cleanupPolicy", False),
    )
    rp_raw = r.mapping(spec.get("retryPolicy"), "spec.retryPolicy",
                       ("maxAttempts", "backoffDuration", "maxBackoffDuration"))
    retry = RetryPolicy(
        maxAttempts=r.integer(rp_raw, "maxAttempts", "spec.retryPolicy", minimum=0, maximum=MAX_ATTEMPTS,
                              default=3),
        backoffDuration=r.duration(rp_raw, "backoffDuration", "spec.retryPolicy", "5m",
                                   maximum=MAX_RETRY_DURATION),
        maxBackoffDuration=r.duration(rp_raw, "maxBackoffDuration", "spec.retryPolicy", "30m",
                                      maximum=MAX_RETRY_DURATION),
    )
    if retry.max_backoff_seconds < retry.backoff_seconds:
        r.error("spec.retryPolicy.maxBackoffDuration",
                f"{retry.maxBackoffDuration} is shorter than backoffDuration {retry.backoffDuration}")
    if r.errors:
        raise SpecValidationError(r.errors)
    assert name and source_name and target_ref and target_name and storage
    return VMMigration(
        name=name,
        namespace=namespace,
        labels={str(k): str(v) for k, v in labels.items()},
        annotations={str(k): str(v) for k, v in annotations.items()},
        spec=VMMigrationSpec(
            sourceName=source_name, sourceNamespace=source_ns, targetProviderRef=target_ref,
            targetName=target_name, storage=storage, targetStorageHint=storage_hint,
            targetDiskFormat=disk_format, targetNetworkHints=tuple(hints), targetResourceHints=resources,
            cleanupPolicy=cleanup, retryPolicy=retry,
        ),
    )


def _parse_storage(r: _Reader, spec: dict, namespace: str) -> StorageSpec | None:
    if spec.get("storage") is None:
        r.error("spec.storage", "required")
        return None
    raw = r.mapping(spec.get("storage"), "spec.storage", STORAGE_FIELDS)
    where = "spec.storage"
    kind = r.string(raw, "type", where, required=True, enum=STORAGE_TYPES)
    bucket = r.string(raw, "bucket", where)
    endpoint = r.string(raw, "endpoint", where)
    region = r.string(raw, "region", where)
    path = r.string(raw, "path", where)
    secret = r.ref(raw, "credentialsSecretRef", where, namespace, required=False)
    if kind == "s3":
        if not bucket:
            r.error(f"{where}.bucket", "required when type is s3")
        elif not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            r.error(f"{where}.bucket", f"{show(bucket)} is not a valid S3 bucket name")
        if secret is None and "credentialsSecretRef" not in raw:
            r.error(f"{where}.credentialsSecretRef", "required when type is s3")
        region = region or "us-east-1"
    elif kind == "http":
        if not endpoint:
            r.error(f"{where}.endpoint", "required when type is http")
        elif not re.match(r"^https?://[^/\s]+", endpoint):
            r.error(f"{where}.endpoint", f"{show(endpoint)} must be an http:// or https:// URL")
    elif kind == "nfs":
        if not path:
            r.error(f"{where}.path", "required when type is nfs")
        elif not path.startswith("/") or "\x00" in path or "\n" in path:
            r.error(f"{where}.path", f"{show(path)} must be an absolute path (the share's mount point)")
    if kind is None:
        return None
    for unused, value in (("bucket", bucket if kind != "s3" else None), ("path", path if kind != "nfs" else None)):
        if value:
            r.error(f"{where}.{unused}", f"not used when type is {kind}")
    return StorageSpec(type=kind, bucket=bucket, endpoint=endpoint, region=region, path=path,
                       credentialsSecretRef=secret)
