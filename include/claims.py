"""Target name claims: two migrations can never create the same VM on the same target.

Validating claims ``(target provider endpoint, targetName)`` before it plans anything; the claim is
a claim created only if absent in the run state (a file made with ``O_CREAT | O_EXCL``, or a row
inserted under its primary key), so of two migrations validated at the
same instant exactly one gets it, and the other fails with a Conflict naming the holder. The claim is
held until the run ends (finalize releases it after success or rollback); a retry or a new run of the
same migration takes its own claim over. With a cluster, the same interface maps onto a Lease.
"""

from __future__ import annotations

import hashlib

from include.errors import Conflict
from include.runstate import RunState
from include.store import SpecStore


def _scope_id(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:24]


class NameClaims:
    """Claims of target VM names, per target provider endpoint, in the run state."""

    def __init__(self, state: RunState) -> None:
        self.state = state

    @classmethod
    def of(cls, store: SpecStore) -> NameClaims:
        return cls(store.state)

    @staticmethod
    def key(scope: str, name: str) -> str:
        return f"{_scope_id(scope)}/{name}"

    def holder(self, scope: str, name: str) -> dict | None:
        return self.state.claim_holder(self.key(scope, name))

    def acquire(self, scope: str, name: str, migration: str, run: str, *, field: str = "spec.targetName") -> None:
        """Claim ``name`` on ``scope`` for ``migration``; raises Conflict when another migration holds it."""
        key = self.key(scope, name)
        body = {"migration": migration, "run": run, "scope": scope, "name": name}
        held = self.state.claim(key, body)
        if held is None:
            return
        if held.get("migration") != migration:
            raise Conflict(f"target name {name!r} on {scope} is claimed by migration "
                           f"{held.get('migration', '(unknown)')}, which has not finished; two migrations "
                           f"cannot create the same VM ({self.state.describe_claim(key)})", field=field)
        self.state.replace_claim(key, body)  # our own claim from an earlier try or run: take it over

    def release(self, scope: str, name: str, migration: str) -> bool:
        """Give the claim up, only if ``migration`` holds it."""
        held = self.holder(scope, name)
        if not held or held.get("migration") != migration:
            return False
        self.state.drop_claim(self.key(scope, name))
        return True
