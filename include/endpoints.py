"""Which hypervisor endpoints (a Provider's ``spec.endpoint``) the engine will open, and where they may point.

A libvirt URI is more than an address: ``qemu+ext:///system?command=/path/to/script`` makes libvirt
run that script when it connects, ``socket=`` / ``netcat=`` / ``proxy=`` choose what runs or what is
opened on the far side, ``keyfile=`` / ``pkipath=`` read files of the worker. So an endpoint is checked
against an allowlist of URI forms before anything connects (:func:`check_provider_endpoint`), and its
host against the same address policy as storage endpoints (:func:`check_provider_address`):

=========================  ======================================================================
``libvirt`` / ``qemu``     ``qemu:///system``, ``qemu:///session``, ``qemu+unix:///system`` (no
                           parameters); ``qemu+ssh://[user@]host[:port]/system`` with only
                           ``no_verify``, ``no_tty`` and ``known_hosts``;
                           ``qemu+tls://host[:port]/system`` with only ``no_verify``
``vsphere``                ``https://host[:port]/sdk``
``proxmox``                ``https://host[:port]`` or ``https://host[:port]/api2/json``
=========================  ======================================================================

Credentials never belong in an endpoint (they come from the Provider's Secret): userinfo is refused
except a bare user name for ``qemu+ssh``, and messages show endpoints with the userinfo replaced by
``***`` (:func:`redact`). ``keyfile=`` is added by the engine only, from the Secret
(``include.providers.libvirt_driver.connection_uri``).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

from include.netpolicy import AddressPolicy

FIELD = "spec.endpoint"

#: the URI parameters each libvirt transport may carry; everything else is refused
_LIBVIRT_PARAMS: dict[str, frozenset[str]] = {
    "qemu": frozenset(),
    "qemu+unix": frozenset(),
    "qemu+ssh": frozenset({"no_verify", "no_tty", "known_hosts"}),
    "qemu+tls": frozenset({"no_verify"}),
}
_LIBVIRT_PATHS = ("/system", "/session")
_BOOLEAN = frozenset({"0", "1"})
# RFC 1123 host names (no label starts or ends with "-": ssh would read "-oProxyCommand=..." as an option)
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_SSH_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_./-]+$")
_URI_CHARS = re.compile(r"^[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+$")  # RFC 3986's characters only


def redact(endpoint: str) -> str:
    """``endpoint`` with any userinfo (``user:password@``) replaced by ``***@``, for messages and logs.

    Everything between ``//`` and the last ``@`` goes, so a password holding ``/``, ``?`` or ``#``
    (which URL parsers then read as a path) is hidden too.
    """
    text = str(endpoint)
    if "@" not in text:
        return text
    scheme_end = text.find("//")
    start = scheme_end + 2 if scheme_end >= 0 else 0
    at = text.rfind("@")
    if at < start:
        return text
    return text[:start] + "***" + text[at:]


_USERINFO_IN_TEXT = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^\s/'\"<>]*@")


def redact_text(message: str) -> str:
    """``message`` with the userinfo of every URL in it replaced by ``***@`` (for error messages that
    quote URLs, such as those of HTTP clients)."""
    return _USERINFO_IN_TEXT.sub(lambda m: m.group("scheme") + "***@", str(message))


def check_provider_endpoint(ptype: str, endpoint: str) -> str | None:
    """None if a Provider of type ``ptype`` may use ``endpoint``, else why not (a sentence).

    The sentence shows the endpoint without its userinfo and names offending URI parameters, never
    their values.
    """
    if not isinstance(endpoint, str) or not endpoint.strip():
        return "is empty"
    if not _URI_CHARS.match(endpoint):
        return "contains characters a URI may not hold (spaces, control characters, backslashes, ...)"
    # shown without userinfo, query or fragment: a value there is never echoed
    shown = redact(endpoint).split("?", 1)[0].split("#", 1)[0]
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return f"{shown!r} is not a valid URI (bad port or host)"
    if parts.fragment or endpoint.endswith("#"):
        return f"{shown!r} has a fragment (#...); remove it"
    if ptype in ("libvirt", "qemu"):
        return _check_libvirt(endpoint, parts, shown)
    if ptype == "vsphere":
        return _check_https(parts, shown, ("/sdk", "/sdk/"), "https://host[:port]/sdk")
    if ptype == "proxmox":
        return _check_https(parts, shown, ("", "/", "/api2/json", "/api2/json/"),
                            "https://host[:port] or https://host[:port]/api2/json")
    return f"no endpoint form is known for Provider type {ptype!r}"


def check_provider_address(endpoint: str, *, field: str = FIELD, policy: AddressPolicy | None = None,
                           resolve: bool = True) -> list[str]:
    """Refuse a Provider endpoint whose host the address policy refuses (the storage policy:
    ``VMMIGRATION_ALLOW_LOOPBACK``, ``VMMIGRATION_STORAGE_ALLOWLIST``, metadata addresses always).

    libvirt connects from C code, which the connect-time audit hook of :mod:`include.netpolicy` does
    not see: call this right before opening a connection, as well as when resolving the Provider.

    :param endpoint: the Provider's ``spec.endpoint`` (a local ``qemu:///system`` has no host: nothing to check).
    :param field: the field named in errors.
    :param policy: the policy (default: :meth:`AddressPolicy.from_env`).
    :param resolve: resolve host names; with False only IP literals (and ``localhost``) are checked.
    :return: the addresses checked.
    :raises AddressRefused: the host is, or resolves to, a refused address.
    :raises StorageError: the host name does not resolve (only with ``resolve``).
    :raises InvalidMigration: the endpoint cannot be parsed.
    """
    from include.errors import InvalidMigration
    from include.netpolicy import _is_ip_literal

    try:
        host = urlsplit(endpoint).hostname
    except ValueError as err:
        raise InvalidMigration(f"{redact(endpoint).split('?', 1)[0]!r} is not a valid URI", field=field) from err
    if not host:
        return []
    policy = policy or AddressPolicy.from_env()
    if not resolve and not _is_ip_literal(host) and host.lower() not in ("localhost", "localhost.localdomain"):
        return []
    return policy.check_endpoint(host, field=field, what="Provider endpoint")


def _check_host(parts, shown: str) -> str | None:
    host = parts.hostname
    netloc_host = parts.netloc.rsplit("@", 1)[-1]
    if not host:
        return f"{shown!r} has no host"
    if netloc_host.startswith("["):
        from include.netpolicy import _is_ip_literal

        if not _is_ip_literal(host) or "%" in host:
            return f"{shown!r} has an invalid IPv6 host"
        return None
    if "%" in netloc_host or not all(_LABEL.match(label) for label in host.rstrip(".").split(".")):
        return f"{shown!r} has an invalid host name {host!r}"
    return None


def _check_libvirt(endpoint: str, parts, shown: str) -> str | None:
    scheme = parts.scheme.lower()
    if scheme not in _LIBVIRT_PARAMS:
        return (f"{shown!r} uses the libvirt transport {scheme or '(none)'!r}; supported: "
                f"qemu:///system, qemu+unix:///system, qemu+ssh://[user@]host/system, qemu+tls://host/system")
    if parts.path not in _LIBVIRT_PATHS:
        return f"{shown!r} must end in /system or /session"
    base = shown
    if scheme in ("qemu", "qemu+unix"):
        if parts.netloc:
            hint = " (for a remote daemon use qemu+tls://host/system or qemu+ssh://host/system)" \
                if scheme == "qemu" else ""
            return f"{base!r} names a host or user; a local URI has none{hint}"
    else:
        why = _check_host(parts, shown)
        if why:
            return why
        if parts.password is not None or (parts.username is not None and scheme != "qemu+ssh"):
            return f"{base!r} carries credentials in the URI; put them in the Provider's Secret"
        if parts.username is not None and not _SSH_USER.match(parts.username):
            return f"{base!r} has an invalid SSH user name"
    if ";" in parts.query:  # libvirt also splits parameters on ";", Python does not: refuse the ambiguity
        return f"{base!r} separates URI parameters with ';'; use '&'"
    try:
        params = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        return f"{base!r} has a malformed query string"
    if parts.query == "" and "?" in endpoint:
        return f"{base!r} has an empty query string"
    allowed = _LIBVIRT_PARAMS[scheme]
    names = [name for name, _ in params]
    if "keyfile" in names:
        return (f"{base!r} sets keyfile=; the engine adds the SSH key itself, from the Provider's Secret "
                f"(key sshPrivateKey or ssh-privatekey)")
    refused = sorted({name for name in names if name not in allowed})
    if refused:
        return (f"{base!r} sets URI parameter{'s' if len(refused) > 1 else ''} {', '.join(refused)}, which "
                f"the engine does not allow for {scheme} (allowed: {', '.join(sorted(allowed)) or 'none'})")
    if len(set(names)) != len(names):
        return f"{base!r} repeats a URI parameter"
    for name, value in params:
        if name in ("no_verify", "no_tty") and value not in _BOOLEAN:
            return f"{base!r}: {name} must be 0 or 1"
        if name == "known_hosts" and not _SAFE_PATH.match(value):
            return f"{base!r}: known_hosts must be an absolute file path"
    return None


def _check_https(parts, shown: str, paths: tuple[str, ...], form: str) -> str | None:
    base = shown
    if parts.scheme.lower() != "https":
        return f"{base!r} must be {form}"
    if parts.username is not None or parts.password is not None:
        return f"{base!r} carries credentials in the URI; put them in the Provider's Secret"
    why = _check_host(parts, shown)
    if why:
        return why
    if parts.query or parts.geturl().endswith("?"):
        return f"{base!r} has a query string; the endpoint must be {form}"
    if parts.path not in paths:
        return f"{base!r} must be {form}"
    return None


def ensure_provider_endpoint(ptype: str, endpoint: str, title: str) -> None:
    """Right before a driver connects: the endpoint is an allowed form (InvalidMigration on ``spec.endpoint``)
    and its host an address the policy allows (HypervisorError naming ``title``, e.g. "vSphere")."""
    from include.errors import HypervisorError, InvalidMigration, StorageError

    why = check_provider_endpoint(ptype, endpoint)
    if why is not None:
        raise InvalidMigration(f"{title} endpoint refused: {why}", field=FIELD)
    try:
        check_provider_address(endpoint)
    except StorageError as err:
        raise HypervisorError(f"cannot connect to {title} at {redact(endpoint)}: {err}") from err
