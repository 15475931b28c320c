"""The end-of-session secret scan: no secret the tests used may show up in anything the suite produced.

``tests/conftest.py`` calls :func:`scan` from ``pytest_sessionfinish`` over the session folder (its
AIRFLOW_HOME, store and staging) and pytest's base temp folder (every ``tmp_path``: stores, standalone
Airflow homes, servers, shares). A hit fails the run.

What counts as a secret:

- every value of every Kubernetes ``Secret`` document (``data`` base64-decoded, ``stringData``) in any YAML
  file under the roots (that is how tests hand credentials to the engine: spec stores);
- the credentials registered by the test servers (tests/secrets_registry.py: S3 keys, bearer tokens, private
  keys).

Values shorter than :data:`MIN_LENGTH`, well-known words and values under keys such as ``username`` are not
secrets. Each secret is searched for as is, in base64 (standard and URL-safe, at any byte alignment, so it is
found inside a longer encoded blob such as ``user:password``), percent-encoded, and, for multi-line values
(private keys), line by line.

What is scanned: every text file (logs, status/plan/run/ledger/disk JSON, manifests, anything else that is
not binary) and every SQLite database, row by row (the Airflow metadata DBs: XCom, rendered templates,
serialized DAGs, audit log, ...). What is not: the inputs that hold secrets by design (Kubernetes manifests,
i.e. the spec store files; files registered by the servers; PEM/OpenSSH private key files) and binary files
(disk images, object data).
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import sqlite3
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MIN_LENGTH = 8
NON_SECRET_VALUES = frozenset({"root", "true", "false", "admin", "administrator", "opaque", "default", "none",
                               "null", "us-east-1"})
NON_SECRET_KEYS = frozenset({"username", "user", "login", "region", "endpoint", "url", "host", "hostname", "port",
                             "bucket", "namespace", "name", "insecureskipverify",
                             "cabundle", "ca.crt",  # a CA certificate is public by design
                             "tokenid", "sshknownhosts", "sshport", "sshuser"})  # an id, public host keys
TEXT_SUFFIXES = frozenset({".log", ".json", ".jsonl", ".txt", ".out", ".err"})
MAX_BYTES = 16 << 20  # larger files are scanned only if they are logs/JSON by name (disk images are not)
CHUNK = 8 << 20
SQLITE_MAGIC = b"SQLite format 3\x00"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Secret:
    value: str
    source: str

    @property
    def redacted(self) -> str:
        return f"{self.value[:3]}...({len(self.value)} chars)"


@dataclass(frozen=True)
class Hit:
    secret: Secret
    form: str  # plain, base64, base64url, urlencoded, line
    path: Path
    where: str  # "line 12" or "table xcom, column value, rowid 3"

    def __str__(self) -> str:
        return (f"secret {self.secret.redacted} from {self.secret.source} found ({self.form}) "
                f"in {self.path}: {self.where}")


@dataclass
class ScanResult:
    secrets: list[Secret]
    roots: list[Path] = field(default_factory=list)
    files: int = 0  # text files and databases scanned
    scanned: list[Path] = field(default_factory=list)
    excluded: list[Path] = field(default_factory=list)  # inputs holding secrets by design
    skipped: int = 0  # binary or too large
    hits: list[Hit] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return (f"secret scan: {self.files} files, {len(self.secrets)} secrets, {len(self.hits)} hits"
                f" ({len(self.excluded)} input files excluded, {self.skipped} binary files skipped)")


# -- secrets ---------------------------------------------------------------------------------------------------
def is_secret(value: object, key: str = "") -> bool:
    if not isinstance(value, str):
        return False
    text = value.strip()
    return (len(text) >= MIN_LENGTH and text.lower() not in NON_SECRET_VALUES
            and key.lower() not in NON_SECRET_KEYS)


def _is_manifest(docs: list[object]) -> bool:
    return bool(docs) and all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs if d is not None)


def secrets_in_documents(docs: Iterable[object], where: str) -> list[Secret]:
    """The values of the Kubernetes Secret documents among ``docs``."""
    found = []
    for doc in docs:
        if not (isinstance(doc, dict) and doc.get("kind") == "Secret"):
            continue
        meta = doc.get("metadata") or {}
        ref = f"Secret {meta.get('namespace', 'default')}/{meta.get('name', '?')} in {where}"
        for key, raw in (doc.get("data") or {}).items():
            try:
                value = base64.b64decode(str(raw), validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                value = str(raw)
            if is_secret(value, str(key)):
                found.append(Secret(value, f"{ref} key {key}"))
        for key, value in (doc.get("stringData") or {}).items():
            if is_secret(value, str(key)):
                found.append(Secret(value, f"{ref} key {key}"))
    return found


def _b64_forms(raw: bytes) -> set[bytes]:
    """``raw`` base64-encoded at the three byte alignments it can have inside a longer encoded string."""
    forms = set()
    for k in range(3):
        encoded = base64.b64encode(b"\x00" * k + raw)
        start, end = math.ceil(4 * k / 3), (8 * (k + len(raw))) // 6
        forms.add(encoded[start:end])
    forms.add(base64.b64encode(raw))
    return {f for f in forms if len(f) >= MIN_LENGTH}


def needles(secret: Secret) -> list[tuple[bytes, str]]:
    """What to search for: (bytes, form name)."""
    raw = secret.value.encode()
    out: dict[bytes, str] = {raw: "plain"}
    for form in sorted(_b64_forms(raw)):
        out.setdefault(form, "base64")
        out.setdefault(form.replace(b"+", b"-").replace(b"/", b"_"), "base64url")
    out.setdefault(urllib.parse.quote(secret.value, safe="").encode(), "urlencoded")
    if "\n" in secret.value.strip():
        for line in secret.value.splitlines():
            line = line.strip()
            if len(line) >= 16 and not line.startswith("-----"):
                out.setdefault(line.encode(), "line")
    return list(out.items())


# -- walking ---------------------------------------------------------------------------------------------------
def _walk(roots: Iterable[Path], inputs: set[Path]) -> Iterator[Path]:
    seen: set[Path] = set()
    for root in roots:
        root = Path(root).resolve()
        if not root.is_dir():
            continue
        for folder, dirs, files in os.walk(root, onerror=lambda _err: None):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if (here / d) not in inputs)
            for name in sorted(files):
                path = here / name
                if path not in seen and not path.is_symlink():
                    seen.add(path)
                    yield path


def _head(path: Path, size: int = 8192) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _is_key_file(head: bytes) -> bool:
    start = head.lstrip()[:64]
    return start.startswith(b"-----BEGIN") and b"PRIVATE KEY-----" in start


def collect_store_secrets(roots: Iterable[Path], inputs: set[Path] | None = None) -> tuple[list[Secret], set[Path]]:
    """Secrets of every Secret document in YAML files under ``roots``, and the manifest files themselves."""
    found: list[Secret] = []
    manifests: set[Path] = set()
    for path in _walk(roots, inputs or set()):
        if path.suffix not in (".yaml", ".yml"):
            continue
        try:
            if path.stat().st_size > MAX_BYTES:
                continue
            docs = list(yaml.load_all(path.read_text(errors="replace"), Loader=_Loader))  # noqa: S506 - safe loader
        except (OSError, ValueError, yaml.YAMLError):  # ValueError: a 5000-digit int, a bad date
            continue
        if _is_manifest(docs):
            manifests.add(path)
        found.extend(secrets_in_documents(docs, str(path)))
    return found, manifests


# -- matching --------------------------------------------------------------------------------------------------
class _Matcher:
    def __init__(self, secrets: list[Secret]):
        self.items = [(n, form, s) for s in secrets for n, form in needles(s)]
        self.longest = max((len(n) for n, _, _ in self.items), default=1)

    def find(self, data: bytes) -> Iterator[tuple[Secret, str, int]]:
        """(secret, form, offset of the first occurrence) for each form found; one hit per secret."""
        reported: set[str] = set()
        for needle, form, secret in self.items:
            if secret.value in reported:
                continue
            at = data.find(needle)
            if at >= 0:
                reported.add(secret.value)
                yield secret, form, at


def _scan_text(path: Path, matcher: _Matcher) -> list[Hit]:
    hits: list[Hit] = []
    reported: set[str] = set()
    overlap = matcher.longest - 1
    lines_before, base, tail = 0, 0, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            data = tail + chunk
            for secret, form, at in matcher.find(data):
                if secret.value not in reported:
                    reported.add(secret.value)
                    line = lines_before + data.count(b"\n", 0, at) + 1
                    hits.append(Hit(secret, form, path, f"line {line}, byte {base + at}"))
            keep = data[-overlap:] if overlap else b""
            lines_before += data.count(b"\n", 0, len(data) - len(keep))
            base += len(data) - len(keep)
            tail = keep
    return hits


def _cells(value: object) -> list[bytes]:
    if isinstance(value, str):
        return [value.encode("utf-8", "replace")]
    if isinstance(value, bytes | memoryview):
        data = bytes(value)
        out = [data]
        if data[:1] == b"x":  # zlib (compressed serialized DAGs)
            try:
                out.append(zlib.decompress(data))
            except zlib.error:
                pass
        return out
    return []


def _scan_sqlite(path: Path, matcher: _Matcher) -> list[Hit] | None:
    """Every row of every table; None if the file does not open as a database."""
    hits: list[Hit] = []
    try:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            quoted = '"' + table.replace('"', '""') + '"'
            try:
                cur = conn.execute(f"SELECT rowid, * FROM {quoted}")  # noqa: S608 - names from sqlite_master
            except sqlite3.Error:
                cur = conn.execute(f"SELECT NULL, * FROM {quoted}")  # noqa: S608 - WITHOUT ROWID table
            columns = [d[0] for d in cur.description][1:]
            rows = cur.fetchall()
            blob = b"\x00".join(c for row in rows for v in row[1:] for c in _cells(v))
            found = {s.value for s, _, _ in matcher.find(blob)}
            if not found:
                continue
            reported: set[str] = set()
            for row in rows:
                for column, value in zip(columns, row[1:], strict=True):
                    for cell in _cells(value):
                        for secret, form, _ in matcher.find(cell):
                            if secret.value in found and secret.value not in reported:
                                reported.add(secret.value)
                                hits.append(Hit(secret, form, path, f"table {table}, column {column}, rowid {row[0]}"))
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return hits


def scan(roots: Iterable[Path], registered: Mapping[str, str] | None = None,
         inputs: Iterable[Path] = ()) -> ScanResult:
    """Scan everything under ``roots`` for the Secret values found there plus ``registered`` ones."""
    roots = [Path(r) for r in roots]
    excluded_dirs = {Path(p).resolve() for p in inputs}
    store_secrets, manifests = collect_store_secrets(roots, excluded_dirs)
    by_value: dict[str, Secret] = {}
    for value, source in (registered or {}).items():
        if is_secret(value):
            by_value.setdefault(value, Secret(value, source))
    for secret in store_secrets:
        by_value.setdefault(secret.value, secret)
    result = ScanResult(secrets=list(by_value.values()), roots=[r for r in roots if r.is_dir()])
    matcher = _Matcher(result.secrets)
    for path in _walk(roots, excluded_dirs):
        if path in manifests or path.resolve() in excluded_dirs:
            result.excluded.append(path)
            continue
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if size == 0:
            continue
        head = _head(path)
        if head.startswith(SQLITE_MAGIC):
            found = _scan_sqlite(path, matcher)
            if found is not None:
                result.files += 1
                result.scanned.append(path)
                result.hits.extend(found)
                continue
            head = b""  # not readable as a database: scan its bytes
        if _is_key_file(head):
            result.excluded.append(path)
            continue
        if b"\x00" in head or (size > MAX_BYTES and path.suffix not in TEXT_SUFFIXES):
            result.skipped += 1
            continue
        if result.secrets:
            try:
                result.hits.extend(_scan_text(path, matcher))
            except OSError:
                continue
        result.files += 1
        result.scanned.append(path)
    return result
