"""Migration waves: a ``MigrationWavePlan`` moves many VMs in ordered waves, each in its own time window and under
its own limits, each VM through an ordinary VMMigration run by its own DAG (``include.submit``).

A plan is a document of the spec store::

    apiVersion: vmmigration.virtrigaud.io/v1alpha1
    kind: MigrationWavePlan
    metadata: {name: dc1-exit, namespace: default}
    spec:
      template: {...}                 # VMMigration spec defaults (target provider, storage, format, policies)
      waves:
        - name: wave-1
          vms: [{name: web-01}, {name: db-01, overrides: {targetDiskFormat: raw}}]
          window: {start: "2026-12-05T22:00:00Z", end: 4h}      # or {schedule: "0 22 * * 6", end: 4h}
          limits: {maxConcurrent: 2, perSourceProvider: 1, perTargetProvider: 2, perStorage: 2}
          onFailure: stop              # stop | continue: what a failure in this wave does to the next

Here: parsing with every error naming its field (``spec.waves[1].limits.maxConcurrent``), the VMMigration of
each VM (``<plan>-<vm>``: the template, ``sourceName``, then the VM's overrides, deep-merged), the window
arithmetic, the wave summary, and :class:`Leases`: the per-resource limits, held in the run state.

Why leases, not pools: one task instance waits in one Airflow pool only, so a migration limited per source
provider, per target provider and per storage at once cannot be three pools. A lease is one of ``limit``
numbered slots per resource, each a claim of the run state (a file created with ``O_EXCL`` or a row inserted
under its primary key, ``include.runstate``); a migration takes one slot of every resource it needs in one step,
under the run state's lock, or none; it renews them while it runs and gives them up when its run has ended.
A slot whose holder stopped renewing (a worker that died) expires after its time to live.

No Airflow here.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from include.spec import FieldError, SpecValidationError, name_problem, namespace_problem, parse_duration, show

log = logging.getLogger(__name__)

API_VERSION = "vmmigration.virtrigaud.io/v1alpha1"
KIND = "MigrationWavePlan"
DAG_ID_PREFIX = "vmwave__"
ON_FAILURE = ("stop", "continue")
DEFAULT_MAX_CONCURRENT = 4
MAX_LIMIT = 1000
LIMIT_FIELDS = ("maxConcurrent", "perSourceProvider", "perTargetProvider", "perStorage")
#: the resource dimensions a lease is taken in, by limit field
DIMENSIONS = {"perSourceProvider": "source", "perTargetProvider": "target", "perStorage": "storage"}
LABEL_PLAN = "vmmigration.virtrigaud.io/wave-plan"
LABEL_WAVE = "vmmigration.virtrigaud.io/wave"
_MAX_WINDOW = 366 * 24 * 3600
_GROUP_ID = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


# -- the plan -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """When a wave may start migrations: from ``start`` (or each time ``schedule`` fires) until ``end`` (a time,
    or ``duration`` seconds after the opening); no new migration starts after the end."""

    schedule: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    duration: float | None = None

    def bounds(self, now: datetime) -> tuple[datetime | None, datetime | None]:
        """The opening this wave is in or waits for at ``now``: (opens, closes); None for no bound.

        A cron window is open from each time it fires for ``duration`` (without one, until it fires next): at
        ``now`` that is the latest firing if it is still open, else the next one."""
        if self.schedule is None:
            start = self.start
            end = self.end or (start + timedelta(seconds=self.duration) if start and self.duration else None)
            return start, end
        from croniter import croniter

        last = croniter(self.schedule, now).get_prev(datetime)
        nxt = croniter(self.schedule, now).get_next(datetime)
        last_end = last + timedelta(seconds=self.duration) if self.duration else nxt
        if now < last_end:
            return last, last_end
        return nxt, (nxt + timedelta(seconds=self.duration) if self.duration
                     else croniter(self.schedule, nxt).get_next(datetime))


@dataclass(frozen=True)
class Limits:
    maxConcurrent: int = DEFAULT_MAX_CONCURRENT
    perSourceProvider: int | None = None
    perTargetProvider: int | None = None
    perStorage: int | None = None


@dataclass(frozen=True)
class WaveVM:
    #: the VirtualMachine's name (in the template's ``sourceNamespace``, else the plan's namespace)
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Wave:
    name: str
    vms: tuple[WaveVM, ...]
    window: Window | None = None
    limits: Limits = field(default_factory=Limits)
    onFailure: str = "stop"
    index: int = 0


class _Named:
    """A plan's key (``namespace/name``) and its DAG's id."""

    namespace: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def dag_id(self) -> str:
        return plan_dag_id(self.namespace, self.name)


@dataclass(frozen=True)
class WavePlan(_Named):
    name: str
    namespace: str
    template: dict[str, Any]
    waves: tuple[Wave, ...]
    path: Path | None = None

    def wave(self, name: str) -> Wave:
        for wave in self.waves:
            if wave.name == name:
                return wave
        raise KeyError(f"plan {self.key} has no wave {name!r}")

    def migration_name(self, vm: WaveVM) -> str:
        return f"{self.name}-{vm.name}"

    def migration_document(self, wave: Wave, vm: WaveVM) -> dict[str, Any]:
        """The VMMigration of ``vm``: ``spec.template``, then ``sourceName``, then the VM's overrides, deep-merged
        (a mapping merges key by key; anything else, lists included, replaces)."""
        spec = deep_merge(deep_merge(self.template, {"sourceName": vm.name}), vm.overrides)
        return {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "VMMigration",
                "metadata": {"name": self.migration_name(vm), "namespace": self.namespace,
                             "labels": {LABEL_PLAN: self.name, LABEL_WAVE: wave.name}},
                "spec": spec}


def plan_dag_id(namespace: str, name: str) -> str:
    return f"{DAG_ID_PREFIX}{namespace}__{name}"


def deep_merge(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``: mappings merge key by key, recursively; any other value replaces. A copy."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for key, value in over.items():
            out[key] = deep_merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


class _Fields:
    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def mapping(self, raw: Any, path: str, known: tuple[str, ...], *, required: bool = False) -> dict[str, Any]:
        if raw is None:
            if required:
                self.error(path, "required")
            return {}
        if not isinstance(raw, dict):
            self.error(path, f"must be an object, got {_type_name(raw)}")
            return {}
        for key in raw:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6) if len(str(key)) <= 64 else []
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known fields: {', '.join(known)})"
                self.error(f"{path}.{key}" if isinstance(key, str) else f"{path}[{show(key)}]", f"unknown field{hint}")
        return raw

    def limit(self, raw: dict, key: str, path: str, default: int | None) -> int | None:
        value = raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(f"{path}.{key}", f"must be an integer, got {_type_name(value)}")
        elif not 1 <= value <= MAX_LIMIT:
            self.error(f"{path}.{key}", f"must be between 1 and {MAX_LIMIT}, got {value}")
        else:
            return value
        return default


def parse_time(text: Any) -> datetime:
    """An RFC 3339 time with its offset (``2026-12-05T22:00:00Z``), as an aware datetime in UTC.

    :raises ValueError: what is wrong with it
    """
    if not isinstance(text, str):
        if isinstance(text, datetime):  # YAML reads an unquoted timestamp as one
            if text.tzinfo is None:
                raise ValueError(f"{text.isoformat()} has no time zone offset (write Z or +hh:mm)")
            return text.astimezone(UTC)
        raise ValueError(f"must be an RFC 3339 time such as 2026-12-05T22:00:00Z, got {_type_name(text)}")
    if not re.fullmatch(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", text):
        raise ValueError(f"{show(text)} is not an RFC 3339 time such as 2026-12-05T22:00:00Z")
    return datetime.fromisoformat(text.upper().replace("Z", "+00:00")).astimezone(UTC)


def _window(r: _Fields, raw: Any, path: str) -> Window | None:
    if raw is None:
        return None
    body = r.mapping(raw, path, ("schedule", "start", "end"))
    if not body:
        return None
    schedule, start, end, duration = None, None, None, None
    if body.get("schedule") is not None and body.get("start") is not None:
        r.error(f"{path}.schedule", "give either schedule (cron) or start (a time), not both")
    if body.get("schedule") is not None:
        from croniter import croniter

        value = body["schedule"]
        if not isinstance(value, str) or not croniter.is_valid(value):
            r.error(f"{path}.schedule", f"{show(value)} is not a cron expression such as '0 22 * * 6'")
        else:
            schedule = value
    elif body.get("start") is not None:
        try:
            start = parse_time(body["start"])
        except ValueError as err:
            r.error(f"{path}.start", str(err))
    else:
        r.error(path, "needs schedule (cron) or start (an RFC 3339 time)")
    raw_end = body.get("end")
    if raw_end is not None:
        looks_like_time = isinstance(raw_end, datetime) or (isinstance(raw_end, str) and raw_end[:1].isdigit()
                                                            and "-" in raw_end)
        try:
            if looks_like_time:
                if schedule is not None:
                    raise ValueError("with a schedule, end is a duration after each opening (such as 4h)")
                end = parse_time(raw_end)
                if start is not None and end <= start:
                    raise ValueError(f"{end.isoformat()} is not after start {start.isoformat()}")
            else:
                duration = parse_duration(raw_end)
                if not 0 < duration <= _MAX_WINDOW:
                    raise ValueError(f"{show(raw_end)} must be longer than 0s and at most 8784h")
        except ValueError as err:
            r.error(f"{path}.end", f"{err}" if looks_like_time or "must" in str(err)
                    else f"{show(raw_end)} is neither an RFC 3339 time nor a duration such as 4h")
    return Window(schedule=schedule, start=start, end=end, duration=duration)


def _remap(err: FieldError, overrides: dict[str, Any], vm_path: str) -> FieldError:
    """A VMMigration field error as the plan field it comes from: the VM's overrides when they set it (or the
    field that holds it), else the template."""
    path = err.path
    if path.startswith("spec."):
        rest = path.removeprefix("spec.")
        top = re.split(r"[.\[]", rest, maxsplit=1)[0]
        if top == "sourceName":
            return FieldError(f"{vm_path}.name", err.message)
        where = f"{vm_path}.overrides" if top in overrides else "spec.template"
        return FieldError(f"{where}.{rest}", err.message)
    if path.startswith("metadata.name"):
        return FieldError(f"{vm_path}.name", f"the VMMigration name <plan>-<vm>: {err.message}")
    return FieldError(f"{vm_path}.{path}", err.message)


def parse_plan(doc: Any, path: Path | None = None) -> WavePlan:
    """A MigrationWavePlan document, checked: every problem at once, each naming its field.

    Each VM's VMMigration is checked here as ``include.submit.check`` checks it without inventory (the spec's
    own rules); its references (VirtualMachine, Providers) are followed when the wave prepares it.

    :raises SpecValidationError: the problems, each naming its field
    """
    from include.submit import check

    r = _Fields()
    doc = r.mapping(doc, "(document)", ("apiVersion", "kind", "metadata", "spec"), required=True)
    if doc.get("apiVersion") != API_VERSION:
        r.error("apiVersion", f"must be {API_VERSION}, got {show(doc.get('apiVersion'))}")
    if doc.get("kind") != KIND:
        r.error("kind", f"must be {KIND}, got {show(doc.get('kind'))}")
    meta = r.mapping(doc.get("metadata"), "metadata", ("name", "namespace", "labels", "annotations"),
                     required=True)
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    problem = name_problem(name) if name is not None else "required"
    if problem is None and len(name) > 63:
        problem = f"{show(name)} is longer than 63 characters (a plan's name starts each VMMigration's name)"
    if problem is None and not _GROUP_ID.fullmatch(name):
        problem = f"{show(name)} is not a DNS label (lowercase letters, digits and '-')"
    if problem:
        r.error("metadata.name", problem)
        name = None
    if namespace_problem(namespace):
        r.error("metadata.namespace", namespace_problem(namespace))
    spec = r.mapping(doc.get("spec"), "spec", ("template", "waves"), required=True)
    template = spec.get("template")
    if template is None:
        template = {}
    elif not isinstance(template, dict):
        r.error("spec.template", f"must be an object (VMMigration spec fields), got {_type_name(template)}")
        template = {}
    raw_waves = spec.get("waves")
    waves: list[Wave] = []
    if not isinstance(raw_waves, list) or not raw_waves:
        r.error("spec.waves", "required: a list of at least one wave" if raw_waves in (None, [])
                else f"must be a list, got {_type_name(raw_waves)}")
        raw_waves = []
    wave_names: dict[str, int] = {}
    vm_seen: dict[str, str] = {}
    for i, raw in enumerate(raw_waves):
        wpath = f"spec.waves[{i}]"
        body = r.mapping(raw, wpath, ("name", "vms", "window", "limits", "onFailure"))
        if not isinstance(raw, dict):
            continue
        wname = body.get("name")
        if not isinstance(wname, str) or not _GROUP_ID.fullmatch(wname) or len(wname) > 63:
            r.error(f"{wpath}.name", "required" if wname is None else
                    f"{show(wname)} is not a wave name (a DNS label: lowercase letters, digits and '-')")
            wname = f"wave-{i}"
        elif wname in wave_names:
            r.error(f"{wpath}.name", f"{wname!r} is also the name of spec.waves[{wave_names[wname]}]")
        wave_names.setdefault(wname, i)
        on_failure = body.get("onFailure", "stop")
        if on_failure not in ON_FAILURE:
            r.error(f"{wpath}.onFailure", f"must be one of stop, continue, got {show(on_failure)}")
            on_failure = "stop"
        limits_raw = r.mapping(body.get("limits"), f"{wpath}.limits", LIMIT_FIELDS)
        limits = Limits(*(r.limit(limits_raw, key, f"{wpath}.limits",
                                  DEFAULT_MAX_CONCURRENT if key == "maxConcurrent" else None)
                          for key in LIMIT_FIELDS))
        window = _window(r, body.get("window"), f"{wpath}.window")
        vms: list[WaveVM] = []
        raw_vms = body.get("vms")
        if not isinstance(raw_vms, list) or not raw_vms:
            r.error(f"{wpath}.vms", "required: a list of at least one VM" if raw_vms in (None, [])
                    else f"must be a list, got {_type_name(raw_vms)}")
            raw_vms = []
        for j, raw_vm in enumerate(raw_vms):
            vpath = f"{wpath}.vms[{j}]"
            vbody = r.mapping(raw_vm, vpath, ("name", "overrides"), required=True)
            vname = vbody.get("name")
            vproblem = name_problem(vname) if vname is not None else "required"
            if vproblem:
                r.error(f"{vpath}.name", vproblem)
                continue
            if vname in vm_seen:
                r.error(f"{vpath}.name", f"VM {vname!r} is also in {vm_seen[vname]}: a plan moves each VM once")
                continue
            vm_seen[vname] = vpath
            overrides = vbody.get("overrides") or {}
            if not isinstance(overrides, dict):
                r.error(f"{vpath}.overrides", f"must be an object (VMMigration spec fields), got "
                                              f"{_type_name(overrides)}")
                continue
            vms.append(WaveVM(vname, copy.deepcopy(overrides)))
        waves.append(Wave(name=wname, vms=tuple(vms), window=window, limits=limits, onFailure=on_failure,
                          index=i))
    plan = WavePlan(name=name or "invalid", namespace=namespace if not namespace_problem(namespace) else "default",
                    template=copy.deepcopy(template), waves=tuple(waves), path=path)
    if name is not None:
        for wave in plan.waves:
            for j, vm in enumerate(wave.vms):
                vpath = f"spec.waves[{wave.index}].vms[{j}]"
                for err in check(plan.migration_document(wave, vm), None):
                    remapped = _remap(err, vm.overrides, vpath)
                    if remapped not in r.errors:
                        r.errors.append(remapped)
    if r.errors:
        raise SpecValidationError(r.errors)
    return plan


# -- plans in the store -------------------------------------------------------------------------------------------
@dataclass
class PlanEntry(_Named):
    """One MigrationWavePlan found in the store: parsed, or the errors that keep it from running."""

    namespace: str
    name: str
    path: Path
    plan: WavePlan | None = None
    errors: list[str] = field(default_factory=list)


_DAG_ID_OK = re.compile(r"[A-Za-z0-9_.-]{1,250}")


def plan_entries(store: Any) -> list[PlanEntry]:
    """Every MigrationWavePlan of the store (``include.store.SpecStore``), sorted by key.

    Only the files that mention the kind are parsed (a byte search first), so a store of a thousand VMMigrations
    costs a thousand small reads. A file that cannot be read safely, or a plan defined twice, is an entry with
    errors: it still gets a DAG, whose only task fails naming them."""
    from include.store import SpecFileError, load_documents

    found: dict[str, PlanEntry] = {}
    needle = KIND.encode()
    for path in store.spec_files():
        try:
            with open(path, "rb") as fh:
                if needle not in fh.read():
                    continue
            docs = load_documents(path)
        except (OSError, SpecFileError):
            continue  # vmmigration_store_check.py reports the file
        if path.parent != store.root:  # a namespace folder: its documents are of its namespace only
            docs = [{**d, "metadata": {**(d.get("metadata") or {}), "namespace": path.parent.name}}
                    if isinstance(d.get("metadata"), dict) and not d["metadata"].get("namespace") else d
                    for d in docs]
        for doc in docs:
            if doc.get("kind") != KIND:
                continue
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            ns, name = meta.get("namespace") or "default", meta.get("name")
            if not isinstance(name, str) or not isinstance(ns, str) or not _DAG_ID_OK.fullmatch(plan_dag_id(ns, name)):
                log.error("%s: a MigrationWavePlan with metadata %s was ignored: not a valid name", path,
                          show(meta.get("name")))
                continue
            if path.parent != store.root and ns != path.parent.name:
                log.error("%s: MigrationWavePlan %s/%s of another namespace was ignored", path, ns, name)
                continue
            entry = PlanEntry(ns, name, path)
            if entry.key in found:
                found[entry.key].errors.append(f"MigrationWavePlan {entry.key} is defined twice: in "
                                               f"{found[entry.key].path.name} and in {path.name}")
                found[entry.key].plan = None
                continue
            try:
                entry.plan = parse_plan(doc, path)
            except SpecValidationError as err:
                entry.errors = [str(e) for e in err.errors]
            found[entry.key] = entry
    return [found[k] for k in sorted(found)]


def find_plan(store: Any, namespace: str, name: str) -> WavePlan:
    """The plan namespace/name of the store, valid.

    :raises SpecValidationError: it is not valid (or defined twice); :raises KeyError: it is not there"""
    for entry in plan_entries(store):
        if entry.namespace == namespace and entry.name == name:
            if entry.plan is None:
                raise SpecValidationError([FieldError("(plan)", e) for e in entry.errors])
            return entry.plan
    raise KeyError(f"MigrationWavePlan {namespace}/{name} is not in the spec store {store.root}")


# -- resources a migration takes leases on ------------------------------------------------------------------------
def storage_key(storage: Any) -> str:
    """The storage backend a migration goes through: its type and where (endpoint, bucket, path)."""
    parts = [storage.type, storage.endpoint or "", storage.bucket or "", storage.path or ""]
    return ":".join(parts)


def lease_demands(limits: Limits, source_provider: str, target_provider: str, storage: str) -> dict[str, int]:
    """The leases one migration of a wave needs: ``{resource: limit}`` for each limit the wave sets."""
    out: dict[str, int] = {}
    for fname, dim in DIMENSIONS.items():
        limit = getattr(limits, fname)
        if limit is not None:
            resource = {"source": source_provider, "target": target_provider, "storage": storage}[dim]
            out[f"{dim}:{resource}"] = limit
    return out


# -- the summary --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VMResult:
    vm: str
    migration: str
    #: done | failed | skipped
    result: str
    reason: str = ""
    bytesMoved: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.bytesMoved / self.seconds if self.seconds > 0 else 0.0


def result_from(vm: str, migration: str, ti_state: str | None, status: dict[str, Any] | None,
                skipped_reason: str | None = None) -> VMResult:
    """What became of one VM: its migrate task's state and its migration's status (``status.summary``; missing
    keys count 0)."""
    if skipped_reason is not None:
        return VMResult(vm, migration, "skipped", skipped_reason)
    status = status or {}
    summary = status.get("summary") if isinstance(status.get("summary"), dict) else {}
    moved, seconds = _number(summary.get("bytesMoved")), _number(summary.get("seconds"))
    if ti_state == "success":
        return VMResult(vm, migration, "done", "", int(moved), seconds)
    if ti_state == "skipped":
        return VMResult(vm, migration, "skipped", "its window ended before it could start")
    reason = status.get("message") or f"its migrate task ended {ti_state or 'without running'}"
    return VMResult(vm, migration, "failed", str(reason)[:300], int(moved), seconds)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def summarize(wave: str, results: Iterable[VMResult], seconds: float, *, started: bool = True,
              reason: str = "") -> dict[str, Any]:
    """A wave's summary: counts, bytes, the wave's wall time and its rate (bytes moved over that time)."""
    rows = list(results)
    moved = sum(r.bytesMoved for r in rows)
    seconds = max(float(seconds), 0.0)
    return {
        "wave": wave, "started": started, "reason": reason,
        "done": sum(r.result == "done" for r in rows),
        "failed": sum(r.result == "failed" for r in rows),
        "skipped": sum(r.result == "skipped" for r in rows),
        "bytesMoved": moved, "seconds": round(seconds, 3),
        "rateBytesPerSecond": round(moved / seconds, 1) if seconds > 0 else 0.0,
        "vms": [{"vm": r.vm, "migration": r.migration, "result": r.result, "reason": r.reason,
                 "bytesMoved": r.bytesMoved, "seconds": round(r.seconds, 3),
                 "rateBytesPerSecond": round(r.rate, 1)} for r in rows],
    }


def table(summary: dict[str, Any]) -> str:
    """The summary as a text table (the task log), sizes in IEC units."""
    from include.status import human_bytes

    rows = [("VM", "MIGRATION", "RESULT", "MOVED", "TIME", "RATE", "REASON")]
    for v in summary["vms"]:
        rows.append((v["vm"], v["migration"], v["result"], human_bytes(v["bytesMoved"]), f"{v['seconds']:.1f}s",
                     f"{human_bytes(v['rateBytesPerSecond'])}/s", v["reason"]))
    widths = [max(len(str(row[c])) for row in rows) for c in range(len(rows[0]) - 1)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + str(row[-1])
             for row in rows]
    lines.append(f"wave {summary['wave']}: {summary['done']} done, {summary['failed']} failed, "
                 f"{summary['skipped']} skipped; {human_bytes(summary['bytesMoved'])} in {summary['seconds']:.1f}s "
                 f"({human_bytes(summary['rateBytesPerSecond'])}/s)" + (f"; {summary['reason']}"
                                                                       if summary.get("reason") else ""))
    return "\n".join(line.rstrip() for line in lines)


# -- leases -------------------------------------------------------------------------------------------------------
LEASE_SCOPE = "vmwave-lease"
#: the run-state lock every lease change is made under (one for all resources: a change reads several slots)
_LOCK = ("vmmigration-waves", "leases", "lease-table")


@dataclass(frozen=True)
class Held:
    """The slots one holder has: ``{resource: claim key}``, and the token that proves they are its own."""

    holder: str
    token: str
    keys: dict[str, str]


class Leases:
    """Per-resource concurrency limits across every worker and process, in the run state (see the module doc).

    Of a resource with limit L there are L slots, ``vmwave-lease/<hash of the resource>.<i>`` for i < L, each a
    claim. :meth:`acquire` takes one free slot of every resource asked for, in one step under the run state's
    lock, or none. A slot is free when nobody claims it, when its holder's lease expired (``until`` passed: the
    holder stopped renewing), or when it is the caller's own (the same ``holder``: a retry of the same task). So
    at any instant a resource has at most L live holders among slots below L, whoever asks; when two waves give
    one resource different limits, each admits a migration only while its own slots have room, so at most the
    larger limit run at once.
    """

    def __init__(self, state: Any, *, ttl: float = 300.0) -> None:
        self.state = state
        self.ttl = float(ttl)

    @staticmethod
    def slot_key(resource: str, slot: int) -> str:
        return f"{LEASE_SCOPE}/{hashlib.sha256(resource.encode()).hexdigest()[:24]}.{slot}"

    def _locked(self) -> Any:
        return self.state.lock(*_LOCK)

    def try_acquire(self, holder: str, demands: dict[str, int], *, what: str = "",
                    now: float | None = None) -> Held | None:
        """Take one slot of each resource of ``demands`` (``{resource: limit}``), all or none; None when one of
        them has no free slot."""
        token = uuid.uuid4().hex
        with self._locked():
            now = time.time() if now is None else now
            chosen: dict[str, str] = {}
            for resource, limit in sorted(demands.items()):
                slot = self._free_slot(resource, limit, holder, now)
                if slot is None:
                    return None
                chosen[resource] = slot
            body = {"holder": holder, "token": token, "what": what, "host": socket.gethostname(),
                    "pid": os.getpid(), "until": now + self.ttl}
            for resource, key in chosen.items():
                if self.state.claim(key, {**body, "resource": resource}) is not None:
                    self.state.replace_claim(key, {**body, "resource": resource})  # expired, or our own earlier
        return Held(holder, token, chosen)

    def _free_slot(self, resource: str, limit: int, holder: str, now: float) -> str | None:
        free = None
        for slot in range(limit):
            key = self.slot_key(resource, slot)
            held = self.state.claim_holder(key)
            if held is not None and held.get("holder") == holder:
                return key  # our own (an earlier try of the same task): take it again
            if free is None and (held is None or float(held.get("until") or 0) < now):
                free = key
        return free

    def acquire(self, holder: str, demands: dict[str, int], *, what: str = "", deadline: float | None = None,
                poll: float = 1.0) -> Held | None:
        """:meth:`try_acquire` until it succeeds; None when ``deadline`` (a ``time.time()``) passes first."""
        import random

        while True:
            held = self.try_acquire(holder, demands, what=what)
            if held is not None:
                return held
            if deadline is not None and time.time() >= deadline:
                return None
            time.sleep(poll * (0.5 + random.random()))

    def renew(self, held: Held) -> list[str]:
        """Push ``until`` of every slot still ours a time to live further; the resources no longer ours."""
        lost = []
        with self._locked():
            now = time.time()
            for resource, key in held.keys.items():
                body = self.state.claim_holder(key)
                if body is None or body.get("token") != held.token:
                    lost.append(resource)
                    continue
                self.state.replace_claim(key, {**body, "until": now + self.ttl})
        return lost

    def release(self, held: Held) -> None:
        """Give up every slot still ours (one another holder took over after expiry is left alone)."""
        with self._locked():
            for key in held.keys.values():
                body = self.state.claim_holder(key)
                if body is not None and body.get("token") == held.token:
                    self.state.drop_claim(key)

    def holders(self, resource: str, limit: int) -> list[dict[str, Any]]:
        """The live holders of ``resource``'s slots below ``limit`` (for a log line, and the tests)."""
        now = time.time()
        out = []
        for slot in range(limit):
            body = self.state.claim_holder(self.slot_key(resource, slot))
            if body is not None and float(body.get("until") or 0) >= now:
                out.append(body)
        return out


def describe(demands: dict[str, int]) -> str:
    return ", ".join(f"{res} (limit {limit})" for res, limit in sorted(demands.items())) or "none"


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def iter_vms(plan: WavePlan) -> Iterator[tuple[Wave, WaveVM]]:
    for wave in plan.waves:
        for vm in wave.vms:
            yield wave, vm


# -- what the wave's tasks do (wrapped by dags/vmmigration_waves.py) ----------------------------------------------
def gate(previous: dict[str, Any] | None, previous_wave: Wave | None) -> str | None:
    """Why a wave must not start after ``previous_wave`` (its summary ``previous``); None when it may."""
    if previous_wave is None:
        return None
    if previous is None or not previous.get("started", False):
        return f"wave {previous_wave.name} before it did not run"
    if previous.get("failed") and previous_wave.onFailure == "stop":
        return (f"wave {previous_wave.name} had {previous['failed']} failed migration(s) and its onFailure is stop")
    return None


def window_state(wave: Wave, now: datetime) -> dict[str, Any]:
    """``{"open": bool, "opens", "closes", "ended": bool}`` of the wave's window at ``now`` (times RFC 3339)."""
    if wave.window is None:
        return {"open": True, "opens": None, "closes": None, "ended": False}
    opens, closes = wave.window.bounds(now)
    ended = closes is not None and now >= closes
    return {"open": (opens is None or now >= opens) and not ended, "ended": ended,
            "opens": opens.isoformat() if opens else None, "closes": closes.isoformat() if closes else None}


def prepare_wave(store: Any, plan: WavePlan, wave: Wave, *, via: str, closes: str | None,
                 now: datetime | None = None, by: str | None = None) -> dict[str, Any]:
    """Submit each VM's VMMigration (``include.submit.submit_to_store``) and say what the wave launches.

    A VM whose migration is Ready is skipped (a re-run of the wave moves nothing twice); past the window's end
    (``closes``) nothing is submitted and every VM left is skipped naming it. A VMMigration the store refuses
    (a reference that does not resolve, a name taken) fails, naming its fields.

    :return: ``{"launch": [kwargs of the migrate task], "skipped": [{vm, migration, reason}], "refused": [...],
        "startedAt": ...}``
    """
    from include.inventory import BundleInventory, resolve
    from include.spec import parse_vmmigration
    from include.submit import submit_to_store

    now = now or datetime.now(UTC)
    end = parse_time(closes) if closes else None
    out: dict[str, Any] = {"launch": [], "skipped": [], "refused": [], "startedAt": now.isoformat()}
    for j, vm in enumerate(wave.vms):
        doc = plan.migration_document(wave, vm)
        name = doc["metadata"]["name"]
        if end is not None and datetime.now(UTC) >= end:
            out["skipped"].append({"vm": vm.name, "migration": name,
                                   "reason": f"the window ended at {end.isoformat()} before it started"})
            continue
        try:
            # the plan is the submitter: its next runs may replace what its earlier ones submitted
            done = submit_to_store(store, doc, via=via, by=by or f"plan:{plan.namespace}/{plan.name}")
            resolved = resolve(parse_vmmigration(doc), BundleInventory(store.index().objects))
        except SpecValidationError as err:
            where = f"spec.waves[{wave.index}].vms[{j}]"
            out["refused"].append({"vm": vm.name, "migration": name,
                                   "reason": "; ".join(str(_remap(e, vm.overrides, where)) for e in err.errors)})
            continue
        if done.phase == "Ready":
            out["skipped"].append({"vm": vm.name, "migration": name, "reason": "already Ready"})
            continue
        src, tgt = resolved.source.provider, resolved.target
        demands = lease_demands(wave.limits, f"{src.namespace}/{src.name}", f"{tgt.namespace}/{tgt.name}",
                                storage_key(resolved.migration.spec.storage))
        out["launch"].append({"namespace": done.namespace, "migration_name": done.name, "leases": demands,
                              "not_after": closes})
    return out


def wave_result(plan: WavePlan, wave: Wave, prepared: dict[str, Any] | None, ti_states: dict[str, str | None],
                statuses: dict[str, dict[str, Any] | None], *, reason: str = "",
                now: datetime | None = None) -> dict[str, Any]:
    """The wave's summary from what ``prepare`` returned, each launched migration's migrate-task state (by map
    index, ``ti_states[str(i)]``) and its status (by migration name)."""
    now = now or datetime.now(UTC)
    if prepared is None:
        return summarize(wave.name, [], 0.0, started=False, reason=reason or "it did not start")
    rows = [result_from(s["vm"], s["migration"], None, None, s["reason"]) for s in prepared.get("skipped", [])]
    rows += [VMResult(s["vm"], s["migration"], "failed", f"refused: {s['reason']}")
             for s in prepared.get("refused", [])]
    for i, item in enumerate(prepared.get("launch", [])):
        name = item["migration_name"]
        vm = next((v.name for v in wave.vms if plan.migration_name(v) == name), name)
        rows.append(result_from(vm, name, ti_states.get(str(i)), statuses.get(name)))
    order = {v.name: n for n, v in enumerate(wave.vms)}
    rows.sort(key=lambda r: order.get(r.vm, len(order)))
    started = parse_time(prepared["startedAt"])
    return summarize(wave.name, rows, (now - started).total_seconds(), reason=reason)
