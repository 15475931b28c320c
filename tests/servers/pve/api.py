"""The Proxmox VE API server process: ``python -m tests.servers.pve.api WORKDIR`` (started by
tests/servers/pve/server.py, which writes ``WORKDIR/server.json`` first).

HTTPS (http.server.ThreadingHTTPServer, the TLS handshake done in each connection's thread) on 127.0.0.1 with
the base path ``/api2/json``. A request goes through what a node does, in a node's order:

1. the method and path must exist in the official schema (``schema.definition``) -> else 501;
2. authentication: an API token (``Authorization: PVEAPIToken=root@pam!migrate=<secret>``) or a ticket cookie
   (``PVEAuthCookie``) with a ``CSRFPreventionToken`` header on POST/PUT/DELETE -> else 401 with
   ``{"data": null}``; ``POST /access/ticket`` is the only call without;
3. parameters (query string for GET/DELETE, form body for POST/PUT: urlencoded, JSON, or multipart for the
   upload, whose file is streamed to disk) checked by ``schema.validate`` -> else 400 with ``{"errors": ...}``;
4. the handler, on the state of tests/servers/pve/state.py; a failure is a 500 with the node's message.

Every request is appended to the JSON-lines request log (method, path, parameters; passwords and the uploaded
file's bytes never) for tests/servers/pve/test_schema_replay.py. A request with the header
``X-Pve-Test-Expect: reject`` is one a test sends to provoke a rejection; the log says so and the replay checks
that it really is rejected instead of flagging it.

Long operations run as tasks (threads) with PVE's UPIDs, a status that goes from ``running`` to ``stopped`` with
``exitstatus`` ``OK`` or the error, and a task log ending in ``TASK OK`` / ``TASK ERROR: ...``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import http.server
import itertools
import json
import os
import re
import secrets
import shutil
import ssl
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.servers.pve import schema
from tests.servers.pve.state import (
    DISK_KEY,
    FORMATS,
    IMPORT_EXT,
    NEW_DISK,
    UNUSED_KEY,
    PveError,
    Store,
    format_size,
    guest_write,
    image_info,
    join_prop,
    now,
    parse_prop,
    qemu_img,
    remove_volume_file,
    snap_file,
    volumes_of,
)

BASE = "/api2/json"
#: the volume group the LVM-thin storage answers with (its volumes are files; see commands.py lvchange/lvs)
LVM_VG = "pve"
NIC_MODELS = ("virtio", "e1000", "e1000e", "vmxnet3", "rtl8139", "ne2k_pci", "pcnet", "i82551", "i82557b",
              "i82559er", "ne2k_isa")


def _with_mac(key: str, value: Any) -> Any:
    """A NIC as a node writes it: ``model=MAC`` first, a MAC made for it (PVE's BC:24:11 prefix) when none is given
    (``virtio,bridge=vmbr0`` and ``model=virtio,...`` alike)."""
    if not re.fullmatch(r"net\d+", key):
        return value
    parts = str(value).split(",")
    head, rest = parts[0], parts[1:]
    model, _, mac = head.partition("=")
    if model == "model":  # model=virtio[,macaddr=...]
        model, mac = mac, ""
    if model not in NIC_MODELS:
        return value
    given = next((p.split("=", 1)[1] for p in rest if p.startswith("macaddr=")), None)
    rest = [p for p in rest if not p.startswith("macaddr=")]
    mac = mac or given or "BC:24:11:" + ":".join(f"{b:02X}" for b in os.urandom(3))
    return ",".join([f"{model}={mac.upper()}", *rest])
TICKET_LIFETIME = 7200
SECRET_PARAMS = ("password", "new-password", "cipassword", "otp", "tfa-challenge")
VERSION = {"version": "9.1.1", "release": "9.1", "repoid": "42fb6f6ba3e4f3f4"}
_NOT_CONFIG = {"node", "vmid", "start", "storage", "archive", "force", "unique", "pool", "live-restore", "bwlimit",
               "import-working-storage", "digest", "delete", "revert", "skiplock", "background_delay"}


class Unauthorized(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# -- tasks ----------------------------------------------------------------------------------------------------
class Tasks:
    """Worker tasks: a UPID each, status in the state file, log lines in ``WORKDIR/tasks/<n>.log``."""

    def __init__(self, store: Store):
        self.store = store
        self.folder = store.workdir / "tasks"
        self.folder.mkdir(exist_ok=True)
        self.pids = itertools.count(0x1A00 + secrets.randbelow(0x4000))

    def start(self, node: str, kind: str, ident: str | int, user: str,
              work: Callable[[Callable[[str], None]], None]) -> str:
        pid = next(self.pids)
        started = now()
        upid = f"UPID:{node}:{pid:08X}:{(pid * 7919) & 0xFFFFFFFF:08X}:{started:08X}:{kind}:{ident}:{user}:"
        log_file = self.folder / f"{pid:08X}.log"
        with self.store.transaction() as state:
            state["tasks"][upid] = {"upid": upid, "node": node, "pid": pid, "pstart": (pid * 7919) & 0xFFFFFFFF,
                                    "starttime": started, "type": kind, "id": str(ident), "user": user,
                                    "status": "running", "log": str(log_file)}
        log_file.write_text("")

        def log(line: str) -> None:
            with open(log_file, "a") as f:
                f.write(line.rstrip("\n") + "\n")

        def run() -> None:
            exitstatus = "OK"
            try:
                work(log)
                log("TASK OK")
            except PveError as exc:
                exitstatus = exc.message
                log(f"TASK ERROR: {exc.message}")
            except Exception as exc:  # noqa: BLE001 - a task reports whatever went wrong
                exitstatus = f"{type(exc).__name__}: {exc}"
                log(f"TASK ERROR: {exitstatus}")
                traceback.print_exc()
            with self.store.transaction() as state:
                task = state["tasks"][upid]
                task.update(status="stopped", exitstatus=exitstatus, endtime=now())

        threading.Thread(target=run, name=f"task-{kind}-{ident}", daemon=True).start()
        return upid

    def get(self, node: str, upid: str) -> dict[str, Any]:
        task = self.store.read()["tasks"].get(upid)
        if task is None or task["node"] != node:
            raise PveError(f"no such task '{upid}'" if upid.startswith("UPID:") else f"unable to parse worker upid "
                           f"'{upid}'")
        return task


# -- the API --------------------------------------------------------------------------------------------------
class Api:
    """Handlers for the endpoints, by (method, schema path)."""

    def __init__(self, workdir: Path, config: dict[str, Any]):
        self.store = Store(workdir)
        self.config = config
        self.tasks = Tasks(self.store)
        self.key = secrets.token_bytes(32)  # signs tickets and CSRF tokens; new per server process
        self.routes: dict[tuple[str, str], Callable[[dict[str, Any], str], Any]] = {}
        for name in dir(self):
            fn = getattr(self, name)
            route = getattr(fn, "route", None)
            if route:
                self.routes[route] = fn

    # auth
    def _sign(self, text: str) -> str:
        return base64.b64encode(hmac.new(self.key, text.encode(), hashlib.sha256).digest()).decode().rstrip("=")

    def ticket(self, user: str) -> tuple[str, str]:
        stamp = f"{now():08X}"
        plain = f"PVE:{user}:{stamp}"
        return f"{plain}::{self._sign(plain)}", f"{stamp}:{self._sign('csrf:' + user + ':' + stamp)}"

    def verify_ticket(self, ticket: str) -> str | None:
        m = re.fullmatch(r"(PVE:([^:]+):([0-9A-F]{8}))::(.+)", ticket)
        if not m or not hmac.compare_digest(self._sign(m.group(1)), m.group(4)):
            return None
        if now() - int(m.group(3), 16) > TICKET_LIFETIME:
            return None
        return m.group(2)

    def verify_csrf(self, user: str, token: str | None) -> bool:
        if not token or ":" not in token:
            return False
        stamp, sig = token.split(":", 1)
        return hmac.compare_digest(self._sign("csrf:" + user + ":" + stamp), sig)

    def authenticate(self, method: str, headers: Any) -> str:
        """The user (``root@pam`` or ``root@pam!migrate``) of a request, or Unauthorized as a node says it."""
        auth = headers.get("Authorization")
        if auth:
            m = re.fullmatch(r"PVEAPIToken=([^!=\s]+)!([^=\s]+)=(\S+)", auth.strip())
            if not m:
                raise Unauthorized("authentication failure")
            user, name, value = m.groups()
            ok = (user == self.config["user"] and name == self.config["token_name"]
                  and hmac.compare_digest(value.encode(), self.config["token_secret"].encode()))
            if not ok:
                raise Unauthorized("authentication failure")
            return f"{user}!{name}"
        cookies = {}
        for part in (headers.get("Cookie") or "").split(";"):
            k, _, v = part.strip().partition("=")
            cookies[k] = v
        ticket = cookies.get("PVEAuthCookie")
        if not ticket:
            raise Unauthorized("No ticket")
        from urllib.parse import unquote

        user = self.verify_ticket(unquote(ticket))
        if user is None:
            raise Unauthorized("permission denied - invalid PVE ticket")
        if method != "GET" and not self.verify_csrf(user, headers.get("CSRFPreventionToken")):
            raise Unauthorized("Permission denied - invalid csrf token")
        return user

    def dispatch(self, method: str, template: str, params: dict[str, Any], user: str) -> Any:
        fn = self.routes.get((method, template))
        if fn is None:
            raise PveError(f"Method '{method} {BASE}{template}' not implemented by the test server", 501)
        return fn(params, user)

    # helpers
    def _node(self, state: dict[str, Any], node: str) -> dict[str, Any]:
        found = state["nodes"].get(node)
        if found is None:
            raise PveError(f"hostname lookup '{node}' failed - failed to get address info for: {node}: "
                           "Name or service not known")
        return found

    @staticmethod
    def _typed(key: str, value: Any) -> Any:
        """A config value as a node returns it: integers and booleans as numbers, the rest as strings."""
        props = schema.endpoints()["/nodes/{node}/qemu"]["POST"]["parameters"]["properties"]
        spec = schema._property(props, key) or {}
        kind = spec.get("type")
        try:
            if kind == "integer":
                return int(value)
            if kind == "number":
                return float(value)
            if kind == "boolean":
                return 1 if str(value).lower() in ("1", "true", "yes", "on") else 0
        except ValueError:
            pass
        return str(value)

    def _config_out(self, config: dict[str, Any]) -> dict[str, Any]:
        out = dict(config)
        out["digest"] = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()
        return out

    def _disk_value(self, node: str, vmid: int, key: str, value: str, log: Callable[[str], None],
                    created: list[str]) -> str:
        """A disk parameter made real: ``STORAGE:SIZE`` allocates, ``STORAGE:0,import-from=SRC`` imports; the
        config value (``local-lvm:vm-100-disk-0,size=4G``) returned. New volumes are added to ``created``."""
        props = parse_prop(value)
        file = props.get("file", "")
        source = props.pop("import-from", None)
        fmt = props.pop("format", None)
        if fmt is not None and fmt not in FORMATS:
            raise PveError(f"unsupported format '{fmt}'")
        state = self.store.read()
        new = NEW_DISK.fullmatch(file)
        if source is not None:
            if not new or float(new.group(2)) != 0:
                raise PveError(f"{key}: 'import-from' requires special syntax - use <storage ID>:0,import-from="
                               "<source>")
            sid = new.group(1)
            self.store.storage(state, sid)
            path = self.store.source_path(state, source)
            log(f"importing disk '{source}' to VM {vmid} ...")
            volid, size = self.store.import_image(vmid, path, sid, fmt, log)
            created.append(volid)
        elif new:
            sid, gib = new.group(1), float(new.group(2))
            self.store.storage(state, sid)
            size = int(gib * 1024 ** 3)
            volid = self.store.new_image(vmid, sid, fmt or "raw", size)
            created.append(volid)
        else:
            if props.get("media") == "cdrom" or file in ("none", "cdrom") or file.startswith("/"):
                return value
            path = self.store.volume_path(state, file)
            if not path.is_file():
                raise PveError(f"volume '{file}' does not exist")
            if "size" not in props:
                props["size"] = format_size(image_info(path)[1])
            return join_prop(props)
        props["file"] = volid
        props.pop("size", None)
        props["size"] = format_size(size)
        final = join_prop(props)
        log(f"{key}: successfully created disk '{final}'")
        return final

    def _free_volumes(self, volids: list[str], log: Callable[[str], None] | None = None) -> None:
        state = self.store.read()
        for volid in volids:
            with contextlib.suppress(PveError):
                path = self.store.volume_path(state, volid)
                for sib in path.parent.glob(f"snap_{path.stem}_*"):
                    remove_volume_file(sib)
                remove_volume_file(path)
                if log:
                    log(f"Removed volume '{volid}'")

    def _apply_config(self, node: str, vmid: int, params: dict[str, Any], log: Callable[[str], None]) -> None:
        """Set and delete config keys as ``PUT``/``POST .../config`` do (disks allocated, replaced ones and
        deleted ones kept as ``unused<N>``; deleting an ``unused<N>`` destroys its volume)."""
        with self.store.transaction() as state:
            vm = self.store.vm(state, node, vmid)
            config = vm["config"]
            if "lock" in config and not params.get("skiplock"):
                raise PveError(f"VM is locked ({config['lock']})")
            digest = params.get("digest")
            if digest and digest != self._config_out(config)["digest"]:
                raise PveError("detected modified configuration - file changed by other user? Try again.")
        created: list[str] = []
        values: dict[str, Any] = {}
        try:
            for key, value in params.items():
                if key in _NOT_CONFIG:
                    continue
                values[key] = self._disk_value(node, vmid, key, str(value), log, created) \
                    if DISK_KEY.fullmatch(key) else _with_mac(key, self._typed(key, value))
        except Exception:
            self._free_volumes(created)
            raise
        destroy: list[str] = []
        with self.store.transaction() as state:
            config = self.store.vm(state, node, vmid)["config"]
            for key in [k for k in re.split(r"[,;\s]+", str(params.get("delete") or "")) if k]:
                old = config.pop(key, None)
                if old is None:
                    continue
                if UNUSED_KEY.fullmatch(key):
                    destroy.append(parse_prop(old)["file"])
                elif DISK_KEY.fullmatch(key) and volumes_of({key: old}):
                    config[self.store.next_unused(config)] = parse_prop(old)["file"]
            for key, value in values.items():
                if DISK_KEY.fullmatch(key):
                    volid = parse_prop(value).get("file")
                    for ukey in [k for k in config if UNUSED_KEY.fullmatch(k)]:
                        if parse_prop(config[ukey]).get("file") == volid:
                            del config[ukey]  # an unused disk attached again
                    old = config.get(key)
                    if old and volumes_of({key: old}) and parse_prop(old)["file"] != volid:
                        config[self.store.next_unused(config)] = parse_prop(old)["file"]
                config[key] = value
        self._free_volumes(destroy, log)

    # ---------------------------------------------------------------------------------------------------------
    def route(method: str, path: str):  # noqa: N805 - a decorator used in the class body
        def mark(fn):
            fn.route = (method, path)
            return fn

        return mark

    @route("POST", "/access/ticket")
    def create_ticket(self, p: dict[str, Any], _: str) -> Any:
        username = str(p["username"])
        if "@" not in username and p.get("realm"):
            username = f"{username}@{p['realm']}"
        password = str(p["password"])
        ok = username == self.config["user"] and (
            hmac.compare_digest(password.encode(), self.config["password"].encode())
            or self.verify_ticket(password) == username)
        if not ok:
            time.sleep(0.2)  # a node delays failed logins (by more)
            raise Unauthorized("authentication failure")
        ticket, csrf = self.ticket(username)
        return {"username": username, "ticket": ticket, "CSRFPreventionToken": csrf,
                "cap": {"vms": {"VM.Allocate": 1}, "storage": {"Datastore.Allocate": 1}}}

    def _version(self) -> dict[str, str]:
        version = str(self.store.read().get("version") or VERSION["version"])
        return dict(VERSION, version=version, release=".".join(version.split(".")[:2]))

    @route("GET", "/version")
    def version(self, p: dict[str, Any], _: str) -> Any:
        return dict(self._version(), console="html5")

    @route("GET", "/nodes/{node}/version")
    def node_version(self, p: dict[str, Any], _: str) -> Any:
        self._node(self.store.read(), p["node"])
        return self._version()

    @route("GET", "/nodes/{node}/time")
    def node_time(self, p: dict[str, Any], _: str) -> Any:
        self._node(self.store.read(), p["node"])
        now = int(time.time())
        return {"time": now, "localtime": now, "timezone": "UTC"}

    @route("GET", "/nodes")
    def nodes(self, p: dict[str, Any], _: str) -> Any:
        state = self.store.read()
        return [{"node": n, "status": "online", "type": "node", "id": f"node/{n}", "cpu": 0.02, "maxcpu": 8,
                 "mem": 2 * 1024 ** 3, "maxmem": 32 * 1024 ** 3, "uptime": 86400, "level": "",
                 "ssl_fingerprint": self.config.get("fingerprint", "")} for n in state["nodes"]]

    @route("GET", "/cluster/nextid")
    def nextid(self, p: dict[str, Any], _: str) -> Any:
        used = {int(v) for v in self.store.read()["vms"]}
        if p.get("vmid") is not None:
            vmid = int(p["vmid"])
            if vmid in used:
                raise PveError("Parameter verification failed.", 400, {"vmid": f"VM {vmid} already exists"})
            return str(vmid)
        vmid = 100
        while vmid in used:
            vmid += 1
        with self.store.transaction() as state:
            if state.get("race_nextid", 0) > 0:
                # another client asked at the same instant, got the same VMID and created its VM first
                state["race_nextid"] -= 1
                state["vms"][str(vmid)] = {"node": next(iter(state["nodes"])), "status": "stopped", "snapshots": {},
                                           "config": {"name": f"someone-else-{vmid}", "memory": "512", "cores": 1}}
        return str(vmid)

    @route("GET", "/cluster/resources")
    def resources(self, p: dict[str, Any], _: str) -> Any:
        state = self.store.read()
        kind = p.get("type")
        out: list[dict[str, Any]] = []
        if kind in (None, "vm"):
            for vmid, vm in sorted(state["vms"].items(), key=lambda kv: int(kv[0])):
                out.append(self._vm_summary(int(vmid), vm) | {"id": f"qemu/{vmid}", "type": "qemu",
                                                              "node": vm["node"], "template": 0})
        if kind in (None, "node"):
            out += [{"id": f"node/{n}", "type": "node", "node": n, "status": "online", "maxcpu": 8,
                     "maxmem": 32 * 1024 ** 3, "level": ""} for n in state["nodes"]]
        if kind in (None, "storage"):
            for n in state["nodes"]:
                for sid, spec in state["storages"].items():
                    usage = shutil.disk_usage(spec["path"])
                    out.append({"id": f"storage/{n}/{sid}", "type": "storage", "node": n, "storage": sid,
                                "status": "available", "content": spec["content"],
                                "plugintype": "lvmthin" if spec.get("naming") == "lvm" else "dir",
                                "shared": 0, "disk": usage.used, "maxdisk": usage.total})
        return out

    def _vm_summary(self, vmid: int, vm: dict[str, Any]) -> dict[str, Any]:
        config = vm["config"]
        memory = parse_prop(str(config.get("memory", 512)), "current").get("current", "512")
        maxdisk = 0
        for key, value in config.items():
            if DISK_KEY.fullmatch(key) and "size" in parse_prop(value) and parse_prop(value).get("media") != "cdrom":
                with contextlib.suppress(PveError):
                    from tests.servers.pve.state import parse_size

                    maxdisk = max(maxdisk, parse_size(parse_prop(value)["size"]))
                    break
        running = vm["status"] == "running"
        out = {"vmid": vmid, "name": config.get("name", f"VM {vmid}"), "status": vm["status"],
               "cpus": int(config.get("cores", 1)) * int(config.get("sockets", 1)), "maxmem": int(memory) * 1024 ** 2,
               "maxdisk": maxdisk, "mem": int(memory) * 1024 ** 2 // 4 if running else 0,
               "uptime": now() - vm["started"] if running else 0, "cpu": 0.01 if running else 0, "disk": 0,
               "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0}
        if running:
            out["pid"] = vm["pid"]
        if "lock" in config:
            out["lock"] = config["lock"]
        return out

    # VMs
    @route("GET", "/nodes/{node}/qemu")
    def qemu_list(self, p: dict[str, Any], _: str) -> Any:
        state = self.store.read()
        self._node(state, p["node"])
        return [self._vm_summary(int(vmid), vm) for vmid, vm in sorted(state["vms"].items())
                if vm["node"] == p["node"]]

    @route("POST", "/nodes/{node}/qemu")
    def qemu_create(self, p: dict[str, Any], user: str) -> Any:
        node, vmid = p["node"], int(p["vmid"])
        if p.get("archive"):
            raise PveError("restore from an archive is not supported by the test server", 501)
        with self.store.transaction() as state:
            self._node(state, node)
            if str(vmid) in state["vms"]:
                other = state["vms"][str(vmid)]["node"]
                raise PveError(f"unable to create VM {vmid} - VM {vmid} already exists on node '{other}'")
            for key, value in p.items():
                if DISK_KEY.fullmatch(key):
                    new = NEW_DISK.fullmatch(parse_prop(str(value)).get("file", ""))
                    if new:
                        self.store.storage(state, new.group(1))
            state["vms"][str(vmid)] = {"node": node, "status": "stopped", "snapshots": {},
                                       "config": {"lock": "create"}}

        def work(log: Callable[[str], None]) -> None:
            created: list[str] = []
            try:
                config: dict[str, Any] = {}
                for key, value in p.items():
                    if key in _NOT_CONFIG:
                        continue
                    config[key] = self._disk_value(node, vmid, key, str(value), log, created) \
                        if DISK_KEY.fullmatch(key) else _with_mac(key, self._typed(key, value))
                config.setdefault("smbios1", f"uuid={uuid.uuid4()}")
                config.setdefault("vmgenid", str(uuid.uuid4()))
                config.setdefault("meta", f"creation-qemu=9.2.0,ctime={now()}")
                with self.store.transaction() as state:
                    state["vms"][str(vmid)]["config"] = config
            except Exception as exc:
                self._free_volumes(created)
                with self.store.transaction() as state:
                    state["vms"].pop(str(vmid), None)
                message = exc.message if isinstance(exc, PveError) else str(exc)
                raise PveError(f"unable to create VM {vmid} - {message}") from exc
            if p.get("start") in (1, "1", True, "true"):
                self._start(node, vmid, log)

        return self.tasks.start(node, "qmcreate", vmid, user, work)

    @route("GET", "/nodes/{node}/qemu/{vmid}/config")
    def config_get(self, p: dict[str, Any], _: str) -> Any:
        state = self.store.read()
        vm = self.store.vm(state, p["node"], p["vmid"])
        if p.get("snapshot"):
            snap = vm["snapshots"].get(p["snapshot"])
            if snap is None:
                raise PveError(f"snapshot '{p['snapshot']}' does not exist")
            return self._config_out(snap["config"])
        return self._config_out(vm["config"])

    @route("PUT", "/nodes/{node}/qemu/{vmid}/config")
    def config_put(self, p: dict[str, Any], _: str) -> Any:
        self._apply_config(p["node"], int(p["vmid"]), p, lambda line: None)
        return None

    @route("PUT", "/nodes/{node}/qemu/{vmid}/resize")
    def resize(self, p: dict[str, Any], user: str) -> Any:
        node, vmid, key = p["node"], int(p["vmid"]), str(p["disk"])
        vm = self.store.vm(self.store.read(), node, vmid)
        if key not in vm["config"]:
            raise PveError(f"disk '{key}' does not exist")
        text = str(p["size"])
        found = re.fullmatch(r"(\+?)(\d+(?:\.\d+)?)([KMGT]?)", text)
        amount = int(float(found.group(2)) * 1024 ** " KMGT".index(found.group(3) or " "))

        def work(log: Callable[[str], None]) -> None:
            with self.store.transaction() as state:
                config = self.store.vm(state, node, vmid)["config"]
                prop = parse_prop(config[key])
                path = self.store.volume_path(state, prop["file"])
                fmt, size = image_info(path)
                new = size + amount if found.group(1) else amount
                if new < size:
                    raise PveError("shrinking disks is not supported")
                qemu_img("resize", "-q", "-f", fmt, str(path), str(new))
                prop["size"] = format_size(new)
                config[key] = join_prop(prop)
                log(f"Image resized to {format_size(new)}.")

        return self.tasks.start(node, "resize", vmid, user, work)

    @route("POST", "/nodes/{node}/qemu/{vmid}/config")
    def config_post(self, p: dict[str, Any], user: str) -> Any:
        self.store.vm(self.store.read(), p["node"], p["vmid"])
        return self.tasks.start(p["node"], "qmconfig", p["vmid"], user,
                                lambda log: self._apply_config(p["node"], int(p["vmid"]), p, log))

    @route("GET", "/nodes/{node}/qemu/{vmid}/status/current")
    def status_current(self, p: dict[str, Any], _: str) -> Any:
        vm = self.store.vm(self.store.read(), p["node"], p["vmid"])
        out = self._vm_summary(int(p["vmid"]), vm)
        out.update(qmpstatus=vm["status"], ha={"managed": 0}, agent=int(parse_prop(
            str(vm["config"].get("agent", 0)), "enabled").get("enabled", "0") in ("1", "true")))
        if vm["status"] == "running":
            out["running-machine"], out["running-qemu"] = "pc-i440fx-9.2+pve1", "9.2.0"
        return out

    def _start(self, node: str, vmid: int, log: Callable[[str], None]) -> None:
        with self.store.transaction() as state:
            vm = self.store.vm(state, node, vmid)
            if vm["status"] == "running":
                raise PveError(f"VM {vmid} already running")
            if "lock" in vm["config"]:
                raise PveError(f"VM is locked ({vm['config']['lock']})")
            for key, value in vm["config"].items():
                if re.fullmatch(r"net\d+", key):
                    bridge = parse_prop(value, "model").get("bridge")
                    if bridge and bridge not in state["nodes"][node]["bridges"]:
                        raise PveError(f"bridge '{bridge}' does not exist")
            for _key, volid in volumes_of(vm["config"], unused=False):
                if not self.store.volume_path(state, volid).is_file():
                    raise PveError(f"volume '{volid}' does not exist")
            vm.update(status="running", started=now(), pid=os.getpid() + vmid)

    @route("POST", "/nodes/{node}/qemu/{vmid}/status/start")
    def status_start(self, p: dict[str, Any], user: str) -> Any:
        self.store.vm(self.store.read(), p["node"], p["vmid"])
        return self.tasks.start(p["node"], "qmstart", p["vmid"], user,
                                lambda log: self._start(p["node"], int(p["vmid"]), log))

    @route("POST", "/nodes/{node}/qemu/{vmid}/status/stop")
    def status_stop(self, p: dict[str, Any], user: str) -> Any:
        self.store.vm(self.store.read(), p["node"], p["vmid"])

        def work(log: Callable[[str], None]) -> None:
            with self.store.transaction() as state:
                vm = self.store.vm(state, p["node"], p["vmid"])
                if "lock" in vm["config"] and not p.get("skiplock"):
                    raise PveError(f"VM is locked ({vm['config']['lock']})")
                vm["status"] = "stopped"

        return self.tasks.start(p["node"], "qmstop", p["vmid"], user, work)

    @route("DELETE", "/nodes/{node}/qemu/{vmid}")
    def qemu_destroy(self, p: dict[str, Any], user: str) -> Any:
        node, vmid = p["node"], int(p["vmid"])
        vm = self.store.vm(self.store.read(), node, vmid)
        if vm["status"] == "running":
            raise PveError(f"VM {vmid} is running - destroy failed")
        if "lock" in vm["config"] and not p.get("skiplock"):
            raise PveError(f"VM is locked ({vm['config']['lock']})")

        def work(log: Callable[[str], None]) -> None:
            with self.store.transaction() as state:
                vm = self.store.vm(state, node, vmid)
                volids = [v for _, v in volumes_of(vm["config"])]
                for snap in vm["snapshots"].values():
                    volids += [v for _, v in volumes_of(snap["config"])]
                if str(p.get("destroy-unreferenced-disks", "0")) in ("1", "true"):
                    for sid in state["storages"]:
                        volids += [v["volid"] for v in self.store.list_volumes(state, sid) if v.get("vmid") == vmid]
                del state["vms"][str(vmid)]
            self._free_volumes(list(dict.fromkeys(v for v in volids if self.store.volume_vmid(v) == vmid)), log)
            if p.get("purge"):
                log(f"purging VM {vmid} from related configurations..")

        return self.tasks.start(node, "qmdestroy", vmid, user, work)

    # snapshots
    @route("GET", "/nodes/{node}/qemu/{vmid}/snapshot")
    def snapshot_list(self, p: dict[str, Any], _: str) -> Any:
        vm = self.store.vm(self.store.read(), p["node"], p["vmid"])
        out = []
        for name, snap in vm["snapshots"].items():
            entry = {"name": name, "description": snap.get("description", ""), "snaptime": snap["snaptime"]}
            if snap.get("parent"):
                entry["parent"] = snap["parent"]
            if snap.get("vmstate"):
                entry["vmstate"] = 1
            out.append(entry)
        current = {"name": "current", "description": "You are here!", "running": int(vm["status"] == "running"),
                   "digest": self._config_out(vm["config"])["digest"]}
        if vm["config"].get("parent"):
            current["parent"] = vm["config"]["parent"]
        return [*out, current]

    def _snap_file(self, path: Path, name: str) -> Path:
        return snap_file(path, name)

    @route("POST", "/nodes/{node}/qemu/{vmid}/snapshot")
    def snapshot_create(self, p: dict[str, Any], user: str) -> Any:
        node, vmid, name = p["node"], int(p["vmid"]), p["snapname"]
        vm = self.store.vm(self.store.read(), node, vmid)
        if name == "current":
            raise PveError("Parameter verification failed.", 400, {"snapname": "invalid snapshot name 'current'"})
        if name in vm["snapshots"]:
            raise PveError(f"snapshot name '{name}' already used")

        def work(log: Callable[[str], None]) -> None:
            with self.store.transaction() as state:
                vm = self.store.vm(state, node, vmid)
                if "lock" in vm["config"]:
                    raise PveError(f"VM is locked ({vm['config']['lock']})")
                vm["config"]["lock"] = "snapshot"
                config = {k: v for k, v in vm["config"].items() if k != "lock"}
            done: list[tuple[Path, str]] = []
            try:
                state = self.store.read()
                for key, volid in volumes_of(config, unused=False):
                    path = self.store.volume_path(state, volid)
                    fmt = image_info(path)[0]
                    sid = self.store.split_volid(volid)[0]
                    log(f"snapshotting 'drive-{key}' ({volid})")
                    if fmt == "qcow2":
                        qemu_img("snapshot", "-c", name, str(path))
                    elif state["storages"][sid]["naming"] == "lvm":
                        shutil.copyfile(path, self._snap_file(path, name))  # an LVM-thin snapshot volume
                    else:
                        raise PveError(f"snapshot feature is not available for '{volid}' ({fmt} on a dir storage)")
                    done.append((path, fmt))
            except Exception:
                for path, fmt in done:
                    if fmt == "qcow2":
                        with contextlib.suppress(PveError):
                            qemu_img("snapshot", "-d", name, str(path))
                    else:
                        self._snap_file(path, name).unlink(missing_ok=True)
                with self.store.transaction() as state:
                    self.store.vm(state, node, vmid)["config"].pop("lock", None)
                raise
            with self.store.transaction() as state:
                vm = self.store.vm(state, node, vmid)
                vm["config"].pop("lock", None)
                snap = {"snaptime": now(), "description": str(p.get("description", "")), "config": config}
                if vm["config"].get("parent"):
                    snap["parent"] = vm["config"]["parent"]
                if p.get("vmstate") in (1, "1", "true") and vm["status"] == "running":
                    snap["vmstate"] = 1
                vm["snapshots"][name] = snap
                vm["config"]["parent"] = name
                writes = vm["status"] == "running" and vm.get("guest_writes")
            if writes:  # the guest of a running VM goes on writing after the snapshot (a test's knob)
                for path, fmt in done:
                    guest_write(path, fmt)

        return self.tasks.start(node, "qmsnapshot", vmid, user, work)

    @route("DELETE", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}")
    def snapshot_delete(self, p: dict[str, Any], user: str) -> Any:
        node, vmid, name = p["node"], int(p["vmid"]), p["snapname"]
        vm = self.store.vm(self.store.read(), node, vmid)
        if name not in vm["snapshots"]:
            raise PveError(f"snapshot '{name}' does not exist")

        def work(log: Callable[[str], None]) -> None:
            state = self.store.read()
            snap = self.store.vm(state, node, vmid)["snapshots"][name]
            for _key, volid in volumes_of(snap["config"], unused=False):
                with contextlib.suppress(PveError):
                    path = self.store.volume_path(state, volid)
                    if not path.is_file():
                        continue
                    if image_info(path)[0] == "qcow2":
                        qemu_img("snapshot", "-d", name, str(path))
                    else:
                        self._snap_file(path, name).unlink(missing_ok=True)
            with self.store.transaction() as state:
                vm = self.store.vm(state, node, vmid)
                gone = vm["snapshots"].pop(name)
                for other in vm["snapshots"].values():
                    if other.get("parent") == name:
                        other["parent"] = gone.get("parent")
                if vm["config"].get("parent") == name:
                    if gone.get("parent"):
                        vm["config"]["parent"] = gone["parent"]
                    else:
                        vm["config"].pop("parent")

        return self.tasks.start(node, "qmdelsnapshot", vmid, user, work)

    # tasks
    @route("GET", "/nodes/{node}/tasks/{upid}/status")
    def task_status(self, p: dict[str, Any], _: str) -> Any:
        task = self.tasks.get(p["node"], p["upid"])
        return {k: task[k] for k in ("upid", "node", "pid", "pstart", "starttime", "type", "id", "user", "status",
                                     "exitstatus") if k in task}

    @route("GET", "/nodes/{node}/tasks/{upid}/log")
    def task_log(self, p: dict[str, Any], _: str) -> Any:
        task = self.tasks.get(p["node"], p["upid"])
        lines = Path(task["log"]).read_text().splitlines()
        start, limit = int(p.get("start", 0)), int(p.get("limit", 50))
        out = [{"n": i + 1, "t": t} for i, t in enumerate(lines)][start:start + limit] if limit else []
        return out or [{"n": 0, "t": "no content"}]

    @route("GET", "/nodes/{node}/tasks")
    def task_list(self, p: dict[str, Any], _: str) -> Any:
        tasks = [t for t in self.store.read()["tasks"].values() if t["node"] == p["node"]]
        tasks.sort(key=lambda t: t["starttime"], reverse=True)
        out = [{k: v for k, v in t.items() if k != "log"} | ({"status": t["exitstatus"]} if "exitstatus" in t else {})
               for t in tasks]
        start, limit = int(p.get("start", 0)), int(p.get("limit", 50))
        return out[start:start + limit]

    # storage
    def _storage_entry(self, sid: str, spec: dict[str, Any], with_format: bool = False) -> dict[str, Any]:
        usage = shutil.disk_usage(spec["path"])
        out = {"storage": sid, "type": "lvmthin" if spec.get("naming") == "lvm" else "dir",
               "content": spec["content"], "active": 1, "enabled": 1,
               "shared": spec.get("shared", 0), "total": usage.total, "used": usage.used, "avail": usage.free,
               "used_fraction": usage.used / usage.total}
        if with_format:
            out["format"] = {"default": "raw",
                             "supported": ["raw"] if spec.get("naming") == "lvm" else list(FORMATS)}
        return out

    @route("GET", "/storage/{storage}")
    def storage_config(self, p: dict[str, Any], _: str) -> Any:
        """The storage's configuration (storage.cfg), as ``GET /storage/{storage}`` gives it."""
        spec = self.store.storage(self.store.read(), p["storage"])
        if spec.get("naming") == "lvm":
            return {"storage": p["storage"], "type": "lvmthin", "vgname": LVM_VG, "thinpool": "data",
                    "content": spec["content"], "digest": "0" * 40}
        return {"storage": p["storage"], "type": "dir", "path": spec["path"], "content": spec["content"],
                "digest": "0" * 40}

    @route("GET", "/nodes/{node}/storage")
    def storage_list(self, p: dict[str, Any], _: str) -> Any:
        state = self.store.read()
        self._node(state, p["node"])
        wanted = {c for c in str(p.get("content") or "").split(",") if c}
        out = []
        for sid, spec in state["storages"].items():
            if p.get("storage") and p["storage"] != sid:
                continue
            if wanted and not wanted & set(spec["content"].split(",")):
                continue
            out.append(self._storage_entry(sid, spec, str(p.get("format", "0")) in ("1", "true")))
        return out

    @route("GET", "/nodes/{node}/storage/{storage}/status")
    def storage_status(self, p: dict[str, Any], _: str) -> Any:
        state = self.store.read()
        self._node(state, p["node"])
        entry = self._storage_entry(p["storage"], self.store.storage(state, p["storage"]))
        entry.pop("storage")
        return entry

    @route("GET", "/nodes/{node}/storage/{storage}/content")
    def storage_content(self, p: dict[str, Any], _: str) -> Any:
        state = self.store.read()
        self._node(state, p["node"])
        out = self.store.list_volumes(state, p["storage"])
        if p.get("content"):
            out = [v for v in out if v["content"] == p["content"]]
        if p.get("vmid") is not None:
            out = [v for v in out if v.get("vmid") == int(p["vmid"])]
        return out

    @route("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}")
    def storage_delete(self, p: dict[str, Any], user: str) -> Any:
        state = self.store.read()
        volid = p["volume"] if ":" in p["volume"] else f"{p['storage']}:{p['volume']}"
        path = self.store.volume_path(state, volid)
        if not path.is_file():
            raise PveError(f"volume '{volid}' does not exist")
        for vmid, vm in state["vms"].items():
            if volid in [v for k, v in volumes_of(vm["config"]) if not UNUSED_KEY.fullmatch(k)]:
                raise PveError(f"unable to delete volume '{volid}' - volume is still in use by VM {vmid}")

        def work(log: Callable[[str], None]) -> None:
            remove_volume_file(path)
            log(f"Removed volume '{volid}'")

        return self.tasks.start(p["node"], "imgdel", volid, user, work)

    @route("POST", "/nodes/{node}/storage/{storage}/upload")
    def storage_upload(self, p: dict[str, Any], user: str) -> Any:
        state = self.store.read()
        self._node(state, p["node"])
        spec = self.store.storage(state, p["storage"])
        content, filename, tmp = p["content"], str(p["filename"]), p.get("tmpfilename")
        release = tuple(int(x) for x in self._version()["release"].split("."))
        if content == "import" and release < (8, 4):  # the content type came with 8.4
            Path(tmp or "/nonexistent").unlink(missing_ok=True)
            raise PveError("Parameter verification failed.", 400,
                           {"content": "value 'import' does not have a value in the enumeration 'iso, vztmpl'"})
        if not tmp or not Path(tmp).is_file():
            raise PveError("upload failed - no file data in the request", 400)
        if content not in spec["content"].split(","):
            Path(tmp).unlink(missing_ok=True)
            raise PveError("Parameter verification failed.", 400,
                           {"content": f"storage '{p['storage']}' does not support '{content}' content"})
        ok = IMPORT_EXT.fullmatch(filename) if content == "import" else \
            re.fullmatch(r"[\w.+\- ]+\.(iso|img)", filename, re.I) if content == "iso" else \
            re.fullmatch(r"[\w.+\- ]+\.tar\.(gz|xz|zst)", filename)
        if not ok:
            Path(tmp).unlink(missing_ok=True)
            raise PveError("Parameter verification failed.", 400, {"filename": "invalid filename or wrong extension"})
        folder = Path(spec["path"]) / ("import" if content == "import" else "template/iso" if content == "iso"
                                      else "template/cache")
        target = folder / filename

        def work(log: Callable[[str], None]) -> None:
            try:
                log(f"starting file import from: {tmp}")
                if p.get("checksum"):
                    algo = str(p.get("checksum-algorithm") or "sha256")
                    digest = hashlib.new(algo)
                    with open(tmp, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 20), b""):
                            digest.update(chunk)
                    log(f"calculating checksum of uploaded file '{filename}' ({algo})...")
                    if digest.hexdigest() != str(p["checksum"]).lower():
                        raise PveError(f"checksum mismatch: got '{digest.hexdigest()}' != expect '{p['checksum']}'")
                    log("checksum verified")
                log(f"target node: {p['node']}")
                log(f"target file: {target}")
                log(f"file size is: {Path(tmp).stat().st_size}")
                if target.exists():
                    raise PveError(f"refusing to override existing file '{target}'")
                folder.mkdir(parents=True, exist_ok=True)
                log(f"command: mv -- {tmp} {target}")
                os.replace(tmp, target)
                log("finished file import successfully")
            finally:
                Path(tmp).unlink(missing_ok=True)

        return self.tasks.start(p["node"], "imgcopy", "", user, work)

    @route("GET", "/nodes/{node}/network")
    def network(self, p: dict[str, Any], _: str) -> Any:
        state = self.store.read()
        node = self._node(state, p["node"])
        out: list[dict[str, Any]] = []
        if p.get("type") in (None, "eth", "any_local_bridge", "include_sdn") and p.get("type") != "any_local_bridge":
            out.append({"iface": "eno1", "type": "eth", "method": "manual", "families": ["inet"], "active": 1,
                        "exists": 1, "priority": 1})
        if p.get("type") in (None, "bridge", "any_bridge", "any_local_bridge", "include_sdn"):
            for i, bridge in enumerate(node["bridges"]):
                entry = {"iface": bridge, "type": "bridge", "method": "manual", "families": ["inet"], "active": 1,
                         "autostart": 1, "bridge_stp": "off", "bridge_fd": "0", "priority": 2 + i,
                         "bridge_ports": "eno1" if i == 0 else ""}
                out.append(entry)
        return out


# -- HTTP -----------------------------------------------------------------------------------------------------
class MultipartError(Exception):
    pass


def read_multipart(rfile: Any, length: int, boundary: bytes, tmpdir: Path) -> dict[str, Any]:
    """Stream a multipart/form-data body: form fields as parameters, the ``filename`` file part written to a
    ``pveupload-*`` file (its name becomes ``tmpfilename``, as a node does), never held in memory."""
    params: dict[str, Any] = {}
    seen: list[str] = []
    remaining = length
    buf = b""

    def fill() -> bool:
        nonlocal buf, remaining
        if remaining <= 0:
            return False
        chunk = rfile.read(min(1 << 20, remaining))
        if not chunk:
            raise MultipartError("unexpected end of the request body")
        remaining -= len(chunk)
        buf += chunk
        return True

    opener = b"--" + boundary
    while opener + b"\r\n" not in buf:
        if not fill():
            raise MultipartError("no multipart boundary found")
    buf = buf[buf.index(opener + b"\r\n") + len(opener) + 2:]
    delim = b"\r\n--" + boundary
    while True:
        while b"\r\n\r\n" not in buf:
            if not fill():
                raise MultipartError("incomplete part headers")
        head, buf = buf.split(b"\r\n\r\n", 1)
        disp = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if line.lower().startswith("content-disposition:"):
                disp = line.split(":", 1)[1]
        name = re.search(r'\bname="([^"]*)"', disp)
        fname = re.search(r'\bfilename="([^"]*)"', disp)
        if not name:
            raise MultipartError("wrong content disposition in multipart")
        # pveproxy reads the fields in one order only (content, checksum-algorithm, checksum, then the file)
        order = ("content", "checksum-algorithm", "checksum", "filename")
        if name.group(1) in order and any(order.index(k) > order.index(name.group(1)) for k in seen):
            raise MultipartError(f"wrong Content-Disposition 'form-data; name=\"{name.group(1)}\"' in multipart, "
                                 f"expected 'form-data' (pveproxy takes {', '.join(order)} in that order)")
        seen.append(name.group(1))
        out = None
        if fname is not None:
            if name.group(1) != "filename":
                raise MultipartError("wrong field name for file upload")
            tmpdir.mkdir(parents=True, exist_ok=True)
            tmp = tmpdir / f"pveupload-{secrets.token_hex(8)}"
            out = open(tmp, "wb")  # noqa: SIM115 - closed below
            params["filename"] = os.path.basename(fname.group(1))
            params["tmpfilename"] = str(tmp)
        value = b""
        try:
            while True:
                at = buf.find(delim)
                if at >= 0:
                    data, buf = buf[:at], buf[at + len(delim):]
                    if out:
                        out.write(data)
                    else:
                        value += data
                    break
                keep = len(delim)
                if len(buf) > keep:
                    data, buf = buf[:-keep], buf[-keep:]
                    if out:
                        out.write(data)
                    else:
                        value += data
                        if len(value) > 64 * 1024:
                            raise MultipartError("form data too large")
                if not fill():
                    raise MultipartError("unexpected end of multipart data")
        finally:
            if out:
                out.close()
        if out is None:
            params[name.group(1)] = value.decode("utf-8", "replace")
        while len(buf) < 2:
            if not fill():
                break
        if buf.startswith(b"--"):
            while fill():
                pass
            return params
        buf = buf[2:]  # CRLF before the next part's headers


class RequestLog:
    """The JSON-lines request log (appended under an flock, one ``write`` per line; shared across servers)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with open(self.path, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(line)
            fcntl.flock(f, fcntl.LOCK_UN)


def logged_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: ("<redacted>" if k in SECRET_PARAMS else v) for k, v in params.items() if k != "tmpfilename"}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pve-api-daemon/3.0"
    sys_version = ""
    api: Api
    request_log: RequestLog
    server_log: Any

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        self.server_log.write(f"{self.address_string()} - [{self.log_date_time_string()}] {format % args}\n")
        self.server_log.flush()

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self.handle_api("GET")

    def do_POST(self) -> None:  # noqa: N802
        self.handle_api("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self.handle_api("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self.handle_api("DELETE")

    def _body_params(self, method: str) -> dict[str, Any]:
        self.body_read = True
        if method not in ("POST", "PUT"):
            self._drain()
            return {}
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise PveError("chunked transfer encoding is not supported", 501)
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("multipart/form-data"):
            m = re.search(r'boundary="?([^";]+)"?', ctype)
            if not m:
                self.close_connection = True
                raise PveError("multipart/form-data without a boundary", 400)
            try:
                return read_multipart(self.rfile, length, m.group(1).encode(), self.api.store.workdir / "tmp")
            except MultipartError as exc:
                self.close_connection = True
                raise PveError(f"upload failed - {exc}", 400) from exc
        body = self.rfile.read(length) if length else b""
        if ctype.startswith("application/json") and body:
            data = json.loads(body)
            return {k: (int(v) if isinstance(v, bool) else v) for k, v in data.items()}
        return _decode_form(body.decode("utf-8", "replace"))

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def handle_api(self, method: str) -> None:
        began = time.monotonic()
        url = urlsplit(self.path)
        entry: dict[str, Any] = {"time": round(time.time(), 3), "server": self.server.server_address[1],
                                 "method": method, "path": url.path.removeprefix(BASE) or "/", "params": {},
                                 "expect_reject": self.headers.get("X-Pve-Test-Expect", "") == "reject"}
        status, message, body = 200, "OK", {"data": None}
        params: dict[str, Any] = {}
        self.body_read = False
        try:
            if not (url.path == BASE or url.path.startswith(BASE + "/")):
                raise PveError("no such uri", 501)
            rel = entry["path"]
            template, _, _ = schema.definition(method, rel)
            entry["template"] = template
            user = None
            if (method, template) != ("POST", "/access/ticket"):
                try:
                    user = self.api.authenticate(method, self.headers)
                except Unauthorized:
                    raise
            params = _decode_form(url.query)
            params.update(self._body_params(method))
            entry["params"] = logged_params(params)
            template, merged = schema.validate(method, rel, {k: v for k, v in params.items() if k != "tmpfilename"})
            if "tmpfilename" in params:
                merged["tmpfilename"] = params["tmpfilename"]
            entry["user"] = user
            body = {"data": self.api.dispatch(method, template, merged, user or "")}
        except schema.Rejection as rej:
            status, message, body = rej.status, rej.message, rej.body()
        except Unauthorized as exc:
            status, message, body = 401, exc.message, {"data": None}
        except PveError as exc:
            status, message = exc.status, exc.message
            body = {"data": None, "message": exc.message + "\n"}
            if exc.errors:
                body["errors"] = exc.errors
        except Exception as exc:  # noqa: BLE001 - a handler bug is a 500 with the reason, like a node's die
            traceback.print_exc()
            status, message, body = 500, f"{type(exc).__name__}: {exc}", {"data": None}
        finally:
            tmp = params.get("tmpfilename")
            if tmp and status != 200:
                Path(tmp).unlink(missing_ok=True)
        unread = 0 if self.body_read else int(self.headers.get("Content-Length") or 0)
        if unread and unread <= 64 << 20:
            self.rfile.read(unread)  # read what the client sent, else closing the socket resets the connection
        elif unread:
            self.close_connection = True  # a large body (an upload) that was refused: do not read it
        entry.update(status=status, message=message, ms=round((time.monotonic() - began) * 1000, 1))
        self.request_log.write(entry)
        payload = json.dumps(body).encode()
        self.send_response(status, message.splitlines()[0] if message else "")
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "max-age=0")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)


def _decode_form(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        if key == "_dc":
            continue  # ExtJS's cache buster, dropped by a node too
        if key in out:
            out[key] = [*out[key], value] if isinstance(out[key], list) else [out[key], value]
        else:
            out[key] = value
    return out


class TlsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, context: ssl.SSLContext):
        super().__init__(address, handler)
        self.context = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # a failed handshake (e.g. a client that does not trust our CA)
        super().finish_request(request, client_address)


def main(workdir: str) -> None:
    folder = Path(workdir)
    config = json.loads((folder / "server.json").read_text())
    api = Api(folder, config)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config["cert_file"], config["key_file"])
    Handler.api = api
    Handler.request_log = RequestLog(Path(config["request_log"]))
    Handler.server_log = open(folder / "pve-api.log", "a")  # noqa: SIM115 - for the process's life
    server = TlsServer(("127.0.0.1", int(config.get("port") or 0)), Handler, context)
    port_file = folder / "port"
    port_file.with_suffix(".tmp").write_text(str(server.server_address[1]))
    port_file.with_suffix(".tmp").replace(port_file)
    print(f"pve test API listening on https://127.0.0.1:{server.server_address[1]}{BASE}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1])
