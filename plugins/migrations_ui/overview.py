"""What the "Migrations" page shows: every VMMigration of the spec store, its status and its latest run.

Nothing here knows about HTTP or Airflow: ``overview`` takes the latest run of each DAG as a mapping
(``migrations_ui.runs`` reads it from Airflow's database) and returns the JSON document the page renders.
Sizes are formatted here, once, in IEC units (KiB, MiB, GiB), beside the raw byte counts.

The store is parsed again only when one of its spec files changed (their paths, sizes and modification
times are compared at each call), so that a page polled every few seconds over hundreds of migrations
costs one ``stat`` per spec file and one status read per migration.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from include.store import FileStatusSink, SpecStore, StoreIndex, dag_id_for

IEC_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
#: the keys of a status disk entry the page shows (those present are passed on)
DISK_KEYS = ("name", "phase", "bytesDone", "bytesTotal", "virtualBytes", "rateBytesPerSecond", "etaSeconds",
             "checksum")
SUMMARY_KEYS = ("seconds", "bytesMoved", "rateBytesPerSecond")
SUMMARY_DISK_KEYS = ("name", "virtualBytes", "allocatedBytes", "bytesMoved", "checksum", "seconds",
                     "rateBytesPerSecond")
FINISHED = ("Ready", "Failed")


def iec_bytes(n: Any) -> str | None:
    """``1.5 GiB``, ``384 MiB``, ``512 B``: powers of 1024, one decimal at most; None for a non-number."""
    if isinstance(n, bool) or not isinstance(n, int | float):
        return None
    value = float(n)
    for unit in IEC_UNITS:
        if abs(value) < 1024 or unit == IEC_UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            text = f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def iec_rate(n: Any) -> str | None:
    text = iec_bytes(n)
    return f"{text}/s" if text is not None else None


def duration(seconds: Any) -> str | None:
    """``45 s``, ``3 min 20 s``, ``2 h 5 min``; None for a non-number."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        return None
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s % 60 else f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min" if s % 3600 // 60 else f"{s // 3600} h"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def disk_view(disk: Mapping[str, Any]) -> dict[str, Any]:
    """One status disk entry: the keys the page shows (those present) and their text in IEC units."""
    out = {k: disk[k] for k in DISK_KEYS if k in disk}
    done, total = disk.get("bytesDone"), disk.get("bytesTotal")
    text: dict[str, str] = {}
    if _number(done) and _number(total):
        percent = int(done * 100 / total) if total else 100
        text["bytes"] = f"{iec_bytes(done)} / {iec_bytes(total)} ({percent}%)"
        out["percent"] = percent
    elif _number(done):
        text["bytes"] = iec_bytes(done) or ""
    for key, label, fmt in (("virtualBytes", "virtual", iec_bytes), ("rateBytesPerSecond", "rate", iec_rate),
                            ("etaSeconds", "eta", duration)):
        formatted = fmt(disk.get(key))
        if formatted is not None:
            text[label] = formatted
    out["text"] = text
    return out


def summary_view(summary: Any) -> dict[str, Any] | None:
    """The run summary of an ended migration (``status.summary``) with its text; None when there is none."""
    if not isinstance(summary, Mapping):
        return None
    out: dict[str, Any] = {k: summary[k] for k in SUMMARY_KEYS if k in summary}
    out["text"] = {k: v for k, v in (("seconds", duration(summary.get("seconds"))),
                                     ("bytesMoved", iec_bytes(summary.get("bytesMoved"))),
                                     ("rate", iec_rate(summary.get("rateBytesPerSecond")))) if v is not None}
    disks = []
    for disk in summary.get("disks") or ():
        if not isinstance(disk, Mapping):
            continue
        row = {k: disk[k] for k in SUMMARY_DISK_KEYS if k in disk}
        row["text"] = {k: v for k, v in (("virtual", iec_bytes(disk.get("virtualBytes"))),
                                         ("allocated", iec_bytes(disk.get("allocatedBytes"))),
                                         ("moved", iec_bytes(disk.get("bytesMoved"))),
                                         ("seconds", duration(disk.get("seconds"))),
                                         ("rate", iec_rate(disk.get("rateBytesPerSecond")))) if v is not None}
        disks.append(row)
    out["disks"] = disks
    return out


def dag_url(dag_id: str) -> str:
    """The DAG's page in the Airflow UI, relative to this app's pages (``/vmmigrations/``)."""
    return f"../dags/{quote(dag_id, safe='')}"


def run_url(dag_id: str, run_id: str) -> str:
    return f"{dag_url(dag_id)}/runs/{quote(run_id, safe='')}"


def _iso(value: Any) -> str | None:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return value if isinstance(value, str) else None


def run_view(dag_id: str, run: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not run or not run.get("run_id"):
        return None
    return {"runId": run["run_id"], "state": run.get("state"), "startDate": _iso(run.get("start_date")),
            "endDate": _iso(run.get("end_date")), "url": run_url(dag_id, run["run_id"])}


# -- the store's side, cached per set of spec files -----------------------------------------------------

@dataclass(frozen=True)
class SpecRow:
    """What the page shows of one VMMigration's spec (built when the store changes, not at each poll)."""

    namespace: str
    name: str
    view: dict[str, Any]


def _ref(value: Any, default_namespace: str) -> tuple[str | None, str]:
    if isinstance(value, Mapping):
        name = value.get("name")
        namespace = value.get("namespace") or default_namespace
        return (name if isinstance(name, str) else None), (namespace if isinstance(namespace, str)
                                                            else default_namespace)
    return None, default_namespace


def _provider_type(index: StoreIndex, namespace: str, name: str | None) -> str | None:
    provider = index.objects.get(("Provider", namespace, name)) if name else None
    spec = provider.get("spec") if isinstance(provider, Mapping) else None
    kind = spec.get("type") if isinstance(spec, Mapping) else None
    return kind if isinstance(kind, str) else None


def spec_rows(index: StoreIndex) -> list[SpecRow]:
    """The spec side of every VMMigration of ``index``, sorted by namespace/name: source VM and its
    Provider, target name and Provider (with their types), storage type; read from the raw document, so
    that a VMMigration whose spec is invalid is listed too (with the error)."""
    rows = []
    for entry in sorted(index.migrations.values(), key=lambda e: (e.namespace, e.name)):
        spec = entry.doc.get("spec") if isinstance(entry.doc.get("spec"), Mapping) else {}
        ns = entry.namespace
        source_name = spec.get("sourceName") if isinstance(spec.get("sourceName"), str) else None
        source_ns = spec.get("sourceNamespace") if isinstance(spec.get("sourceNamespace"), str) else ns
        vm = index.objects.get(("VirtualMachine", source_ns, source_name)) if source_name else None
        vm_spec = vm.get("spec") if isinstance(vm, Mapping) and isinstance(vm.get("spec"), Mapping) else {}
        src_provider, src_provider_ns = _ref(vm_spec.get("providerRef"), source_ns)
        dst_provider, dst_provider_ns = _ref(spec.get("targetProviderRef"), ns)
        storage = spec.get("storage") if isinstance(spec.get("storage"), Mapping) else {}
        target_name = spec.get("targetName") if isinstance(spec.get("targetName"), str) else None
        dag_id = dag_id_for(ns, entry.name)
        view = {
            "namespace": ns, "name": entry.name, "key": entry.key, "dagId": dag_id, "dagUrl": dag_url(dag_id),
            "source": {"name": source_name, "namespace": source_ns, "provider": src_provider,
                       "providerNamespace": src_provider_ns,
                       "providerType": _provider_type(index, src_provider_ns, src_provider)},
            "target": {"name": target_name, "provider": dst_provider, "providerNamespace": dst_provider_ns,
                       "providerType": _provider_type(index, dst_provider_ns, dst_provider)},
            "storageType": storage.get("type") if isinstance(storage.get("type"), str) else None,
            "specError": str(entry.error) if entry.error else None,
        }
        rows.append(SpecRow(ns, entry.name, view))
    return rows


class SpecCache:
    """``spec_rows`` of a store, computed again only when its spec files change (path, size, mtime)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[Any, ...] | None = None
        self._rows: list[SpecRow] = []

    def rows(self, store: SpecStore) -> list[SpecRow]:
        signature = [str(store.root)]
        for path in store.spec_files():
            try:
                st = path.stat()
            except OSError:
                continue
            signature.append((str(path), st.st_size, st.st_mtime_ns))
        key = tuple(signature)
        with self._lock:
            if key != self._key:
                self._rows = spec_rows(store.index())
                self._key = key
            return self._rows


# -- the status side, read at each call ----------------------------------------------------------------

def status_view(status: Mapping[str, Any] | None) -> dict[str, Any]:
    status = status or {}
    disks = status.get("disks") if isinstance(status.get("disks"), list) else []
    conditions = status.get("conditions") if isinstance(status.get("conditions"), list) else []
    return {
        "phase": status.get("phase"), "progress": status.get("progress"), "message": status.get("message"),
        "failedPhase": status.get("failedPhase"), "startTime": status.get("startTime"),
        "completionTime": status.get("completionTime"),
        "conditions": [{k: c.get(k) for k in ("type", "status", "reason", "message", "lastTransitionTime")
                        if c.get(k) is not None} for c in conditions if isinstance(c, Mapping)],
        "disks": [disk_view(d) for d in disks if isinstance(d, Mapping)],
        "summary": summary_view(status.get("summary")),
    }


def overview(store: SpecStore, cache: SpecCache, runs: Mapping[str, Mapping[str, Any]] | None,
             *, allowed: Callable[[str], bool] = lambda _dag_id: True) -> dict[str, Any]:
    """The page's document: one entry per VMMigration whose DAG ``allowed`` lets the user read, with its
    status and the latest run of its DAG (``runs``, by DAG id; None when Airflow's runs could not be read)."""
    sink = FileStatusSink(store)
    migrations = []
    for row in cache.rows(store):
        dag_id = row.view["dagId"]
        if not allowed(dag_id):
            continue
        try:
            status = sink.get(row.namespace, row.name)
        except (ValueError, OSError):  # a name that cannot be a state folder; an unreadable status
            status = None
        migrations.append({**row.view, **status_view(status),
                           "run": run_view(dag_id, (runs or {}).get(dag_id))})
    phases: dict[str, int] = {}
    for m in migrations:
        phases[m["phase"] or "None"] = phases.get(m["phase"] or "None", 0) + 1
    return {"generatedAt": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "total": len(migrations), "phases": phases,
            "runsAvailable": runs is not None, "migrations": migrations}
