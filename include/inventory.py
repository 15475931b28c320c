"""Resolution of a VMMigration's references: sourceName -> VirtualMachine -> Provider -> credentials Secret.

The objects come from an ``Inventory``: the local YAML bundle of the spec store, with the Secrets of a
VMMigration mirrored from a Kubernetes cluster read from that cluster (``SecretsFrom``), through this same
code path. Credentials only ever come from Secrets, never from the
VMMigration itself, and ``Credentials`` never shows its values in ``repr``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from include.registry import KNOWN_PROVIDER_TYPES as PROVIDER_TYPES
from include.registry import supported_provider_types
from include.spec import FieldError, SpecValidationError, VMMigration


class Inventory(Protocol):
    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    def list(self, kind: str, namespace: str) -> list[dict[str, Any]]: ...


class BundleInventory:
    """Objects from a multi-document YAML bundle (the spec store's folder)."""

    def __init__(self, objects: Mapping[tuple[str, str, str], dict[str, Any]]) -> None:
        self._objects = dict(objects)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._objects.get((kind, namespace, name))

    def list(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        return [doc for (k, ns, _name), doc in sorted(self._objects.items(), key=lambda kv: kv[0])
                if k == kind and ns == namespace]


class TracingInventory(BundleInventory):
    """A BundleInventory that remembers what was asked of it: which objects a resolution depends on."""

    def __init__(self, objects: Mapping[tuple[str, str, str], dict[str, Any]]) -> None:
        super().__init__(objects)
        self.used: set[tuple[str, str, str]] = set()

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.used.add((kind, namespace, name))
        return super().get(kind, namespace, name)

    def list(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        self.used.update(k for k in self._objects if k[0] == kind and k[1] == namespace)
        return super().list(kind, namespace)


class SecretsFrom:
    """An inventory whose Secrets are read elsewhere (a VMMigration mirrored from a cluster: the cluster, as each
    task needs them, never a copy on disk); every other object comes from ``base``. ``read(namespace, name)``
    returns the Secret as a document, or None when there is none."""

    def __init__(self, base: Inventory, read: Callable[[str, str], dict[str, Any] | None]) -> None:
        self.base = base
        self.read = read
        self._read: dict[tuple[str, str], dict[str, Any] | None] = {}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        if kind != "Secret":
            return self.base.get(kind, namespace, name)
        if (namespace, name) not in self._read:
            self._read[(namespace, name)] = self.read(namespace, name)
        return self._read[(namespace, name)]

    def list(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        return [] if kind == "Secret" else self.base.list(kind, namespace)


class Credentials(Mapping[str, str]):
    """Decoded Secret data; its values never appear in repr, str or logs."""

    def __init__(self, data: Mapping[str, str], source: str) -> None:
        self._data = dict(data)
        self.source = source

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Credentials({self.source}, keys={sorted(self._data)})"

    __str__ = __repr__

    def first(self, *keys: str) -> str | None:
        for key in keys:
            if self._data.get(key):
                return self._data[key]
        return None


@dataclass(frozen=True)
class ProviderInfo:
    name: str
    namespace: str
    type: str
    endpoint: str
    credentials: Credentials | None = field(default=None, repr=False)
    insecure_skip_verify: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
    #: the Provider's ``metadata.annotations`` (engine settings a hypervisor adapter reads, such as how vSphere
    #: disks are uploaded)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class SourceVM:
    name: str  # the VirtualMachine object's name
    namespace: str
    provider_vm_id: str  # the name/id of the VM on the hypervisor
    provider: ProviderInfo


@dataclass(frozen=True)
class Resolved:
    migration: VMMigration
    source: SourceVM
    target: ProviderInfo
    storage_credentials: Credentials | None = field(default=None, repr=False)


def decode_secret(doc: dict[str, Any], where: str) -> Credentials:
    """Secret ``data`` (base64) and ``stringData`` (plain) merged, as the API server would."""
    values: dict[str, str] = {}
    for part in ("data", "stringData"):
        if not isinstance(doc.get(part) or {}, dict):
            raise SpecValidationError([FieldError(where, f"Secret {part} must be an object of strings")])
    for key, raw in (doc.get("data") or {}).items():
        try:
            values[str(key)] = base64.b64decode(str(raw), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as err:
            raise SpecValidationError([FieldError(where, f"Secret key {key!r} is not valid base64 text")]) from err
    for key, raw in (doc.get("stringData") or {}).items():
        values[str(key)] = str(raw)
    meta = doc.get("metadata") or {}
    return Credentials(values, f"{meta.get('namespace', 'default')}/{meta.get('name')}")


def _provider(inventory: Inventory, namespace: str, name: str, where: str) -> ProviderInfo:
    doc = inventory.get("Provider", namespace, name)
    if doc is None:
        raise SpecValidationError([FieldError(where, f"Provider {namespace}/{name} not found")])
    spec = doc.get("spec") or {}
    if not isinstance(spec, dict):
        raise SpecValidationError([FieldError(where, f"Provider {namespace}/{name}: spec must be an object")])
    ptype = spec.get("type")
    endpoint = spec.get("endpoint")
    errors = []
    if ptype not in PROVIDER_TYPES:
        errors.append(FieldError(where, f"Provider {namespace}/{name} has type {ptype!r}, "
                                        f"expected one of {', '.join(PROVIDER_TYPES)}"))
    elif ptype not in supported_provider_types():
        errors.append(FieldError(where, f"Provider {namespace}/{name} is of type {ptype}, which this "
                                        f"engine does not support yet (supported: "
                                        f"{', '.join(supported_provider_types())})"))
    if not isinstance(endpoint, str) or not endpoint:
        errors.append(FieldError(where, f"Provider {namespace}/{name} has no spec.endpoint"))
    elif not errors:
        # only allowlisted URI forms (a libvirt URI can run a command: qemu+ext://...?command=), and no
        # refused address; host names are resolved (and checked again) right before connecting
        from include.endpoints import check_provider_address, check_provider_endpoint
        from include.errors import InvalidMigration

        why = check_provider_endpoint(ptype, endpoint)
        if why is None:
            try:
                check_provider_address(endpoint, field=where, resolve=False)
            except InvalidMigration as err:
                why = str(err).removeprefix(f"{where}: ")
        if why is not None:
            errors.append(FieldError(where, f"Provider {namespace}/{name} spec.endpoint: {why}"))
    if errors:
        raise SpecValidationError(errors)
    credentials = None
    secret_ref = spec.get("credentialSecretRef") if isinstance(spec.get("credentialSecretRef"), dict) else {}
    if secret_ref.get("name"):
        secret_ns = secret_ref.get("namespace") or namespace
        if secret_ns != namespace:
            raise SpecValidationError([FieldError(
                where, f"Provider {namespace}/{name} names Secret {secret_ns}/{secret_ref['name']} in another "
                       f"namespace (spec.credentialSecretRef); Secrets are only read from the namespace of the "
                       f"object that names them")])
        secret = inventory.get("Secret", secret_ns, secret_ref["name"])
        if secret is None:
            raise SpecValidationError([FieldError(
                where, f"Secret {secret_ns}/{secret_ref['name']} named by Provider {namespace}/{name} "
                       f"(spec.credentialSecretRef) not found")])
        credentials = decode_secret(secret, where)
    return ProviderInfo(name=name, namespace=namespace, type=ptype, endpoint=endpoint, credentials=credentials,
                        insecure_skip_verify=bool(spec.get("insecureSkipVerify", False)),
                        defaults=dict(spec.get("defaults") or {}),
                        annotations={str(k): str(v) for k, v in
                                     ((doc.get("metadata") or {}).get("annotations") or {}).items()})


def resolve(migration: VMMigration, inventory: Inventory) -> Resolved:
    """Follow every reference of ``migration``; errors name the spec field they came from.

    An object in another namespace is used only if that namespace grants it (a ReferenceGrant, see
    :func:`include.grants.granted`); Secrets are never read across namespaces.
    """
    from include.grants import missing_grant

    spec = migration.spec
    errors: list[FieldError] = []
    source: SourceVM | None = None
    me = ("VMMigration", migration.namespace)
    why = missing_grant(inventory, me, "VirtualMachine", spec.sourceNamespace, spec.sourceName)
    vm = None
    if why:
        errors.append(FieldError("spec.sourceNamespace", why))
    else:
        vm = inventory.get("VirtualMachine", spec.sourceNamespace, spec.sourceName)
        if vm is None:
            errors.append(FieldError("spec.sourceName",
                                     f"VirtualMachine {spec.sourceNamespace}/{spec.sourceName} not found"))
    if vm is not None:
        vm_spec = vm.get("spec") if isinstance(vm.get("spec"), dict) else {}
        ref = vm_spec.get("providerRef") if isinstance(vm_spec.get("providerRef"), dict) else {}
        if not ref.get("name"):
            errors.append(FieldError("spec.sourceName", f"VirtualMachine {spec.sourceNamespace}/{spec.sourceName} "
                                                        f"has no spec.providerRef.name"))
        else:
            provider_ns = ref.get("namespace") or spec.sourceNamespace
            # the VM may name a Provider in a third namespace only if that one grants the VM's namespace,
            # and the migration uses it only if it grants the migration's namespace too
            why = (missing_grant(inventory, ("VirtualMachine", spec.sourceNamespace), "Provider", provider_ns,
                                 ref["name"])
                   or missing_grant(inventory, me, "Provider", provider_ns, ref["name"]))
            if why:
                errors.append(FieldError("spec.sourceName", why))
            else:
                try:
                    provider = _provider(inventory, provider_ns, ref["name"], "spec.sourceName")
                    status = vm.get("status") if isinstance(vm.get("status"), dict) else {}
                    source = SourceVM(name=spec.sourceName, namespace=spec.sourceNamespace,
                                      provider_vm_id=str(status.get("id") or spec.sourceName), provider=provider)
                except SpecValidationError as err:
                    errors.extend(err.errors)
    target: ProviderInfo | None = None
    ref_t = spec.targetProviderRef
    why = missing_grant(inventory, me, "Provider", ref_t.namespace, ref_t.name)
    if why:
        errors.append(FieldError("spec.targetProviderRef.namespace", why))
    else:
        try:
            target = _provider(inventory, ref_t.namespace, ref_t.name, "spec.targetProviderRef")
        except SpecValidationError as err:
            errors.extend(err.errors)
    storage_credentials = None
    ref = spec.storage.credentialsSecretRef
    if ref is not None:
        if ref.namespace != migration.namespace:
            errors.append(FieldError("spec.storage.credentialsSecretRef.namespace",
                                     f"Secret {ref.namespace}/{ref.name} is in another namespace; the storage "
                                     f"Secret must be in the VMMigration's namespace ({migration.namespace})"))
        else:
            secret = inventory.get("Secret", ref.namespace, ref.name)
            if secret is None:
                errors.append(FieldError("spec.storage.credentialsSecretRef",
                                         f"Secret {ref.namespace}/{ref.name} not found"))
            else:
                try:
                    storage_credentials = decode_secret(secret, "spec.storage.credentialsSecretRef")
                except SpecValidationError as err:
                    errors.extend(err.errors)
    if errors:
        raise SpecValidationError(errors)
    assert source is not None and target is not None
    return Resolved(migration=migration, source=source, target=target, storage_credentials=storage_credentials)


def provider_types(migration: VMMigration, inventory: Inventory) -> tuple[str | None, str | None]:
    """The source and target Providers' ``spec.type``, followed by name only (no grant, no Secret): what
    the DAG factory needs at parse time to put each task in its hypervisor's pool. None where a reference
    does not resolve; Validating reports why."""
    def ptype(namespace: str, name: str | None) -> str | None:
        doc = inventory.get("Provider", namespace, name) if name else None
        spec = doc.get("spec") if isinstance(doc, dict) else None
        value = spec.get("type") if isinstance(spec, dict) else None
        return value if isinstance(value, str) else None

    spec = migration.spec
    vm = inventory.get("VirtualMachine", spec.sourceNamespace, spec.sourceName) or {}
    vm_spec = vm.get("spec") if isinstance(vm.get("spec"), dict) else {}
    ref = vm_spec.get("providerRef") if isinstance(vm_spec.get("providerRef"), dict) else {}
    source = ptype(ref.get("namespace") or spec.sourceNamespace, ref.get("name"))
    return source, ptype(spec.targetProviderRef.namespace, spec.targetProviderRef.name)
