"""The spec store: where VMMigrations (and, without a cluster, their inventory) come from, and where
each migration's plan, per-disk records and status are kept.

The store is a folder of YAML files, each holding one or more documents as for ``kubectl apply -f``:
VMMigration, VirtualMachine, Provider and Secret objects. The DAG factory reads it at parse time
(local files only, no network); workers read and write the same folder, so in a distributed
deployment it is a shared volume (docker-compose mounts it). The Kubernetes watcher will keep this
folder in sync with the cluster, and the Kubernetes status writer replaces ``FileStatusSink``
behind the same ``StatusSink`` interface.

State layout, beside the specs: one folder per migration (``SpecStore.state_dir``), so that the
files of two migrations can never collide whatever their names::

    <store>/status/<namespace>/<name>/status.json        the VMMigration status (what kubectl shows)
    <store>/status/<namespace>/<name>/plan.json          the plan written by Validating
    <store>/status/<namespace>/<name>/run.json           facts that outlive a run (the snapshot it made)
    <store>/status/<namespace>/<name>/disks/<disk>.json  per-disk records of each phase

Other modules keep more files in that folder (the ownership ledger, ``ledger.json``).

Reading the store is safe by construction: a spec file that is not UTF-8, not YAML, uses anchors or
aliases, repeats a key, nests too deep or is too big becomes a problem naming the file (and the line and
key), never an exception; so does a VMMigration whose ``metadata.name``/``namespace`` break
Kubernetes' rules. ``dag_entries`` splits the index into the migrations that get a DAG and the problems
that ``dags/vmmigration_store_check.py`` reports as its import error.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import yaml

from include.runstate import PLAN, RUN, STATUS, RunState, disk_doc, run_state_for
from include.spec import (
    KIND,
    RetryPolicy,
    SpecValidationError,
    VMMigration,
    name_problem,
    namespace_problem,
    parse_vmmigration,
    show,
)

log = logging.getLogger(__name__)

STORE_ENV = "VMMIGRATION_STORE"
#: the executor queue of Validating, for a worker beside the spec store (the other workers may have none)
STORE_QUEUE_ENV = "VMMIGRATION_STORE_QUEUE"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: Airflow's limits: a dag_id has at most 250 characters of ``[A-Za-z0-9_.-]``, a tag at most 100.
DAG_ID_MAX = 250
DAG_TAG_MAX = 100
DAG_ID_PREFIX = "vmmigration__"
_DAG_ID_CHARS = re.compile(r"[A-Za-z0-9_.-]+")
_DNS_CHARS = re.compile(r"[a-z0-9.-]+")
_HASH_LEN = 16
#: A spec file larger than this is refused unread; YAML nested deeper than this is refused.
MAX_SPEC_FILE_BYTES = 8 * 1024 * 1024
MAX_YAML_DEPTH = 64


def default_store_path() -> Path:
    """The store folder: ``$VMMIGRATION_STORE``, else ``var/store`` in the project."""
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "var" / "store"


def dag_id_for(namespace: str, name: str) -> str:
    """The DAG id of a migration: ``vmmigration__<namespace>__<name>`` when that fits Airflow's 250
    characters, else ``vmmigration__<namespace>__<start of name>__<hash>``.

    The hash (16 hex digits of the sha256 of ``namespace/name``) keeps shortened ids unique and
    stable; a shortened id never equals a full one, since Kubernetes names hold no ``_``. Characters a
    DAG id cannot hold (only in names that are refused anyway) are replaced and force the hashed form.
    """
    full = f"{DAG_ID_PREFIX}{namespace}__{name}"
    if len(full) <= DAG_ID_MAX and _DNS_CHARS.fullmatch(namespace) and _DNS_CHARS.fullmatch(name):
        return full
    digest = hashlib.sha256(f"{namespace}/{name}".encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LEN]
    ns_part = re.sub(r"[^a-z0-9.-]", "-", namespace)[:63]
    keep = DAG_ID_MAX - len(DAG_ID_PREFIX) - len(ns_part) - 4 - _HASH_LEN
    name_part = re.sub(r"[^a-z0-9.-]", "-", name)[:keep]
    return f"{DAG_ID_PREFIX}{ns_part}__{name_part}__{digest}"


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
    #: the file each object (kind, namespace, name) was read from
    origins: dict[tuple[str, str, str], Path] = field(default_factory=dict)


class SpecFileError(ValueError):
    """A spec file that cannot be read safely; the message says why (and where), without the path."""


class _UniqueKeyLoader(_Loader):  # type: ignore[misc, valid-type]
    """The C-backed safe loader, refusing a mapping that holds the same key twice (even as ``1``/``0x1``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(None, None, f"expected a mapping, found {node.id}",
                                                    node.start_mark)
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(None, None, "merge keys (<<) are not allowed",
                                                        key_node.start_mark)
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in mapping
            except TypeError as err:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        "found an unhashable key", key_node.start_mark) from err
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {show(key)}",
                                                        key_node.start_mark)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:map", _UniqueKeyLoader.construct_yaml_map)


def _yaml_path(parts: list[Any]) -> str:
    """``spec.targetNetworkHints[0].name`` from its keys and indexes (cut when it gets long)."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]{1,64}", part):
            out += f".{part}" if out else part
        else:
            out += f"[{show(part)}]"
    return out if len(out) <= 200 else f"{out[:90]}...{out[-90:]}"


def _check_events(text: str) -> None:
    """Refuse what a YAML file must not hold before anything is built from it, with the C parser's
    events (cheap, flat, never expanded): anchors and aliases (a 1 KB alias bomb expands to gigabytes),
    merge keys, keys that are not plain scalars, a key repeated in one mapping (the last one would
    silently win: ``deleteSource`` flipped) and nesting deeper than ``MAX_YAML_DEPTH``.

    :raises SpecFileError: naming the line and the key path.
    """
    # one frame per open collection: [keys seen (None for a sequence), current key or next index,
    # whether the next node is a key (mappings)]; the path is only worked out for an error message
    stack: list[list[Any]] = []
    scalar, map_start, seq_start = yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent

    def where(top: bool = True) -> str:
        return _yaml_path([f[1] - 1 if f[0] is None else f[1] for f in (stack if top else stack[:-1])])

    def fail(event: Any, message: str) -> SpecFileError:
        return SpecFileError(f"line {event.start_mark.line + 1}: {message}")

    for event in yaml.parse(text, Loader=_Loader):
        cls = type(event)
        if cls is yaml.MappingEndEvent or cls is yaml.SequenceEndEvent:
            stack.pop()
            continue
        if cls is not scalar and cls is not map_start and cls is not seq_start:
            if cls is yaml.AliasEvent:
                raise fail(event, f"YAML aliases (*{event.anchor}) are not allowed")
            continue
        if event.anchor is not None:
            raise fail(event, f"YAML anchors (&{event.anchor}) are not allowed")
        if stack:
            frame = stack[-1]
            if frame[0] is None:  # a sequence item
                frame[1] += 1
            elif frame[2]:  # a mapping key
                if cls is not scalar:
                    what = "list" if cls is seq_start else "mapping"
                    raise fail(event, f"a mapping key must be a plain value, not a {what} "
                                      f"(in {where(top=False) or 'the document'})")
                key = event.value
                if key == "<<" and event.implicit[0]:
                    frame[1] = key
                    raise fail(event, f"merge keys (<<) are not allowed ({where()})")
                if key in frame[0]:
                    frame[1] = key
                    raise fail(event, f"duplicate key {show(key)} ({where()}); each key may appear only once")
                frame[0].add(key)
                frame[1], frame[2] = key, False
                continue
            else:  # a mapping value
                frame[2] = True
        if cls is not scalar:
            if len(stack) >= MAX_YAML_DEPTH:
                raise fail(event, f"nested deeper than {MAX_YAML_DEPTH} levels ({where()})")
            stack.append([set(), None, True] if cls is map_start else [None, 0, False])


def read_spec_text(path: Path) -> str:
    """The text of a spec file: at most ``MAX_SPEC_FILE_BYTES``, strict UTF-8.

    :raises OSError: when the file cannot be read.
    :raises SpecFileError: when it is too big or not UTF-8.
    """
    with open(path, "rb") as fh:
        data = fh.read(MAX_SPEC_FILE_BYTES + 1)
    if len(data) > MAX_SPEC_FILE_BYTES:
        raise SpecFileError(f"larger than {MAX_SPEC_FILE_BYTES // (1024 * 1024)} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise SpecFileError(f"not UTF-8 text (byte 0x{data[err.start]:02x} on line {line})") from None


def parse_documents(text: str) -> list[dict[str, Any]]:
    """All mapping documents of a (multi-document) YAML text, refusing anchors, aliases and repeated keys.

    :raises SpecFileError: with the reason, the line and (for a repeated key) the key's path.
    """
    try:
        _check_events(text)
        docs = list(yaml.load_all(text, Loader=_UniqueKeyLoader))
    except SpecFileError:
        raise
    except yaml.YAMLError as err:
        raise SpecFileError(f"not readable YAML: {_one_line(err)}") from None
    except (ValueError, TypeError, RecursionError, OverflowError) as err:
        # e.g. an integer of more than 4300 digits, a timestamp out of range
        raise SpecFileError(f"not readable YAML: {_one_line(err)}") from None
    return [d for d in docs if isinstance(d, dict)]


def load_documents(path: Path) -> list[dict[str, Any]]:
    """All mapping documents of a (multi-document) YAML file.

    :raises OSError: when the file cannot be read.
    :raises SpecFileError: when it is not safe YAML (see ``read_spec_text`` and ``parse_documents``).
    """
    return parse_documents(read_spec_text(path))


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _metadata_problem(kind: Any, namespace: Any, name: Any) -> str | None:
    what = kind if isinstance(kind, str) and re.fullmatch(r"[A-Za-z0-9]{1,63}", kind) else "document"
    problem = name_problem(name)
    if problem:
        return f"a {what} was ignored: metadata.name {problem}"
    problem = namespace_problem(namespace)
    if problem:
        return f"{what} {name} was ignored: metadata.namespace {problem}"
    return None


#: folders of the store that are not namespace folders
RESERVED_FOLDERS = frozenset({"status", "claims"})


def _namespace_folder_documents(path: Path, docs: list[dict[str, Any]], problems: list[str]) -> list[dict[str, Any]]:
    """The documents of a file in a namespace folder, each in that namespace; others are problems."""
    folder = path.parent.name
    if namespace_problem(folder):
        problems.append(f"{path}: the folder {folder!r} is not a namespace name ({namespace_problem(folder)}); "
                        f"its files were ignored")
        return []
    kept = []
    for doc in docs:
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else None
        declared = meta.get("namespace") if meta else None
        if declared in (None, ""):
            doc = {**doc, "metadata": {**(meta or {}), "namespace": folder}}
        elif declared != folder:
            problems.append(f"{path}: a {doc.get('kind') or 'document'} of namespace {show(declared)} in the folder "
                            f"of namespace {folder} was ignored: a namespace folder holds only its own objects")
            continue
        kept.append(doc)
    return kept


def index_documents(docs_by_file: list[tuple[Path, list[dict[str, Any]]]]) -> StoreIndex:
    index = StoreIndex()
    for path, docs in docs_by_file:
        for doc in docs:
            kind = doc.get("kind")
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            name = meta.get("name")
            namespace = meta.get("namespace")
            if namespace is None or namespace == "":
                namespace = "default"
            if name is None or name == "":
                what = kind if isinstance(kind, str) and re.fullmatch(r"[A-Za-z0-9]{1,63}", kind) else "document"
                index.problems.append(f"{path}: a {what} without metadata.name was ignored")
                continue
            problem = _metadata_problem(kind, namespace, name)
            if problem:
                index.problems.append(f"{path}: {problem}")
                continue
            if kind == KIND:
                entry = SpecEntry(namespace=namespace, name=name, path=path, doc=doc)
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
                index.objects[(kind, namespace, name)] = doc
                index.origins[(kind, namespace, name)] = path  # the file whose copy is used
    return index


def retry_settings(policy: RetryPolicy) -> dict[str, Any]:
    """``retryPolicy`` as the Airflow task arguments it becomes (the delays as ``timedelta``).

    :raises ValueError: when a delay does not fit a ``timedelta`` (spec validation bounds them; this
        guards a ``RetryPolicy`` built by hand).
    """
    try:
        return {"retries": int(policy.maxAttempts),
                "retry_delay": timedelta(seconds=policy.backoff_seconds),
                "max_retry_delay": timedelta(seconds=policy.max_backoff_seconds)}
    except (OverflowError, ValueError, TypeError) as err:
        raise ValueError(f"spec.retryPolicy: {err}") from err


def dag_entries(index: StoreIndex) -> tuple[list[SpecEntry], list[str]]:
    """The migrations that get a DAG (sorted by key) and every problem of the store.

    Both DAG files call this, so they agree: ``vmmigrations.py`` builds the entries,
    ``vmmigration_store_check.py`` raises the problems as its import error. An entry that could not
    become a valid DAG (its id, its tags, its retry delays) is a problem instead of an entry.
    A VMMigration whose spec is invalid does get a DAG: its Validating task fails naming the fields.
    """
    entries: list[SpecEntry] = []
    problems = list(index.problems)
    seen: dict[str, SpecEntry] = {}
    for entry in sorted(index.migrations.values(), key=lambda e: e.key):
        dag_id = entry.dag_id
        reason = None
        if len(dag_id) > DAG_ID_MAX or not _DAG_ID_CHARS.fullmatch(dag_id):
            reason = f"its DAG id {show(dag_id)} is not a valid Airflow DAG id"
        elif len(f"namespace:{entry.namespace}") > DAG_TAG_MAX:
            reason = f"its namespace tag is longer than {DAG_TAG_MAX} characters"
        elif dag_id in seen:
            reason = f"its DAG id {dag_id} is also the DAG id of {seen[dag_id].key} ({seen[dag_id].path})"
        else:
            try:
                retry_settings(entry.migration.spec.retryPolicy if entry.migration else RetryPolicy())
            except ValueError as err:
                reason = str(err)
        if reason:
            problems.append(f"{entry.path}: VMMigration {entry.key} has no DAG: {reason}")
            continue
        seen[dag_id] = entry
        entries.append(entry)
    return entries, problems


class SpecStore:
    """A folder of YAML specs plus the state of each migration."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, state: RunState | None = None) -> None:
        self.root = Path(root) if root is not None else default_store_path()
        self._state = state

    @property
    def state(self) -> RunState:
        """Where the plan, disk records, run record, ledger and claims live (``include.runstate``); chosen
        on first use, so that a parse that reads no run state never reaches a run-state database."""
        if self._state is None:
            self._state = run_state_for(self)
        return self._state

    @property
    def status_dir(self) -> Path:
        return self.root / "status"

    def spec_files(self) -> list[Path]:
        """The YAML files of the store: those at its top (the operator's) and those in namespace folders
        (``<store>/<namespace>/*.yaml``, each writable by one team; see :meth:`index`)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()]
        for folder in self.root.iterdir():
            if folder.is_dir() and not folder.is_symlink() and folder.name not in RESERVED_FOLDERS:
                found += [p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()]
        return sorted(found)

    def index(self, files: list[Path] | None = None) -> StoreIndex:
        """Every object of the store (or of just ``files``, a subset of its spec files). A file in a
        namespace folder holds objects of that namespace only (one without ``metadata.namespace`` is put
        there): a team given write access to its folder cannot write a ReferenceGrant, Secret or Provider
        of another namespace. Files at the top are the operator's."""
        files_docs: list[tuple[Path, list[dict[str, Any]]]] = []
        problems: list[str] = []
        for path in (self.spec_files() if files is None else sorted(files)):
            try:
                docs = load_documents(path)
            except SpecFileError as err:
                problems.append(f"{path}: {err}")
                continue
            except OSError as err:
                problems.append(f"{path}: not readable: {err.strerror or err}")
                continue
            if path.parent != self.root:
                docs = _namespace_folder_documents(path, docs, problems)
            files_docs.append((path, docs))
        index = index_documents(files_docs)
        index.problems[:0] = problems
        return index

    def entry(self, namespace: str, name: str, index: StoreIndex | None = None) -> SpecEntry:
        index = index if index is not None else self.index()
        key = f"{namespace}/{name}"
        if key not in index.migrations:
            raise KeyError(f"VMMigration {key} is not in the spec store {self.root}")
        return index.migrations[key]

    def own_files(self, namespace: str, name: str) -> list[Path] | None:
        """The spec files one migration's validated run was resolved from (its VMMigration, VirtualMachine,
        Providers, Secrets and grants), as Validating recorded them in the plan; None when there is no plan
        or one of them is gone or is not a spec file of this store."""
        plan = self.load_plan(namespace, name)
        recorded = plan.get("specFiles") if isinstance(plan, dict) else None
        if not isinstance(recorded, list) or not recorded:
            return None
        paths = [self.root / f for f in recorded if isinstance(f, str)]
        return paths if len(paths) == len(recorded) and all(self._is_spec_file(p) for p in paths) else None

    def own_index(self, namespace: str, name: str) -> StoreIndex | None:
        """Only the migration's own spec files (:meth:`own_files`), when they still hold its VMMigration;
        None when the whole store must be read. Reading only these keeps a task's cost flat however big
        the store grows."""
        try:
            files = self.own_files(namespace, name)
        except ValueError:  # not Kubernetes names, or an unreadable plan
            return None
        if not files:
            return None
        index = self.index(files)
        return index if f"{namespace}/{name}" in index.migrations else None

    def _is_spec_file(self, path: Path) -> bool:
        """Whether :meth:`spec_files` would list ``path`` (without listing the whole store)."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return False
        if ".." in rel.parts or path.suffix not in (".yaml", ".yml") or not path.is_file():
            return False
        return len(rel.parts) == 1 or (len(rel.parts) == 2 and rel.parts[0] not in RESERVED_FOLDERS
                                       and not (self.root / rel.parts[0]).is_symlink())

    # -- state ---------------------------------------------------------------------------------
    def state_dir(self, namespace: str, name: str) -> Path:
        """The folder that holds every state file of one migration (``status/<namespace>/<name>/``).

        :raises ValueError: when ``namespace``/``name`` are not Kubernetes names (a path like ``../x``
            must never reach the file system).
        """
        problem = namespace_problem(namespace)
        if problem:
            raise ValueError(f"namespace {problem}")
        problem = name_problem(name)
        if problem:
            raise ValueError(f"name {problem}")
        return self.status_dir / namespace / name

    def status_path(self, namespace: str, name: str) -> Path:
        return self.state_dir(namespace, name) / "status.json"

    def plan_path(self, namespace: str, name: str) -> Path:
        return self.state_dir(namespace, name) / f"{PLAN}.json"

    def disks_dir(self, namespace: str, name: str) -> Path:
        return self.state_dir(namespace, name) / "disks"

    def disk_record_path(self, namespace: str, name: str, disk: str) -> Path:
        if not disk or disk in (".", "..") or any(c in disk for c in "/\\\x00\n"):
            raise ValueError(f"disk name {show(disk)} cannot name a file")
        return self.disks_dir(namespace, name) / f"{disk}.json"

    def read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        atomic_write_json(path, data)

    # -- run state, through ``self.state`` ---------------------------------------------------------
    def save_plan(self, namespace: str, name: str, plan: dict[str, Any]) -> None:
        self.state.write(namespace, name, PLAN, plan)

    def load_plan(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.state.read(namespace, name, PLAN)

    def delete_plan(self, namespace: str, name: str) -> None:
        self.state.delete(namespace, name, PLAN)

    def planned_disk_names(self, namespace: str, name: str) -> list[str] | None:
        plan = self.load_plan(namespace, name)
        if not plan:
            return None
        return [d["name"] for d in plan.get("disks", [])]

    def update_disk_record(self, namespace: str, name: str, disk: str, **values: Any) -> dict[str, Any]:
        def mutate(record: dict[str, Any]) -> dict[str, Any]:
            record.setdefault("name", disk)
            record.update(values)
            return dict(record)

        return self.state.update(namespace, name, disk_doc(disk), mutate)

    def run_record_path(self, namespace: str, name: str) -> Path:
        return self.state_dir(namespace, name) / f"{RUN}.json"

    def update_run_record(self, namespace: str, name: str, **values: Any) -> dict[str, Any]:
        """The run's own facts: its outcome (``targetValidated``, ``failure``), the VM it committed."""
        def mutate(record: dict[str, Any]) -> dict[str, Any]:
            record.update(values)
            return dict(record)

        return self.state.update(namespace, name, RUN, mutate)

    def run_record(self, namespace: str, name: str) -> dict[str, Any]:
        return self.state.read(namespace, name, RUN) or {}

    def disk_record(self, namespace: str, name: str, disk: str) -> dict[str, Any]:
        return self.state.read(namespace, name, disk_doc(disk)) or {"name": disk}

    def clear_disk_records(self, namespace: str, name: str) -> None:
        self.state.delete_prefix(namespace, name, "disks/")


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
    """Keeps the status as the run state's ``status`` document (``status.json`` beside the spec with the
    file run state; a row of the SQL run state, so workers sharing no disk see one status), updated under
    its lock so that parallel disks don't clash."""

    def __init__(self, store: SpecStore) -> None:
        self.store = store

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.store.state.read(namespace, name, STATUS)

    def update(self, namespace: str, name: str, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        from include.status import new_status

        def apply(doc: dict[str, Any]) -> dict[str, Any]:
            if not doc:
                doc.update(new_status())
            mutate(doc)
            return copy.deepcopy(doc)

        return self.store.state.update(namespace, name, STATUS, apply)
