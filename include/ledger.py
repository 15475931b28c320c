"""The ownership ledger: what a migration created, recorded the moment it was created.

Every destructive action of the engine (delete a volume, an object, a file or folder, a VM, a
snapshot) goes through a ledger entry: it acts on the exact thing recorded here (a volume's key, a
VM's UUID, an object's key on the storage the plan pinned), never on a name or a prefix it computes.
What the ledger does not hold is never deleted, whatever its name.

The ledger is durable run state, kept apart from the status (which is what users see and what a
Kubernetes status writer replaces). It is a document of the run state (``include.runstate``: by default
``<store>/status/<ns>/<name>/ledger.json`` beside the plan); entries survive task retries and later runs of the
same migration, so a snapshot kept after a failure is still known as ours by the next run.

An entry is written *before* the engine starts creating something whose creation can be interrupted
half-way (an upload, a staged file) with ``state: "creating"``, and marked ``created`` when done; for
atomic creations (a libvirt volume or domain, which the hypervisor refuses to create twice) it is
written right after the call returns. ``forget`` marks an entry deleted once the thing is gone.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from include.runstate import LEDGER, RunState
from include.store import SpecStore

#: the kinds of things the engine creates
KINDS = ("volume", "vm", "snapshot", "point-in-time", "object", "dir", "file", "claim")


@dataclass(frozen=True)
class Entry:
    """One thing this migration created: ``kind``, where it lives (``scope``: a provider endpoint, a
    storage location, a host folder) and what identifies it there (``ident``)."""

    kind: str
    scope: str
    ident: dict[str, Any]
    state: str = "created"
    run: str | None = None
    at: float = 0.0

    def matches(self, kind: str, scope: str, **ident: Any) -> bool:
        return self.kind == kind and self.scope == scope and all(self.ident.get(k) == v for k, v in ident.items())

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scope": self.scope, "ident": self.ident, "state": self.state,
                "run": self.run, "at": self.at}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Entry:
        return cls(kind=raw["kind"], scope=raw["scope"], ident=dict(raw.get("ident") or {}),
                   state=raw.get("state", "created"), run=raw.get("run"), at=float(raw.get("at") or 0))

    def describe(self) -> str:
        ident = ", ".join(f"{k}={v}" for k, v in self.ident.items())
        return f"{self.kind} {ident} on {self.scope}"


class Ledger:
    """The ownership ledger of one migration (see the module docstring), a document of its run state."""

    def __init__(self, state: RunState, namespace: str, name: str) -> None:
        self.state, self.namespace, self.name = state, namespace, name

    @classmethod
    def of(cls, store: SpecStore, namespace: str, name: str) -> Ledger:
        return cls(store.state, namespace, name)

    # -- reading --------------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        return self.state.read(self.namespace, self.name, LEDGER) or {"run": None, "entries": []}

    def run(self) -> str | None:
        """The current run's token (set by Validating)."""
        return self._read().get("run")

    def entries(self, kind: str | None = None, *, live: bool = True) -> list[Entry]:
        """Entries of ``kind`` (all kinds when None); only those not yet deleted when ``live``."""
        out = [Entry.from_dict(e) for e in self._read().get("entries", [])]
        return [e for e in out if (kind is None or e.kind == kind) and (not live or e.state != "deleted")]

    def find(self, kind: str, scope: str, **ident: Any) -> Entry | None:
        for entry in self.entries(kind):
            if entry.matches(kind, scope, **ident):
                return entry
        return None

    def owns(self, kind: str, scope: str, **ident: Any) -> bool:
        """Whether this migration created (and has not deleted) the thing so identified."""
        return self.find(kind, scope, **ident) is not None

    # -- writing --------------------------------------------------------------------------------
    def _mutate(self, fn) -> Any:
        return self.state.update(self.namespace, self.name, LEDGER, fn)

    def new_run(self) -> str:
        """Start a run (Validating): a fresh token; entries of earlier runs stay (they are still ours)."""
        token = uuid.uuid4().hex

        def mutate(data: dict[str, Any]) -> str:
            data["run"] = token
            return token

        return self._mutate(mutate)

    def record(self, kind: str, scope: str, *, state: str = "created", **ident: Any) -> Entry:
        """Record that this migration created (or is creating) the thing; idempotent per identity."""
        if kind not in KINDS:
            raise ValueError(f"unknown ledger kind {kind!r}")

        def mutate(data: dict[str, Any]) -> Entry:
            entries = data.setdefault("entries", [])
            for raw in entries:
                old = Entry.from_dict(raw)
                if old.state != "deleted" and old.kind == kind and old.scope == scope and old.ident == ident:
                    raw["state"] = state
                    raw["run"] = data.get("run")
                    return Entry.from_dict(raw)
            entry = Entry(kind=kind, scope=scope, ident=dict(ident), state=state, run=data.get("run"),
                          at=time.time())
            entries.append(entry.to_dict())
            return entry

        return self._mutate(mutate)

    def forget(self, entry: Entry) -> None:
        """Mark ``entry`` deleted (the thing is gone)."""

        def mutate(data: dict[str, Any]) -> None:
            for raw in data.get("entries", []):
                if (raw["kind"], raw["scope"], raw.get("ident")) == (entry.kind, entry.scope, entry.ident) \
                        and raw.get("state") != "deleted":
                    raw["state"] = "deleted"

        self._mutate(mutate)
