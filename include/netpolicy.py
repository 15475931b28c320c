"""Address policy for storage endpoints: which IP addresses the engine may connect to.

The issue: "Storage endpoints pass an address policy: link-local and cloud-metadata addresses
(169.254.169.254, fe80::/10) always refused, loopback refused unless allowed by configuration, an
optional allowlist of CIDRs; checked again on connect, so a DNS answer that changes later is caught."

Two checks use one :class:`AddressPolicy`:

* :meth:`AddressPolicy.check_endpoint` resolves an endpoint (URL or ``host[:port]``) once, up front,
  and refuses it if any answer is refused. Validation calls it to fail early with the field named.
* :func:`guarded` (and :func:`wrap` / :func:`guard_thread` for worker threads) checks again at
  connect time. While a guard is active, every ``socket.connect`` (and so ``socket.create_connection``,
  ``http.client``, urllib3/requests, botocore, asyncio) to an IPv4/IPv6 address is checked against
  the policy from a process-wide audit hook (:func:`sys.addaudithook`). The check sees the address
  actually being connected to, so a DNS answer that changed since :meth:`~AddressPolicy.check_endpoint`
  (DNS rebinding, TTL 0) is caught. Raising in the hook aborts the connect.

Guards are scoped with a :class:`contextvars.ContextVar`: a guard applies to the thread (and the
asyncio task) that entered it, never to other threads. Threads start with an empty context, so code
run in a thread pool must be wrapped (:func:`wrap`) to carry the guard. Nested guards all apply: a
connect must pass every active policy, so an inner guard can only tighten an outer one.

What the connect-time check does not see: connections made by other processes (``mount -t nfs``,
``qemu-img`` with an http URL, ``curl``), and datagrams sent with ``sendto`` on unconnected sockets.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import ipaddress
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from include.errors import InvalidMigration, StorageError

log = logging.getLogger(__name__)

ENV_ALLOW_LOOPBACK = "VMMIGRATION_ALLOW_LOOPBACK"
ENV_ALLOWLIST = "VMMIGRATION_STORAGE_ALLOWLIST"
DEFAULT_FIELD = "spec.storage.endpoint"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
F = TypeVar("F", bound=Callable[..., Any])

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})

# Instance metadata and credential services, refused whatever the configuration:
#   169.254.169.254  AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean, Hetzner, IBM (inside 169.254.0.0/16,
#                    refused as link-local anyway, as are AWS ECS's 169.254.170.2, EKS Pod Identity's
#                    169.254.170.23 and Tencent's 169.254.0.23)
#   fd00:ec2::254    AWS IMDS over IPv6 (docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-retrieval.html)
#   fd00:ec2::23     AWS EKS Pod Identity Agent over IPv6 (docs.aws.amazon.com/eks, pod-id-agent-setup)
#   fd20:ce::254     GCP metadata server over IPv6 (cloud.google.com/compute/docs/metadata/querying-metadata)
#   100.100.100.200  Alibaba Cloud ECS metadata (alibabacloud.com/help/en/ecs/user-guide/view-instance-metadata)
#   192.0.0.192      Oracle Cloud Infrastructure's legacy metadata address (docs.oracle.com/iaas, "OCI metadata")
#   168.63.129.16    Azure WireServer / host agent (learn.microsoft.com/azure/virtual-network,
#                    what-is-ip-address-168-63-129-16)
_METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "fd00:ec2::23", "fd20:ce::254", "100.100.100.200", "192.0.0.192",
    "168.63.129.16"))
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # connect() to 0.x.x.x reaches this host on Linux
# IPv6 forms that carry an IPv4 address (judged as that address too, see _embedded_ipv4):
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix (RFC 6052): the last 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215), any RFC 6052 length
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible ::a.b.c.d (RFC 4291 2.5.5.1)
_LOOPBACK_NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class AddressRefused(InvalidMigration, OSError):
    """A storage endpoint resolves to, or a guarded connect goes to, an address the policy refuses.

    Also an :class:`OSError`, as a failed ``connect`` is: ``socket.create_connection`` and urllib3 then
    close the socket and try the endpoint's next address, and requests wraps the refusal in its
    ``ConnectionError`` (find it again with :func:`refusal_in`).
    """

    reason = "StorageAddressRefused"


def refusal_in(exc: BaseException | None) -> AddressRefused | None:
    """The :class:`AddressRefused` in ``exc``'s cause/context chain (``exc`` itself included), if any.

    HTTP clients wrap connect errors (requests: ``ConnectionError`` <- ``MaxRetryError`` <-
    ``NewConnectionError`` <- ``AddressRefused``); use this to turn such a failure back into the
    permanent refusal it is.
    """
    seen: set[int] = set()
    stack = [exc] if exc is not None else []
    while stack:
        err = stack.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, AddressRefused):
            return err
        stack.extend(e for e in (err.__context__, err.__cause__) if e is not None)
        # urllib3's MaxRetryError keeps the underlying error in .reason without always chaining it
        reason = getattr(err, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
        stack.extend(a for a in err.args if isinstance(a, BaseException))
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which IP addresses storage traffic may go to.

    Always refused, whatever the configuration: IPv4 link-local 169.254.0.0/16 (with the cloud metadata
    address 169.254.169.254), IPv6 link-local fe80::/10, every other known cloud metadata address
    (``fd00:ec2::254``, ``fd20:ce::254``, ``100.100.100.200``, ``192.0.0.192``, ... see ``_METADATA``),
    0.0.0.0/8, unspecified and multicast addresses. IPv4-mapped IPv6 forms (``::ffff:169.254.169.254``)
    are judged as the IPv4 address they are. IPv6 forms that carry an IPv4 address to a gateway (NAT64
    ``64:ff9b::/96`` and the local-use ``64:ff9b:1::/48`` at every RFC 6052 prefix length,
    IPv4-compatible ``::a.b.c.d``, 6to4 ``2002::/16``) are refused whenever the IPv4 address they
    carry is refused (``64:ff9b::a9fe:a9fe``, ``64:ff9b::7f00:1`` unless loopback is allowed).

    Loopback (127.0.0.0/8, ::1, ::ffff:127.0.0.1) is refused unless ``allow_loopback`` is set, or an
    allowlist entry that lies entirely within loopback (``127.0.0.0/8``, ``127.0.0.1/32``, ``::1/128``)
    contains the address. A wide entry such as ``0.0.0.0/0`` does not open loopback.

    :param allow_loopback: allow loopback addresses (local test servers, a MinIO next to the worker).
        Loopback is then allowed even if a non-empty allowlist does not contain it.
    :param allowlist: networks the address must be in; empty means any address not refused above.
        Strings are accepted and parsed (``"10.0.0.0/8"``, ``"192.0.2.7"``).
    """

    allow_loopback: bool = False
    allowlist: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        nets = tuple(_parse_network(n, "allowlist") for n in self.allowlist)
        object.__setattr__(self, "allowlist", nets)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> AddressPolicy:
        """The policy configured by ``VMMIGRATION_ALLOW_LOOPBACK`` and ``VMMIGRATION_STORAGE_ALLOWLIST``.

        :param environ: the environment to read (``os.environ`` by default).
        :raises ValueError: a value cannot be parsed; the message names the variable.
        """
        raw_loopback = environ.get(ENV_ALLOW_LOOPBACK, "").strip().lower()
        if raw_loopback in _TRUE:
            allow_loopback = True
        elif raw_loopback in _FALSE:
            allow_loopback = False
        else:
            raise ValueError(f"{ENV_ALLOW_LOOPBACK}={environ[ENV_ALLOW_LOOPBACK]!r} is not a boolean "
                             f"(use true/1/yes or false/0/no)")
        entries = [e.strip() for e in environ.get(ENV_ALLOWLIST, "").split(",")]
        allowlist = tuple(_parse_network(e, ENV_ALLOWLIST) for e in entries if e)
        policy = cls(allow_loopback=allow_loopback, allowlist=allowlist)
        log.debug("Storage address policy: allow_loopback=%s allowlist=%s", policy.allow_loopback,
                  [str(n) for n in policy.allowlist] or "any")
        return policy

    def check_ip(self, ip: str, *, field: str | None = None) -> None:
        """Refuse ``ip`` unless the policy allows it.

        :param ip: an IPv4 or IPv6 address (an IPv6 zone such as ``%eth0`` is ignored).
        :param field: the spec field the address came from, named in the error.
        :raises AddressRefused: the address is refused, or is not an IP address.
        """
        why = self.refusal(ip)
        if why is not None:
            raise AddressRefused(why, field=field)

    def refusal(self, ip: str) -> str | None:
        """Why ``ip`` is refused (a sentence), or None if the policy allows it."""
        try:
            addr = _parse_ip(ip)
        except ValueError:
            return f"{ip!r} is not an IP address"
        shown = str(addr) if str(addr) == ip else f"{ip} ({addr})"
        why = _always_refused(addr)
        if why:
            return f"{shown} is {why}; always refused"
        for kind, embedded, _exact in _embedded_ipv4(addr):
            if embedded.is_loopback and not self.allow_loopback:
                return (f"{shown} is the {kind} form of the loopback address {embedded}; refused unless "
                        f"{ENV_ALLOW_LOOPBACK}=true")
        if addr.is_loopback:
            if self.allow_loopback or any(addr in n for n in self.allowlist if _within_loopback(n)):
                return None
            return (f"{shown} is a loopback address; refused unless {ENV_ALLOW_LOOPBACK}=true "
                    f"or {ENV_ALLOWLIST} has an entry within 127.0.0.0/8 or ::1")
        if self.allowlist and not any(addr in n for n in self.allowlist):
            return (f"{shown} is not in the storage allowlist {ENV_ALLOWLIST}="
                    f"{','.join(str(n) for n in self.allowlist)}")
        return None

    def check_endpoint(self, url_or_host: str, *, field: str = DEFAULT_FIELD,
                       default_port: int | None = None, what: str = "storage endpoint") -> list[str]:
        """Resolve an endpoint and refuse it unless the policy allows every address it resolves to.

        :param url_or_host: ``scheme://host[:port]/...``, ``host``, ``host:port``, ``[v6]:port`` or a bare
            IPv6 address.
        :param field: the spec field the endpoint came from, named in errors.
        :param default_port: port to resolve for when the endpoint has none (resolution rarely depends on it).
        :param what: what the endpoint is, in messages (``"storage endpoint"``, ``"Provider endpoint"``).
        :return: the addresses the host resolves to (deduplicated, in resolver order).
        :raises InvalidMigration: the endpoint cannot be parsed.
        :raises AddressRefused: an address it resolves to is refused.
        :raises StorageError: the host does not resolve now (transient: DNS may answer later).
        """
        host, port = _split_endpoint(url_or_host, field)
        port = port if port is not None else default_port
        if _is_ip_literal(host):
            ips = [host]
        else:
            ips = _resolve(host, port, socket.AF_UNSPEC, field, what)
            log.debug("%s host %s resolves to %s", what, host, ips)
        for ip in ips:
            why = self.refusal(ip)
            if why is not None:
                where = "" if ip == host else f"{what} host {host!r} resolves to {ip}: "
                raise AddressRefused(where + why, field=field)
        return ips


# --- connect-time guard ----------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[tuple[AddressPolicy, str], ...]] = contextvars.ContextVar(
    "vmmigration_address_policies", default=())
_hook_lock = threading.Lock()
_hook_installed = False


@contextlib.contextmanager
def guarded(policy: AddressPolicy, *, field: str = DEFAULT_FIELD) -> Iterator[AddressPolicy]:
    """Check every IPv4/IPv6 ``socket.connect`` made by this thread (or asyncio task) against ``policy``.

    Also usable as a decorator (``@guarded(policy)``). Guards nest: inside two guards a connect must
    pass both policies. A refused connect raises :class:`AddressRefused` from ``connect``.

    :param policy: the policy to enforce.
    :param field: the spec field named in refusals.
    """
    _install_hook()
    token = _ACTIVE.set((*_ACTIVE.get(), (policy, field)))
    try:
        yield policy
    finally:
        _ACTIVE.reset(token)


def wrap(policy: AddressPolicy, fn: F, *, field: str = DEFAULT_FIELD) -> F:
    """``fn`` made to run under :func:`guarded` (``policy``) wherever it is called, e.g. in a thread pool.

    ``executor.submit(wrap(policy, upload_part), part)``: worker threads do not inherit the submitting
    thread's guard, so wrap what they run.
    """

    @functools.wraps(fn)
    def run_guarded(*args: Any, **kwargs: Any) -> Any:
        with guarded(policy, field=field):
            return fn(*args, **kwargs)

    return run_guarded  # type: ignore[return-value]


def guard_thread(policy: AddressPolicy, *, field: str = DEFAULT_FIELD) -> Callable[[F], F]:
    """Decorator form of :func:`wrap`, for a thread's target or a function handed to a pool."""
    return functools.partial(wrap, policy, field=field)  # type: ignore[return-value]


def active_policies() -> tuple[AddressPolicy, ...]:
    """The policies guarding connects in the current thread/task, outermost first (empty if none)."""
    return tuple(p for p, _ in _ACTIVE.get())


def _install_hook() -> None:
    global _hook_installed
    if _hook_installed:
        return
    with _hook_lock:
        if not _hook_installed:
            sys.addaudithook(_audit_hook)  # cannot be removed: a no-op while no guard is active
            _hook_installed = True


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    # Runs for every audit event in the process (imports, opens, ...): keep the common path cheap.
    if event != "socket.connect":
        return
    active = _ACTIVE.get()
    if active:
        _check_connect(active, args[0], args[1])


def _check_connect(active: tuple[tuple[AddressPolicy, str], ...], sock: socket.socket, address: Any) -> None:
    family = sock.family
    if family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple) or not address:
        return  # AF_UNIX, AF_NETLINK, ...: not network storage
    host, port = address[0], address[1] if len(address) > 1 else None
    if isinstance(host, bytes | bytearray):
        host = bytes(host).decode("idna")
    # connect() resolves names itself without an audit event: resolve here too and check every
    # answer. (Clients such as create_connection/urllib3/asyncio resolve first and connect to an IP.)
    if host == "":
        ips = ["0.0.0.0" if family == socket.AF_INET else "::"]  # what connect() makes of ""
    elif host == "<broadcast>":
        ips = ["255.255.255.255"]
    elif _is_ip_literal(host):
        ips = [host]
    else:
        ips = _getaddrinfo_ips(host, port, family)  # a failure (gaierror) is what connect() would raise
    for policy, field in active:
        for ip in ips:
            why = policy.refusal(ip)
            if why is not None:
                log.debug("Refused connect to %s port %s: %s", host, port, why)
                target = ip if ip == host else f"{host!r} ({ip})"
                raise AddressRefused(f"connect to {target} port {port} refused: {why}", field=field)


# --- parsing helpers -------------------------------------------------------------------------------

def _parse_network(value: Any, name: str) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    try:
        return ipaddress.ip_network(str(value).strip(), strict=True)
    except ValueError as err:
        raise ValueError(f"{name}: {value!r} is not a CIDR network ({err})") from err


def _parse_ip(ip: str) -> IPAddress:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # a dual-stack socket sends ::ffff:a.b.c.d to a.b.c.d
    return addr


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _always_refused(addr: IPAddress) -> str | None:
    if addr in _METADATA:
        return "a cloud metadata service address"
    if addr.is_link_local:
        return "a link-local address"
    if addr.is_unspecified:
        return "the unspecified address"
    if addr.is_multicast:
        return "a multicast address"
    if isinstance(addr, ipaddress.IPv4Address):
        if addr in _THIS_NETWORK:
            return "in 0.0.0.0/8 ('this network')"
        return None
    for kind, embedded, exact in _embedded_ipv4(addr):
        why = _always_refused(embedded) if exact else _dangerous_embedded(embedded)
        if why:
            return f"the {kind} form of {embedded}, {why}"
    return None


def _dangerous_embedded(addr: ipaddress.IPv4Address) -> str | None:
    """For a reading that may be an artefact of guessing the NAT64 prefix length: refused only if it
    reaches something a gateway would really connect to (0.x.x.x readings are just the wrong length)."""
    if addr in _METADATA:
        return "a cloud metadata service address"
    if addr.is_link_local:
        return "a link-local address"
    return None


def _embedded_ipv4(addr: IPAddress) -> list[tuple[str, ipaddress.IPv4Address, bool]]:
    """The IPv4 addresses an IPv6 address may carry to a gateway that connects to them, as
    ``(kind, address, exact)``.

    NAT64 in the local-use prefix 64:ff9b:1::/48 may use any RFC 6052 prefix length of /48 or more
    (/48, /56, /64, /96), and which one a network uses is not visible in the address: every reading is
    returned, marked inexact: judged by :func:`_dangerous_embedded`, which ignores the 0.x.x.x a
    wrong length reads (the suffix of a /48 address reads as 0.0.0.0 at /96).
    """
    if not isinstance(addr, ipaddress.IPv6Address):
        return []
    value = int(addr)
    found: list[tuple[str, ipaddress.IPv4Address, bool]] = []
    if addr in _NAT64:
        found.append(("NAT64 (64:ff9b::/96)", ipaddress.IPv4Address(value & 0xFFFFFFFF), True))
    elif addr in _IPV4_COMPATIBLE and value > 1:  # ::1 and :: are themselves, not IPv4 addresses
        found.append(("IPv4-compatible", ipaddress.IPv4Address(value & 0xFFFFFFFF), True))
    elif addr in _NAT64_LOCAL:
        raw = addr.packed  # RFC 6052 2.2: the IPv4 octets follow the prefix and skip byte 8 (the "u" octet)
        for length, octets in (("/96", raw[12:16]), ("/48", raw[6:8] + raw[9:11]),
                               ("/56", raw[7:8] + raw[9:12]), ("/64", raw[9:13])):
            found.append((f"local-use NAT64 (64:ff9b:1::/48, {length})", ipaddress.IPv4Address(octets), False))
    elif addr.sixtofour is not None:  # 2002:a.b.c.d::/48 is tunnelled to a.b.c.d
        found.append(("6to4", addr.sixtofour, True))
    return found


def _within_loopback(net: IPNetwork) -> bool:
    return any(net.version == lo.version and net.subnet_of(lo) for lo in _LOOPBACK_NETS)  # type: ignore[arg-type]


def _split_endpoint(value: str, field: str) -> tuple[str, int | None]:
    """Host and port of a URL, ``host``, ``host:port``, ``[v6]`` / ``[v6]:port`` or a bare IPv6 address."""
    value = value.strip()
    try:
        if "://" in value:
            parts = urlsplit(value)
            host, port = parts.hostname or "", parts.port
        elif value.startswith("["):
            parts = urlsplit("//" + value)
            host, port = parts.hostname or "", parts.port
        elif value.count(":") == 1:
            host, _, raw_port = value.partition(":")
            port = int(raw_port)
            if not 0 <= port <= 65535:
                raise ValueError("port out of range")
        else:
            host, port = value, None  # a name, an IPv4 address or a bare IPv6 address
    except ValueError as err:
        # never echo the endpoint: a URL may carry credentials
        raise InvalidMigration(f"endpoint has an invalid port ({err})", field=field) from err
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        raise InvalidMigration("endpoint has no usable host name", field=field)
    return host, port


def _resolve(host: str, port: int | None, family: int, field: str | None,
             what: str = "storage endpoint") -> list[str]:
    try:
        ips = _getaddrinfo_ips(host, port, family)
    except (OSError, UnicodeError) as err:
        raise StorageError(f"{what} host {host!r} does not resolve: {err}", field=field) from err
    if not ips:
        raise StorageError(f"{what} host {host!r} has no IPv4 or IPv6 address", field=field)
    return ips


def _getaddrinfo_ips(host: str, port: int | None, family: int) -> list[str]:
    answers = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    return _unique(sa[0] for fam, _, _, _, sa in answers if fam in (socket.AF_INET, socket.AF_INET6))


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
