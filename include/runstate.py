"""Run state: the durable documents a migration's run keeps for itself, apart from its status.

Per migration: the plan Validating writes (``plan``), each disk's record (``disks/<disk>``), the run
record (``run``: the run token's outcome, the VM Creating committed, a final failure) and the ownership
ledger (``ledger``). Across migrations: the target name claims. The status is kept here too (``status``,
written through a ``StatusSink``), so that workers that share no disk see one status; it is a projection,
never read back to decide a phase.

``RunState`` is the interface the engine uses; nothing above it knows where the documents live.

- ``FileRunState``: files beside the spec (``<store>/status/<ns>/<name>/...``, ``<store>/claims/``),
  atomic replace under ``flock``. Every worker needs the same folder.
- ``SqlRunState``: one table in a SQL database (SQLAlchemy, which Airflow already brings), for
  workers that share no disk: the same database server as Airflow's metadata database, in a table of
  its own (Airflow 3 tasks may not use the metadata tables themselves). Read-modify-write holds a row
  lock (``SELECT ... FOR UPDATE`` on PostgreSQL, an immediate transaction on SQLite); a claim is a row
  inserted under a primary key, so of two migrations claiming one name exactly one succeeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

#: the per-migration documents, by name (``disks/<disk>`` for each disk)
PLAN, RUN, LEDGER = "plan", "run", "ledger"
#: the status document (include.store.FileStatusSink): a projection, never read back to decide a phase
STATUS = "status"


def disk_doc(disk: str) -> str:
    if not disk or disk in (".", "..") or any(c in disk for c in "/\\\x00\n"):
        raise ValueError(f"disk name {disk!r} cannot name a record")
    return f"disks/{disk}"


class RunState(Protocol):
    """Durable run state of every migration (see the module docstring)."""

    def read(self, namespace: str, name: str, doc: str) -> dict[str, Any] | None: ...

    def write(self, namespace: str, name: str, doc: str, data: dict[str, Any]) -> None: ...

    def update(self, namespace: str, name: str, doc: str, mutate: Callable[[dict[str, Any]], T]) -> T:
        """Apply ``mutate`` to the document (``{}`` when absent) atomically, under a lock; its result."""
        ...

    def delete(self, namespace: str, name: str, doc: str) -> None: ...

    def delete_prefix(self, namespace: str, name: str, prefix: str) -> None:
        """Delete every document of the migration whose name starts with ``prefix`` (``disks/``)."""
        ...

    @contextlib.contextmanager
    def lock(self, namespace: str, name: str, what: str) -> Iterator[None]:
        """An exclusive lock of one migration's ``what`` (e.g. making its staging folder)."""
        ...

    def claim(self, key: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create the claim ``key`` holding ``body``; None when created, else the body that holds it."""
        ...

    def replace_claim(self, key: str, body: dict[str, Any]) -> None: ...

    def claim_holder(self, key: str) -> dict[str, Any] | None: ...

    def drop_claim(self, key: str) -> None: ...

    def describe_claim(self, key: str) -> str:
        """Where the claim lives, for a Conflict message."""
        ...


RUN_STATE_ENV = "VMMIGRATION_RUN_STATE"


def run_state_for(store: Any) -> RunState:
    """The run state ``$VMMIGRATION_RUN_STATE`` names: unset or ``files``, files beside the spec;
    otherwise an SQLAlchemy URL (``postgresql://...``, ``sqlite:///...``). One per URL per process."""
    url = os.environ.get(RUN_STATE_ENV, "").strip()
    if not url or url == "files":
        return FileRunState(store)
    if url not in _SQL:
        _SQL[url] = SqlRunState(url)
    return _SQL[url]


_SQL: dict[str, SqlRunState] = {}


class FileRunState:
    """Run state as files in the spec store (``SpecStore``'s folders)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def path(self, namespace: str, name: str, doc: str) -> Path:
        """The file of a document: the store's own paths (``plan.json``, ``run.json``, ``disks/<disk>.json``,
        ``ledger.json``) in the migration's state folder."""
        if doc.startswith("disks/"):
            return self.store.disk_record_path(namespace, name, doc.removeprefix("disks/"))
        return self.store.state_dir(namespace, name) / f"{doc}.json"

    def read(self, namespace: str, name: str, doc: str) -> dict[str, Any] | None:
        return self.store.read_json(self.path(namespace, name, doc))

    def write(self, namespace: str, name: str, doc: str, data: dict[str, Any]) -> None:
        self.store.write_json(self.path(namespace, name, doc), data)

    def update(self, namespace: str, name: str, doc: str, mutate: Callable[[dict[str, Any]], T]) -> T:
        from include.store import locked

        path = self.path(namespace, name, doc)
        with locked(path):
            data = self.store.read_json(path) or {}
            result = mutate(data)
            self.store.write_json(path, data)
        return result

    def delete(self, namespace: str, name: str, doc: str) -> None:
        self.path(namespace, name, doc).unlink(missing_ok=True)

    def delete_prefix(self, namespace: str, name: str, prefix: str) -> None:
        if prefix != "disks/":
            raise ValueError(f"the file run state deletes by the prefix 'disks/' only, not {prefix!r}")
        folder = self.store.disks_dir(namespace, name)
        if folder.is_dir():
            for item in folder.glob("*.json"):
                item.unlink()

    @contextlib.contextmanager
    def lock(self, namespace: str, name: str, what: str) -> Iterator[None]:
        from include.store import locked

        with locked(self.store.state_dir(namespace, name) / what):
            yield

    def _claim_path(self, key: str) -> Path:
        scope, _, name = key.partition("/")
        return self.store.root / "claims" / scope / f"{name}.json"

    def claim(self, key: str, body: dict[str, Any]) -> dict[str, Any] | None:
        path = self._claim_path(key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return self.claim_holder(key) or {}
        with os.fdopen(fd, "wb") as fh:
            fh.write(json.dumps(body).encode())
        return None

    def replace_claim(self, key: str, body: dict[str, Any]) -> None:
        path = self._claim_path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(json.dumps(body).encode())
        os.replace(tmp, path)

    def claim_holder(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._claim_path(key).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def drop_claim(self, key: str) -> None:
        self._claim_path(key).unlink(missing_ok=True)

    def describe_claim(self, key: str) -> str:
        return f"claim {self._claim_path(key)}"


class SqlRunState:
    """Run state in one SQL table (``vmmigration_run_state``) of the database at ``url``."""

    TABLE = "vmmigration_run_state"

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.url = url
        sqlite = url.startswith("sqlite")
        # no connection is made here: the engine connects on first use (a DAG parse never gets this far)
        self.engine = sa.create_engine(url, future=True, connect_args={"timeout": 60} if sqlite else {})
        if sqlite:
            # a write takes SQLite's write lock at BEGIN (IMMEDIATE), so read-modify-write is serialised;
            # reads begin deferred and never take it
            @sa.event.listens_for(self.engine, "connect")
            def _no_autobegin(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None

            @sa.event.listens_for(self.engine, "begin")
            def _begin(conn: Any) -> None:
                reading = conn.get_execution_options().get("vmmigration_read")
                conn.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")

        meta = sa.MetaData()
        self.table = sa.Table(
            self.TABLE, meta,
            sa.Column("scope", sa.String(512), primary_key=True),  # "<ns>/<name>", or "claim" for claims
            sa.Column("doc", sa.String(512), primary_key=True),
            sa.Column("data", sa.Text, nullable=False),
        )
        self._meta = meta
        self._made = False

    def _ready(self) -> None:
        """The table, made once (workers starting together on a fresh database may race: one makes it)."""
        if self._made:
            return
        import sqlalchemy as sa

        try:
            self._meta.create_all(self.engine)
        except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError):
            if not sa.inspect(self.engine).has_table(self.TABLE):
                raise
        self._made = True

    def _reading(self) -> Any:
        self._ready()
        return self.engine.connect().execution_options(vmmigration_read=True)

    def _writing(self) -> Any:
        self._ready()
        return self.engine.begin()

    def _select(self, scope: str, doc: str, *, for_update: bool = False) -> Any:
        stmt = self.table.select().where(self.table.c.scope == scope, self.table.c.doc == doc)
        return stmt.with_for_update() if for_update and self.engine.dialect.name != "sqlite" else stmt

    def read(self, namespace: str, name: str, doc: str) -> dict[str, Any] | None:
        with self._reading() as conn:
            row = conn.execute(self._select(f"{namespace}/{name}", doc)).first()
        return json.loads(row.data) if row else None

    def _put(self, conn: Any, scope: str, doc: str, data: dict[str, Any], *, exists: bool) -> None:
        body = json.dumps(data)
        if exists:
            conn.execute(self.table.update().where(self.table.c.scope == scope, self.table.c.doc == doc)
                         .values(data=body))
        else:
            conn.execute(self.table.insert().values(scope=scope, doc=doc, data=body))

    def write(self, namespace: str, name: str, doc: str, data: dict[str, Any]) -> None:
        self.update(namespace, name, doc, lambda d: (d.clear(), d.update(data)))

    def update(self, namespace: str, name: str, doc: str, mutate: Callable[[dict[str, Any]], T]) -> T:
        import sqlalchemy as sa

        scope = f"{namespace}/{name}"
        for attempt in range(2):
            try:
                with self._writing() as conn:
                    row = conn.execute(self._select(scope, doc, for_update=True)).first()
                    data = json.loads(row.data) if row else {}
                    result = mutate(data)
                    self._put(conn, scope, doc, data, exists=row is not None)
                return result
            except sa.exc.IntegrityError:  # another writer inserted the row first: read it and apply again
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def delete(self, namespace: str, name: str, doc: str) -> None:
        with self._writing() as conn:
            conn.execute(self.table.delete().where(self.table.c.scope == f"{namespace}/{name}",
                                                   self.table.c.doc == doc))

    def delete_prefix(self, namespace: str, name: str, prefix: str) -> None:
        with self._writing() as conn:
            conn.execute(self.table.delete().where(self.table.c.scope == f"{namespace}/{name}",
                                                   self.table.c.doc.startswith(prefix, autoescape=True)))

    @contextlib.contextmanager
    def lock(self, namespace: str, name: str, what: str, *, lease: float = 120.0, wait: float = 300.0
             ) -> Iterator[None]:
        """A lease row: inserted to take the lock, deleted to give it up (no transaction stays open while
        the caller works, so it may use the run state inside); a lease older than ``lease`` seconds is
        a dead holder's and is taken over."""
        import sqlalchemy as sa

        scope, doc = f"{namespace}/{name}", f"lock/{what}"
        mine = json.dumps({"holder": uuid.uuid4().hex, "until": time.time() + lease})
        deadline = time.monotonic() + wait
        while True:
            try:
                with self._writing() as conn:
                    conn.execute(self.table.insert().values(scope=scope, doc=doc, data=mine))
                break
            except sa.exc.IntegrityError:
                held = self.read(namespace, name, doc)
                if held is not None and float(held.get("until", 0)) < time.time():
                    with self._writing() as conn:  # a dead holder's lease: removed, then taken anew
                        conn.execute(self.table.delete().where(self.table.c.scope == scope, self.table.c.doc == doc,
                                                               self.table.c.data == json.dumps(held)))
                    continue
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the lock {what} of {scope} has been held for more than {wait:.0f} s") \
                        from None
                time.sleep(0.05)
        try:
            yield
        finally:
            with self._writing() as conn:
                conn.execute(self.table.delete().where(self.table.c.scope == scope, self.table.c.doc == doc,
                                                       self.table.c.data == mine))

    def claim(self, key: str, body: dict[str, Any]) -> dict[str, Any] | None:
        import sqlalchemy as sa

        try:
            with self._writing() as conn:
                conn.execute(self.table.insert().values(scope="claim", doc=key, data=json.dumps(body)))
            return None
        except sa.exc.IntegrityError:
            return self.claim_holder(key) or {}

    def replace_claim(self, key: str, body: dict[str, Any]) -> None:
        with self._writing() as conn:
            conn.execute(self.table.update().where(self.table.c.scope == "claim", self.table.c.doc == key)
                         .values(data=json.dumps(body)))

    def claim_holder(self, key: str) -> dict[str, Any] | None:
        with self._reading() as conn:
            row = conn.execute(self._select("claim", key)).first()
        return json.loads(row.data) if row else None

    def drop_claim(self, key: str) -> None:
        with self._writing() as conn:
            conn.execute(self.table.delete().where(self.table.c.scope == "claim", self.table.c.doc == key))

    def describe_claim(self, key: str) -> str:
        return f"claim {key} in {self.TABLE}"
