"""Cross-namespace references need the referenced namespace's consent (a ReferenceGrant).

Modelled on the Kubernetes Gateway API's ReferenceGrant: an object that lives in the namespace being
referenced, saying which kinds from which namespaces may refer to which of its objects::

    apiVersion: infra.virtrigaud.io/v1beta1
    kind: ReferenceGrant
    metadata: {name: migrations-from-default, namespace: kvm-vms}
    spec:
      from:
        - {group: infra.virtrigaud.io, kind: VMMigration, namespace: default}
      to:
        - {group: infra.virtrigaud.io, kind: VirtualMachine}            # every VM in kvm-vms
        - {group: infra.virtrigaud.io, kind: Provider, name: kvm-host}  # only this Provider

A reference within one namespace needs no grant. Secrets are never granted: a Secret is read only
from the namespace of the object that names it. In a cluster the same object is a namespaced custom
resource (``deploy/crds/infra.virtrigaud.io_referencegrants.yaml``), and only those who may write in
the referenced namespace can create it.
"""

from __future__ import annotations

from typing import Any

from include.spec import API_GROUP

KIND = "ReferenceGrant"
GRANTABLE = ("VirtualMachine", "Provider")


def _matches(item: Any, **want: str | None) -> bool:
    if not isinstance(item, dict):
        return False
    if item.get("group", API_GROUP) != API_GROUP:
        return False
    return all(value is None or item.get(key) == value for key, value in want.items())


def granted(inventory: Any, from_: tuple[str, str], kind: str, namespace: str, name: str) -> bool:
    """Whether ``from_`` = (kind, namespace) may refer to ``kind`` ``namespace/name``."""
    from_kind, from_ns = from_
    if from_ns == namespace:
        return True
    if kind not in GRANTABLE:
        return False
    for grant in inventory.list(KIND, namespace):
        spec = grant.get("spec") if isinstance(grant.get("spec"), dict) else {}
        sources = spec.get("from") if isinstance(spec.get("from"), list) else []
        targets = spec.get("to") if isinstance(spec.get("to"), list) else []
        if not any(_matches(f, kind=from_kind, namespace=from_ns) for f in sources):
            continue
        for t in targets:
            if _matches(t, kind=kind) and t.get("name") in (None, "", name):
                return True
    return False


def missing_grant(inventory: Any, from_: tuple[str, str], kind: str, namespace: str, name: str) -> str | None:
    """None when the reference is allowed; otherwise the message of the missing grant."""
    if granted(inventory, from_, kind, namespace, name):
        return None
    from_kind, from_ns = from_
    return (f"{kind} {namespace}/{name} is in another namespace, and namespace {namespace} does not grant "
            f"{from_kind}s of namespace {from_ns} access to it: add a ReferenceGrant in {namespace} with "
            f"from {{kind: {from_kind}, namespace: {from_ns}}} and to {{kind: {kind}}} (docs/security.md)")
