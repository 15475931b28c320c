"""Resolution of a VMMigration's references: sourceName -> VirtualMachine -> Provider -> credentials Secret.

The objects come from an ``Inventory``: the local YAML bundle of the spec store here, the Kubernetes
API later, through this same code path. Credentials only ever come from Secrets, never from the
VMMigration itself, and ``Credentials`` never shows its values in ``repr``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from include.spec import FieldError, SpecValidationError, VMMigration

PROVIDER_TYPES = ("libvirt", "vsphere", "proxmox", "qemu", "firecracker")
SUPPORTED_PROVIDER_TYPES = ("libvirt",)


class Inventory(Protocol):
    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...


class BundleInventory:
    """Objects from a multi-document YAML bundle (the spec store's folder)."""

    def __init__(self, objects: Mapping[tuple[str, str, str], dict[str, Any]]) -> None:
        self._objects = dict(objects)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._objects.get((kind, namespace, name))


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
    ptype = spec.get("type")
    endpoint = spec.get("endpoint")
    errors = []
    if ptype not in PROVIDER_TYPES:
        errors.append(FieldError(where, f"Provider {namespace}/{name} has type {ptype!r}, "
                                        f"expected one of {', '.join(PROVIDER_TYPES)}"))
    elif ptype not in SUPPORTED_PROVIDER_TYPES:
        errors.append(FieldError(where, f"Provider {namespace}/{name} is of type {ptype}, which this "
                                        f"engine does not support yet (supported: "
                                        f"{', '.join(SUPPORTED_PROVIDER_TYPES)})"))
    if not isinstance(endpoint, str) or not endpoint:
        errors.append(FieldError(where, f"Provider {namespace}/{name} has no spec.endpoint"))
    if errors:
        raise SpecValidationError(errors)
    credentials = None
    secret_ref = spec.get("credentialSecretRef") or {}
    if secret_ref.get("name"):
        secret_ns = secret_ref.get("namespace") or namespace
        secret = inventory.get("Secret", secret_ns, secret_ref["name"])
        if secret is None:
            raise SpecValidationError([FieldError(
                where, f"Secret {secret_ns}/{secret_ref['name']} named by Provider {namespace}/{name} "
                       f"(spec.credentialSecretRef) not found")])
        credentials = decode_secret(secret, where)
    return ProviderInfo(name=name, namespace=namespace, type=ptype, endpoint=endpoint, credentials=credentials,
                        insecure_skip_verify=bool(spec.get("insecureSkipVerify", False)),
                        defaults=dict(spec.get("defaults") or {}))


def resolve(migration: VMMigration, inventory: Inventory) -> Resolved:
    """Follow every reference of ``migration``; errors name the spec field they came from."""
    spec = migration.spec
    errors: list[FieldError] = []
    source: SourceVM | None = None
    vm = inventory.get("VirtualMachine", spec.sourceNamespace, spec.sourceName)
    if vm is None:
        errors.append(FieldError("spec.sourceName",
                                 f"VirtualMachine {spec.sourceNamespace}/{spec.sourceName} not found"))
    else:
        vm_spec = vm.get("spec") or {}
        ref = vm_spec.get("providerRef") or {}
        if not ref.get("name"):
            errors.append(FieldError("spec.sourceName", f"VirtualMachine {spec.sourceNamespace}/{spec.sourceName} "
                                                        f"has no spec.providerRef.name"))
        else:
            try:
                provider = _provider(inventory, ref.get("namespace") or spec.sourceNamespace, ref["name"],
                                     "spec.sourceName")
                status = vm.get("status") or {}
                source = SourceVM(name=spec.sourceName, namespace=spec.sourceNamespace,
                                  provider_vm_id=str(status.get("id") or spec.sourceName), provider=provider)
            except SpecValidationError as err:
                errors.extend(err.errors)
    target: ProviderInfo | None = None
    try:
        target = _provider(inventory, spec.targetProviderRef.namespace, spec.targetProviderRef.name,
                           "spec.targetProviderRef")
    except SpecValidationError as err:
        errors.extend(err.errors)
    storage_credentials = None
    ref = spec.storage.credentialsSecretRef
    if ref is not None:
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
