"""The target volume lifecycle: created with an intent recorded first, tagged with its owner where the
hypervisor keeps one, recognised on a retry, removed only when this migration's ledger records it."""

from __future__ import annotations

from include.errors import Conflict, TargetCreationError
from include.ledger import Entry
from include.phases.context import MigrationContext


def fresh_target_volume(ctx: MigrationContext, disk: str) -> str | None:
    """Create the disk's target volume (anew on a retry, when the one there is ours); returns its file
    when it is on this host. A volume of that name that this migration did not create fails the run."""
    d = ctx.disk_plan(disk)
    pool, volume = d.target_storage, d.target_volume
    remove_own_volume(ctx, pool, volume, conflict_if_foreign=True)
    # an intent first: a retry after a crash between the create and the record below recognises the volume
    intent = ctx.ledger.record("volume", ctx.scope_target, state="creating", pool=pool, volume=volume)
    try:
        ctx.target.create_volume(pool, volume, d.target_format, d.size_bytes)
    except TargetCreationError:
        ctx.ledger.forget(intent)
        if ctx.target.volume_key(pool, volume) is not None:  # created by someone else in between
            raise Conflict(f"volume {volume!r} appeared in {pool} while this migration was about to create it; it "
                           f"was not created by this migration and is left alone", field="spec.targetName") from None
        raise
    key = ctx.target.volume_key(pool, volume)
    owner = f"{ctx.namespace}/{ctx.name} {ctx.ledger.run()} {intent.at!r}"
    if ctx.target.mark_volume(pool, volume, owner):
        ctx.ledger.record("volume", ctx.scope_target, pool=pool, volume=volume, key=key, owner=owner)
    else:
        ctx.ledger.record("volume", ctx.scope_target, pool=pool, volume=volume, key=key)
    ctx.ledger.forget(intent)
    return ctx.target.local_volume_path(pool, volume)


def remove_own_volume(ctx: MigrationContext, pool: str, volume: str, *, conflict_if_foreign: bool) -> bool:
    """Delete the volume when this migration created it (the ledger holds its identity)."""
    key = ctx.target.volume_key(pool, volume)
    if key is None:
        return False
    entry = own_volume_entry(ctx, pool, volume, key)
    if entry is None:
        entry = adoptable_intent(ctx, pool, volume)
    if entry is None:
        if conflict_if_foreign:
            raise Conflict(f"volume {volume!r} already exists in {pool} and was not created by this migration; it "
                           f"is never overwritten or deleted", field="spec.targetName")
        return False
    removed = ctx.target.delete_volume(pool, volume, key=key, owner=entry.ident.get("owner"))
    ctx.ledger.forget(entry)
    return removed


def own_volume_entry(ctx: MigrationContext, pool: str, volume: str, key: str, scope: str | None = None
                     ) -> Entry | None:
    """The ledger entry of this volume, if the volume there now is the one it records (same key, and the
    same owner tag where one was written: a volume deleted and made again by someone else has none)."""
    scope = scope or ctx.scope_target
    for entry in ctx.ledger.entries("volume"):
        if entry.state == "creating" or not entry.matches("volume", scope, pool=pool, volume=volume, key=key):
            continue
        if entry.ident.get("owner") and ctx.target.volume_owner(pool, volume) != entry.ident["owner"]:
            continue
        return entry
    return None


def adoptable_intent(ctx: MigrationContext, pool: str, volume: str, scope: str | None = None) -> Entry | None:
    """A "creating" entry of this volume that the volume does not predate: this migration died between
    creating the volume and recording it."""
    created = ctx.target.volume_created_at(pool, volume)
    if created is None:
        return None  # no time to compare with: never adopted
    for entry in ctx.ledger.entries("volume"):
        if entry.state == "creating" and entry.scope == (scope or ctx.scope_target) and "key" not in entry.ident \
                and entry.ident.get("pool") == pool and entry.ident.get("volume") == volume \
                and created >= entry.at - 1.0:
            ctx.logger.info("volume %s/%s was created by an earlier try of this migration that died before "
                            "recording it (intent at %.3f, changed at %.3f): it is ours", pool, volume, entry.at,
                            created)
            return entry
    return None


def local_target_volume(ctx: MigrationContext, disk: str) -> str | None:
    """The target volume's file to convert into, when the target keeps it on this host (else None,
    and no volume yet: Importing creates it and streams the converted image into it)."""
    path = fresh_target_volume(ctx, disk)
    if path is None:
        d = ctx.disk_plan(disk)
        remove_own_volume(ctx, d.target_storage, d.target_volume, conflict_if_foreign=False)
    return path
