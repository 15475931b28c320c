"""The spec store: where VMMigrations (and, without a cluster, their inventory) come from, and where
each migration's plan, per-disk records and status are kept.

The store is a folder of YAML files, each holding one or more documents as for ``kubectl apply -f``:
VMMigration, VirtualMachine, Provider and Secret objects. The DAG factory reads it at parse time
(local files only, no network); workers read and write the same folder, so in a distributed
deployment it is a shared volume (docker-compose mounts it). The Kubernetes watcher will keep this
folder in sync with the cluster, and the Kubernetes status writer replaces ``FileStatusSink``
behind the same ``StatusSink`` interface.

State layout, beside the specs::

    <store>/status/<namespace>/<name>.json          the VMMigration status (what kubectl shows)
    <store>/status/<namespace>/<name>.plan.json     the plan written by Validating
    <store>/status/<namespace>/<name>.disks/<disk>.json   per-disk records of each phase
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from include.spec import KIND, SpecValidationError, VMMigration, parse_vmmigration

log = logging.getLogger(__name__)

STORE_ENV = "VMMIGRATION_STORE"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def default_store_path() -> Path:
    """The store folder: ``$VMMIGRATION_STORE``, else ``var/store`` in the project."""
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "var" / "store"


def dag_id_for(namespace: str, name: str) -> str:
    return f"vmmigration__{namespace}__{name}"


@dataclass
class SpecEntry:
    """One VMMigration document found in the store, parsed or not."""

    namespace: str
    name: str
    path: Path
    doc: dict[str, Any]
    migration: VMMigration | None = None
    error: SpecValidationError | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def dag_id(self) -> str:
        return dag_id_for(self.namespace, self.name)


@dataclass
class StoreIndex:
    migrations: dict[str, SpecEntry] = field(default_factory=dict)
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """All mapping documents of a (multi-document) YAML file."""
    with open(path, encoding="utf-8") as fh:
        return [d for d in yaml.load_all(fh, Loader=_Loader) if isinstance(d, dict)]


def index_documents(docs_by_file: list[tuple[Path, list[dict[str, Any]]]]) -> StoreIndex:
    index = StoreIndex()
    for path, docs in docs_by_file:
        for doc in docs:
            kind = doc.get("kind")
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            name = meta.get("name")
            namespace = meta.get("namespace") or "default"
            if not isinstance(name, str) or not name:
                index.problems.append(f"{path}: a {kind or 'document'} without metadata.name was ignored")
                continue
            if kind == KIND:
                entry = SpecEntry(namespace=str(namespace), name=name, path=path, doc=doc)
                try:
                    entry.migration = parse_vmmigration(doc)
                except SpecValidationError as err:
                    entry.error = err
                if entry.key in index.migrations:
                    index.problems.append(f"{path}: VMMigration {entry.key} is also defined in "
                                          f"{index.migrations[entry.key].path}; the first one is used")
                    continue
                index.migrations[entry.key] = entry
            elif isinstance(kind, str):
                index.objects[(kind, str(namespace), name)] = doc
    return index


class SpecStore:
    """A folder of YAML specs plus the state of each migration."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_store_path()

    @property
    def status_dir(self) -> Path:
        return self.root / "status"

    def spec_files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())

    def index(self) -> StoreIndex:
        files: list[tuple[Path, list[dict[str, Any]]]] = []
        problems: list[str] = []
        for path in self.spec_files():
            try:
                files.append((path, load_documents(path)))
            except (OSError, yaml.YAMLError) as err:
                problems.append(f"{path}: not readable YAML: {err}")
        index = index_documents(files)
        index.problems[:0] = problems
        return index

    def entry(self, namespace: str, name: str) -> SpecEntry:
        index = self.index()
        key = f"{namespace}/{name}"
        if key not in index.migrations:
            raise KeyError(f"VMMigration {key} is not in the spec store {self.root}")
        return index.migrations[key]

    # -- state ---------------------------------------------------------------------------------
    def status_path(self, namespace: str, name: str) -> Path:
        return self.status_dir / namespace / f"{name}.json"

    def plan_path(self, namespace: str, name: str) -> Path:
        return self.status_dir / namespace / f"{name}.plan.json"

    def _disks_dir(self, namespace: str, name: str) -> Path:
        return self.status_dir / namespace / f"{name}.disks"

    def disk_record_path(self, namespace: str, name: str, disk: str) -> Path:
        return self._disks_dir(namespace, name) / f"{disk}.json"

    def read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        atomic_write_json(path, data)

    def save_plan(self, namespace: str, name: str, plan: dict[str, Any]) -> None:
        self.write_json(self.plan_path(namespace, name), plan)

    def load_plan(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.read_json(self.plan_path(namespace, name))

    def planned_disk_names(self, namespace: str, name: str) -> list[str] | None:
        plan = self.load_plan(namespace, name)
        if not plan:
            return None
        return [d["name"] for d in plan.get("disks", [])]

    def update_disk_record(self, namespace: str, name: str, disk: str, **values: Any) -> dict[str, Any]:
        path = self.disk_record_path(namespace, name, disk)
        with locked(path):
            record = self.read_json(path) or {"name": disk}
            record.update(values)
            self.write_json(path, record)
        return record

    def run_record_path(self, namespace: str, name: str) -> Path:
        return self.status_dir / namespace / f"{name}.run.json"

    def update_run_record(self, namespace: str, name: str, **values: Any) -> dict[str, Any]:
        """Facts about what this migration made that must outlive a run (the snapshot it created)."""
        path = self.run_record_path(namespace, name)
        with locked(path):
            record = self.read_json(path) or {}
            record.update(values)
            self.write_json(path, record)
        return record

    def run_record(self, namespace: str, name: str) -> dict[str, Any]:
        return self.read_json(self.run_record_path(namespace, name)) or {}

    def disk_record(self, namespace: str, name: str, disk: str) -> dict[str, Any]:
        return self.read_json(self.disk_record_path(namespace, name, disk)) or {"name": disk}

    def clear_disk_records(self, namespace: str, name: str) -> None:
        folder = self._disks_dir(namespace, name)
        if folder.is_dir():
            for item in folder.glob("*.json"):
                item.unlink()


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock beside ``path`` (mapped tasks of one run write the same status)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class StatusSink(Protocol):
    """Where a migration's status goes. ``update`` applies ``mutate`` atomically and returns the result."""

    def update(self, namespace: str, name: str, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]: ...

    def get(self, namespace: str, name: str) -> dict[str, Any] | None: ...


class FileStatusSink:
    """Writes the status as JSON beside the spec, under a lock so that parallel disks don't clash."""

    def __init__(self, store: SpecStore) -> None:
        self.store = store

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.store.read_json(self.store.status_path(namespace, name))

    def update(self, namespace: str, name: str, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        from include.status import new_status

        path = self.store.status_path(namespace, name)
        with locked(path):
            status = self.store.read_json(path) or new_status()
            mutate(status)
            self.store.write_json(path, status)
        return status
