"""Target name claims: two migrations can never create the same VM on the same target.

Validating claims ``(target provider endpoint, targetName)`` before it plans anything; the claim is
a file created with ``O_CREAT | O_EXCL`` in the spec store, so of two migrations validated at the
same instant exactly one gets it, and the other fails with a Conflict naming the holder. The claim is
held until the run ends (finalize releases it after success or rollback); a retry or a new run of the
same migration takes its own claim over. With a cluster, the same interface maps onto a Lease.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from include.errors import Conflict
from include.store import SpecStore


def _scope_id(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:24]


class NameClaims:
    """Claims of target VM names, per target provider endpoint."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, store: SpecStore) -> NameClaims:
        return cls(store.root / "claims")

    def path(self, scope: str, name: str) -> Path:
        return self.root / _scope_id(scope) / f"{name}.json"

    def holder(self, scope: str, name: str) -> dict | None:
        try:
            return json.loads(self.path(scope, name).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def acquire(self, scope: str, name: str, migration: str, run: str, *, field: str = "spec.targetName") -> None:
        """Claim ``name`` on ``scope`` for ``migration``; raises Conflict when another migration holds it."""
        path = self.path(scope, name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = json.dumps({"migration": migration, "run": run, "scope": scope, "name": name}).encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            held = self.holder(scope, name) or {}
            if held.get("migration") != migration:
                raise Conflict(f"target name {name!r} on {scope} is claimed by migration "
                               f"{held.get('migration', '(unknown)')}, which has not finished; two migrations "
                               f"cannot create the same VM (claim {path})", field=field) from None
            # our own claim from an earlier try or run: take it over
            tmp = path.with_name(f".{path.name}.{run}")
            tmp.write_bytes(body)
            os.replace(tmp, path)
            return
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)

    def release(self, scope: str, name: str, migration: str) -> bool:
        """Give the claim up, only if ``migration`` holds it."""
        held = self.holder(scope, name)
        if not held or held.get("migration") != migration:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.path(scope, name).unlink()
        return True
