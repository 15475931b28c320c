"""The official Proxmox VE API schema (``apidata.js``, the file the PVE API viewer is built from) as a
request validator: a path and method that exist, every parameter known, typed and within its limits, the
required ones present. Errors are what a real node answers: HTTP 400 ``Parameter verification failed.``
with ``{"errors": {param: message}}``, 501 for an unknown method or path.

Property strings (``scsi0: local-lvm:vm-100-disk-0,size=32G``) are parsed with their ``format`` objects,
default key included. Named formats the suite uses (``pve-vmid``, ``pve-node``, ``pve-storage-id``,
``pve-configid``, ``pve-volume-id``, ``mac-addr``...) are checked; others are accepted as strings.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[3]


def schema_file() -> Path:
    """``$PVE_APIDATA``, else ``../shared/pve-api/apidata.js`` beside the project."""
    env = os.environ.get("PVE_APIDATA")
    return Path(env) if env else ROOT.parent / "shared" / "pve-api" / "apidata.js"


@lru_cache(maxsize=1)
def endpoints() -> dict[str, dict[str, Any]]:
    """path -> its ``info`` (method -> definition)."""
    text = schema_file().read_text()
    data = json.loads(text[text.index("["):text.rindex("]") + 1])
    out: dict[str, dict[str, Any]] = {}

    def walk(nodes: list[dict[str, Any]]) -> None:
        for node in nodes:
            out[node["path"]] = node.get("info") or {}
            walk(node.get("children") or [])

    walk(data)
    return out


@dataclass
class Rejection(Exception):
    """What a node answers to a request it refuses."""

    status: int
    message: str
    errors: dict[str, str]

    def body(self) -> dict[str, Any]:
        return {"data": None, "errors": self.errors, "message": self.message} if self.errors else \
            {"data": None, "message": self.message}


def match(path: str) -> tuple[str, dict[str, str]] | None:
    """(schema path, path parameters) of a request path such as ``/nodes/pve1/qemu/100/config``.

    Segments are percent-decoded after splitting, so ``content/local%3Aimport%2Fdisk.qcow2`` names one volume.
    A trailing ``{volume}`` also takes the rest of an unencoded path (``content/local:import/disk.qcow2``), as
    clients such as proxmoxer send it and a node accepts it.
    """
    parts = [unquote(p) for p in path.split("?", 1)[0].strip("/").split("/") if p]
    greedy: tuple[str, dict[str, str]] | None = None
    for template in endpoints():
        tparts = [p for p in template.strip("/").split("/") if p]
        if len(tparts) > len(parts):
            continue
        if len(tparts) < len(parts) and tparts[-1] != "{volume}":
            continue
        found: dict[str, str] = {}
        for t, p in zip(tparts, parts):
            if t.startswith("{") and t.endswith("}"):
                found[t[1:-1]] = p
            elif t != p:
                break
        else:
            if len(tparts) == len(parts):
                return template, found
            found["volume"] = "/".join(parts[len(tparts) - 1:])
            greedy = greedy or (template, found)
    return greedy


def definition(method: str, path: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(schema path, the method's definition, path parameters), or a Rejection like a node's."""
    found = match(path)
    if found is None:
        raise Rejection(501, f"Method '{method} /api2/json{path}' not implemented", {})
    template, params = found
    info = endpoints()[template].get(method)
    if info is None:
        raise Rejection(501, f"Method '{method} /api2/json{path}' not implemented", {})
    return template, info, params


def validate(method: str, path: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check one request: raises Rejection as a node would; returns (schema path, all parameters, path ones
    included, as given)."""
    template, info, in_path = definition(method, path)
    merged = {**{k: v for k, v in params.items()}, **in_path}
    props = (info.get("parameters") or {}).get("properties") or {}
    extra_ok = (info.get("parameters") or {}).get("additionalProperties", 0)
    errors: dict[str, str] = {}
    for name, value in merged.items():
        spec = _property(props, name)
        if spec is None:
            if not extra_ok:
                errors[name] = "property is not defined in schema and the schema does not allow additional properties"
            continue
        why = check_value(spec, value)
        if why:
            errors[name] = why
    for name, spec in props.items():
        if "[n]" in name or spec.get("optional"):
            continue
        if name not in merged:
            errors[name] = "property is missing and it is not optional"
    if errors:
        raise Rejection(400, "Parameter verification failed.", errors)
    return template, merged


def _property(props: dict[str, Any], name: str) -> dict[str, Any] | None:
    if name in props:
        return props[name]
    m = re.fullmatch(r"([a-z_-]+?)(\d+)", name)
    if m and f"{m.group(1)}[n]" in props:
        spec = props[f"{m.group(1)}[n]"]
        bound = re.search(r"n is 0 to (\d+)", spec.get("description", ""))
        if bound and int(m.group(2)) > int(bound.group(1)):
            return None
        return spec
    return None


_BOOL = {"1", "0", "true", "false", "yes", "no", "on", "off"}
_FORMATS = {
    "pve-vmid": r"[1-9][0-9]{2,8}",
    "pve-node": r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?",
    "pve-storage-id": r"[a-z][a-z0-9\-_.]*[a-z0-9]",
    "pve-configid": r"[a-z][a-z0-9_]+",
    "pve-volume-id": r"[a-z][a-z0-9\-_.]*[a-z0-9]:.+",
    "mac-addr": r"[a-fA-F0-9]{2}(:[a-fA-F0-9]{2}){5}",
    "pve-bridge-id": r"[-_.\w\d]+",
    "pve-storage-content": r"images|rootdir|vztmpl|backup|iso|snippets|import",
}


def check_value(spec: dict[str, Any], value: Any) -> str | None:
    """Why ``value`` (as sent on the wire: a string, or a list for an array) fails ``spec``; None if it passes."""
    kind = spec.get("type", "string")
    text = value if isinstance(value, str) else (str(int(value)) if isinstance(value, bool) else str(value))
    if kind == "array":
        return None
    if kind == "boolean":
        return None if text.lower() in _BOOL else f"type check ('boolean') failed - got '{text}'"
    if kind == "integer":
        if not re.fullmatch(r"[+-]?\d+", text):
            return f"type check ('integer') failed - got '{text}'"
        number = int(text)
    elif kind == "number":
        try:
            number = float(text)
        except ValueError:
            return f"type check ('number') failed - got '{text}'"
    else:
        number = None
    if number is not None:
        if "minimum" in spec and number < spec["minimum"]:
            return f"value must have a minimum value of {spec['minimum']}"
        if "maximum" in spec and number > spec["maximum"]:
            return f"value must have a maximum value of {spec['maximum']}"
        return None
    if "enum" in spec and text not in spec["enum"]:
        return f"value '{text}' does not have a value in the enumeration '{', '.join(spec['enum'])}'"
    if "maxLength" in spec and len(text) > spec["maxLength"]:
        return f"value may only be {spec['maxLength']} characters long"
    if "minLength" in spec and len(text) < spec["minLength"]:
        return f"value must be at least {spec['minLength']} characters long"
    if spec.get("pattern") and not re.fullmatch(spec["pattern"], text):
        return "value does not match the regex pattern"
    fmt = spec.get("format")
    if isinstance(fmt, str):
        pattern = _FORMATS.get(fmt)
        if pattern and not re.fullmatch(pattern, text):
            return f"value does not look like a valid {fmt.removeprefix('pve-')}"
    elif isinstance(fmt, dict):
        return check_property_string(fmt, text)
    return None


def check_property_string(fmt: dict[str, Any], text: str) -> str | None:
    """A ``key=value,...`` property string against its format (one key may be given without its name).

    Aliases resolve to their target (``volume=`` is ``file=``); a key alias such as ``virtio=MAC`` in a ``net[n]``
    sets two keys: ``model=virtio`` and ``macaddr=MAC``. A key given twice is an error, as on a node.
    """
    default_key = next((k for k, v in fmt.items() if v.get("default_key")), None)
    seen: set[str] = set()
    for part in [p for p in text.split(",") if p]:
        key, sep, value = part.partition("=")
        if not sep:
            if default_key is None or default_key in seen:
                return f"format error - value without key, but schema does not define a default key ('{part}')"
            key, value = default_key, part
        spec = fmt.get(key)
        if spec is None:
            return f"format error - property '{key}' is not defined in schema"
        target = key
        if spec.get("alias"):
            target = spec["alias"]
            if spec.get("keyAlias"):
                model = spec["keyAlias"]
                if model in seen:
                    return f"format error - duplicate key in comma-separated list property: {model}"
                why = check_value(fmt.get(model) or {}, key)
                if why:
                    return f"format error - {model}: {why}"
                seen.add(model)
            spec = fmt.get(target) or {}
        if target in seen:
            return f"format error - duplicate key in comma-separated list property: {target}"
        why = check_value(spec, value)
        if why:
            return f"format error - {target}: {why}"
        seen.add(target)
    for key, spec in fmt.items():
        if not spec.get("optional") and key not in seen and not spec.get("alias"):
            return f"format error - {key}: property is missing and it is not optional"
    return None
