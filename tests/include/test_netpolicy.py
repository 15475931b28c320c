"""include/netpolicy.py: the storage address policy, up front and again on connect (real loopback sockets)."""

from __future__ import annotations

import asyncio
import ipaddress
import pickle
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from include.errors import InvalidMigration, StorageError
from include.netpolicy import (
    ENV_ALLOW_LOOPBACK,
    ENV_ALLOWLIST,
    AddressPolicy,
    AddressRefused,
    active_policies,
    guard_thread,
    guarded,
    refusal_in,
    wrap,
)

DEFAULT = AddressPolicy()
LOOPBACK_OK = AddressPolicy(allow_loopback=True)


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """A tiny HTTP server on a free 127.0.0.1 port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _get(port: int) -> str:
    with requests.Session() as session:
        session.trust_env = False  # no proxy from the environment: connect to the server itself
        resp = session.get(f"http://127.0.0.1:{port}/", timeout=5)
        resp.raise_for_status()
        return resp.text


def _connect(port: int, host: str = "127.0.0.1") -> bool:
    with socket.create_connection((host, port), timeout=5):
        return True


# --- up front: check_endpoint / check_ip -------------------------------------------------------------

def test_loopback_endpoint_refused_by_default_allowed_by_configuration(port):
    with pytest.raises(AddressRefused) as info:
        DEFAULT.check_endpoint(f"http://127.0.0.1:{port}")
    assert str(info.value).startswith("spec.storage.endpoint: 127.0.0.1 is a loopback address")
    assert ENV_ALLOW_LOOPBACK in str(info.value)
    assert info.value.field == "spec.storage.endpoint"
    assert LOOPBACK_OK.check_endpoint(f"http://127.0.0.1:{port}") == ["127.0.0.1"]


@pytest.mark.parametrize("endpoint", ["127.0.0.1", "127.0.0.1:9000", "[::1]:9000", "[::1]", "::1",
                                      "https://[::1]:9000/bucket", "localhost", "http://localhost:9000/x",
                                      "HTTP://LOCALHOST", "0.0.0.0:80"])
def test_loopback_forms_refused(endpoint):
    with pytest.raises(AddressRefused):
        DEFAULT.check_endpoint(endpoint)


def test_named_endpoint_error_names_host_and_address():
    with pytest.raises(AddressRefused, match=r"host 'localhost' resolves to 127\.0\.0\.1: 127\.0\.0\.1 is a loopback"):
        DEFAULT.check_endpoint("http://user:secret@localhost:9000/", field="spec.storage.endpoint")


@pytest.mark.parametrize(("ip", "policy", "allowed"), [
    ("169.254.169.254", DEFAULT, False),
    ("169.254.169.254", LOOPBACK_OK, False),
    ("169.254.169.254", AddressPolicy(allowlist=("0.0.0.0/0", "169.254.0.0/16")), False),  # allowlist can't open it
    ("169.254.1.1", DEFAULT, False),
    ("fe80::1", DEFAULT, False),
    ("fe80::1%eth0", DEFAULT, False),
    ("febf::1", DEFAULT, False),  # last of fe80::/10
    ("fe80::1", AddressPolicy(allowlist=("::/0",)), False),
    ("::ffff:169.254.169.254", DEFAULT, False),
    ("::ffff:a9fe:a9fe", DEFAULT, False),
    ("64:ff9b::a9fe:a9fe", DEFAULT, False),  # NAT64 form of the metadata address
    ("fd00:ec2::254", DEFAULT, False),
    ("fd00:ec2::254", AddressPolicy(allowlist=("fd00::/8",)), False),
    ("0.0.0.0", DEFAULT, False),
    ("0.0.0.0", LOOPBACK_OK, False),
    ("0.1.2.3", DEFAULT, False),
    ("::", DEFAULT, False),
    ("::ffff:0.0.0.0", DEFAULT, False),
    ("224.0.0.1", DEFAULT, False),
    ("ff02::1", DEFAULT, False),
    ("10.1.2.3", DEFAULT, True),
    ("10.1.2.3", AddressPolicy(allowlist=(ipaddress.ip_network("192.168.0.0/16"),)), False),
    ("10.1.2.3", AddressPolicy(allowlist=("192.168.0.0/16", "10.0.0.0/8")), True),
    ("::ffff:10.1.2.3", AddressPolicy(allowlist=("10.0.0.0/8",)), True),  # mapped: judged as the IPv4 address
    ("2001:db8::1", AddressPolicy(allowlist=("10.0.0.0/8",)), False),
    ("2001:db8::1", AddressPolicy(allowlist=("2001:db8::/32",)), True),
    ("127.0.0.1", DEFAULT, False),
    ("127.8.9.10", DEFAULT, False),
    ("::1", DEFAULT, False),
    ("::ffff:127.0.0.1", DEFAULT, False),
    ("127.0.0.1", LOOPBACK_OK, True),
    ("::1", LOOPBACK_OK, True),
    ("::ffff:127.0.0.1", LOOPBACK_OK, True),
    ("127.0.0.1", AddressPolicy(allow_loopback=True, allowlist=("10.0.0.0/8",)), True),
    ("127.0.0.1", AddressPolicy(allowlist=("127.0.0.0/8",)), True),  # a loopback allowlist entry allows it
    ("127.0.0.2", AddressPolicy(allowlist=("127.0.0.1/32",)), False),
    ("127.0.0.1", AddressPolicy(allowlist=("0.0.0.0/0",)), False),  # a wide entry does not open loopback
    ("::1", AddressPolicy(allowlist=("::/0",)), False),
    ("::1", AddressPolicy(allowlist=("::1/128",)), True),
    ("not-an-ip", LOOPBACK_OK, False),
])
def test_check_ip(ip, policy, allowed):
    if allowed:
        policy.check_ip(ip)
        assert policy.refusal(ip) is None
    else:
        with pytest.raises(AddressRefused, match="^spec.x: ") as info:
            policy.check_ip(ip, field="spec.x")
        assert info.value.field == "spec.x"


def test_refusal_messages_say_why():
    assert "cloud metadata" in DEFAULT.refusal("169.254.169.254")
    assert "cloud metadata" in DEFAULT.refusal("::ffff:169.254.169.254")
    assert "link-local" in DEFAULT.refusal("fe80::1")
    assert "not in the storage allowlist" in AddressPolicy(allowlist=("192.168.0.0/16",)).refusal("10.1.2.3")
    assert ENV_ALLOWLIST in AddressPolicy(allowlist=("192.168.0.0/16",)).refusal("10.1.2.3")


def test_address_refused_is_a_permanent_validation_error_and_an_oserror():
    err = AddressRefused("no", field="spec.storage.endpoint")
    assert isinstance(err, InvalidMigration) and isinstance(err, OSError)
    assert err.permanent is True
    assert err.reason == "StorageAddressRefused"
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is AddressRefused and str(copy) == str(err) and copy.field == err.field


def test_allowed_endpoint_returns_every_address():
    policy = AddressPolicy(allowlist=("127.0.0.0/8", "::1/128"))
    ips = policy.check_endpoint("localhost", default_port=9000)
    assert "127.0.0.1" in ips
    assert all(ipaddress.ip_address(ip).is_loopback for ip in ips)
    assert policy.check_endpoint("http://[::1]:9000/") == ["::1"]
    assert AddressPolicy().check_endpoint("https://192.0.2.7") == ["192.0.2.7"]


def test_unresolvable_host_is_a_transient_storage_error():
    with pytest.raises(StorageError, match="no-such-host.invalid") as info:
        DEFAULT.check_endpoint("https://no-such-host.invalid/bucket", field="spec.storage.endpoint")
    assert not isinstance(info.value, AddressRefused)
    assert info.value.permanent is False
    assert info.value.field == "spec.storage.endpoint"


@pytest.mark.parametrize("endpoint", ["http://host:99999/", "host:notaport", "http:///path", "", "https://user:pw@:1/"])
def test_unparsable_endpoint_is_invalid_and_not_echoed(endpoint):
    with pytest.raises(InvalidMigration) as info:
        DEFAULT.check_endpoint(endpoint)
    assert not isinstance(info.value, AddressRefused)
    assert "pw" not in str(info.value)


# --- again on connect: guarded / wrap / guard_thread -------------------------------------------------

def test_guard_refuses_requests_and_raw_connects(port):
    assert _get(port) == "hello"  # outside the guard it works
    with guarded(DEFAULT):
        with pytest.raises(requests.ConnectionError) as info:
            _get(port)
        refusal = refusal_in(info.value)
        assert isinstance(refusal, AddressRefused)
        assert refusal.field == "spec.storage.endpoint"
        assert "connect to 127.0.0.1 port" in str(refusal)
        with pytest.raises(AddressRefused, match="loopback"):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        with socket.socket() as sock, pytest.raises(AddressRefused):
            sock.connect(("127.0.0.1", port))
        with socket.socket() as sock, pytest.raises(AddressRefused):
            sock.connect_ex(("127.0.0.1", port))
        with socket.socket() as sock, pytest.raises(AddressRefused, match="'localhost' \\(127.0.0.1\\)"):
            sock.connect(("localhost", port))  # a name given to connect() itself is resolved and checked
    assert _get(port) == "hello"
    assert _connect(port)
    assert active_policies() == ()


def test_guard_allows_what_the_policy_allows(port):
    with guarded(LOOPBACK_OK):
        assert _get(port) == "hello"
        assert _connect(port, "localhost")
    with guarded(AddressPolicy(allowlist=("127.0.0.1/32",))):
        assert _connect(port)


def test_guard_is_per_thread(port):
    results: dict[str, object] = {}

    def other() -> None:
        try:
            results["get"] = _get(port)
            results["connect"] = _connect(port)
        except Exception as err:  # noqa: BLE001 (reported to the test thread)
            results["error"] = err

    with guarded(DEFAULT):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(10)
        with pytest.raises(AddressRefused):
            _connect(port)
    assert results == {"get": "hello", "connect": True}


def test_thread_pools_need_wrap(port):
    with guarded(DEFAULT), ThreadPoolExecutor(2) as pool:
        assert pool.submit(_connect, port).result(10) is True  # pool threads do not inherit the guard
        with pytest.raises(AddressRefused):
            pool.submit(wrap(DEFAULT, _connect), port).result(10)
        with pytest.raises(requests.ConnectionError) as info:
            pool.submit(wrap(DEFAULT, _get), port).result(10)
        assert refusal_in(info.value) is not None
        assert pool.submit(_connect, port).result(10) is True  # the wrapped call left the thread clean
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(wrap(LOOPBACK_OK, _get), port).result(10) == "hello"


def test_guard_thread_decorator_and_guarded_as_decorator(port):
    @guard_thread(DEFAULT, field="spec.storage.bucket")
    def worker() -> bool:
        return _connect(port)

    assert worker.__name__ == "worker"
    with ThreadPoolExecutor(1) as pool, pytest.raises(AddressRefused, match="^spec.storage.bucket: "):
        pool.submit(worker).result(10)

    @guarded(DEFAULT)
    def guarded_call() -> bool:
        return _connect(port)

    with pytest.raises(AddressRefused):
        guarded_call()
    with pytest.raises(AddressRefused):
        guarded_call()  # the decorator works more than once
    assert _connect(port)


def test_nested_guards_all_apply(port):
    with guarded(LOOPBACK_OK):
        assert _connect(port)
        with guarded(DEFAULT):
            assert active_policies() == (LOOPBACK_OK, DEFAULT)
            with pytest.raises(AddressRefused):
                _connect(port)
        assert active_policies() == (LOOPBACK_OK,)
        assert _connect(port)
    with guarded(DEFAULT):
        with guarded(LOOPBACK_OK), pytest.raises(AddressRefused):
            _connect(port)  # an inner guard cannot loosen an outer one
        with pytest.raises(AddressRefused):
            _connect(port)
    assert active_policies() == ()
    assert _connect(port)


def test_guard_pops_on_error(port):
    with pytest.raises(RuntimeError), guarded(DEFAULT):
        raise RuntimeError("boom")
    assert active_policies() == ()
    assert _connect(port)


def test_asyncio_connects_are_checked_too(port):
    async def connect() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()

    async def main() -> None:
        await connect()
        with guarded(DEFAULT), pytest.raises(AddressRefused):
            await connect()
        await connect()

    asyncio.run(main())


def test_connect_time_check_is_independent_of_earlier_resolution(port):
    """A DNS answer that changes after check_endpoint is caught: the guard checks what connect() gets."""
    loopback_allowed = AddressPolicy(allowlist=("127.0.0.0/8", "::1/128"))
    assert "127.0.0.1" in loopback_allowed.check_endpoint(f"localhost:{port}")
    # The name was never checked against DEFAULT; at connect time the address it resolves to is.
    with guarded(DEFAULT):
        with pytest.raises(AddressRefused):
            _connect(port, "localhost")
        with pytest.raises(requests.ConnectionError) as info, requests.Session() as session:
            session.trust_env = False
            session.get(f"http://localhost:{port}/", timeout=5)
        assert refusal_in(info.value) is not None
    # Endpoint checked while it pointed at 127.0.0.2; "DNS now answers" 127.0.0.1: refused on connect.
    pinned = AddressPolicy(allowlist=("127.0.0.2/32",))
    assert pinned.check_endpoint("127.0.0.2") == ["127.0.0.2"]
    with guarded(pinned), pytest.raises(AddressRefused, match="127.0.0.1"):
        _connect(port, "127.0.0.1")


def test_non_inet_sockets_are_not_checked(tmp_path):
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(path)
        server.listen(1)
        with guarded(DEFAULT):
            client.connect(path)


# --- configuration -----------------------------------------------------------------------------------

def test_from_env_defaults():
    assert AddressPolicy.from_env({}) == AddressPolicy(allow_loopback=False, allowlist=())


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("yes", True), ("YES", True),
                                                 (" True ", True), ("false", False), ("0", False), ("no", False),
                                                 ("", False)])
def test_from_env_allow_loopback(value, expected):
    assert AddressPolicy.from_env({ENV_ALLOW_LOOPBACK: value}).allow_loopback is expected


def test_from_env_bad_boolean_names_the_variable():
    with pytest.raises(ValueError, match=ENV_ALLOW_LOOPBACK):
        AddressPolicy.from_env({ENV_ALLOW_LOOPBACK: "ture"})


def test_from_env_allowlist():
    policy = AddressPolicy.from_env({ENV_ALLOWLIST: " 10.0.0.0/8, 192.0.2.7 ,2001:db8::/32,"})
    assert policy.allowlist == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.7/32"),
                                ipaddress.ip_network("2001:db8::/32"))
    policy.check_ip("10.9.9.9")
    policy.check_ip("192.0.2.7")
    with pytest.raises(AddressRefused):
        policy.check_ip("192.0.2.8")


@pytest.mark.parametrize("value", ["10.0.0.0/33", "not-a-cidr", "10.0.0.0/8,bogus", "10.1.2.3/8"])
def test_from_env_bad_cidr_names_the_variable(value):
    with pytest.raises(ValueError, match=ENV_ALLOWLIST):
        AddressPolicy.from_env({ENV_ALLOWLIST: value})


def test_from_env_reads_os_environ(monkeypatch):
    monkeypatch.setenv(ENV_ALLOW_LOOPBACK, "yes")
    monkeypatch.setenv(ENV_ALLOWLIST, "10.0.0.0/8")
    assert AddressPolicy.from_env() == AddressPolicy(allow_loopback=True, allowlist=("10.0.0.0/8",))


def test_policy_rejects_bad_allowlist_entries():
    with pytest.raises(ValueError, match="allowlist"):
        AddressPolicy(allowlist=("nope",))


# --- every cloud metadata address, and IPv6 forms that carry a refused IPv4 address ---------------------

@pytest.mark.parametrize("ip", [
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean, ...
    "169.254.170.2",  # AWS ECS task metadata (link-local)
    "fd00:ec2::254",  # AWS IMDS over IPv6
    "fd00:ec2::23",  # AWS EKS Pod Identity Agent over IPv6
    "fd20:ce::254",  # GCP metadata over IPv6
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud (legacy)
    "168.63.129.16",  # Azure WireServer
    "::ffff:100.100.100.200",  # IPv4-mapped
    "::ffff:192.0.0.192",
    "::100.100.100.200",  # IPv4-compatible
    "::a9fe:a9fe",
    "64:ff9b::a9fe:a9fe",  # well-known NAT64 prefix
    "64:ff9b::100.100.100.200",
    "64:ff9b::192.0.0.192",
    "64:ff9b::169.254.1.1",  # NAT64 form of any link-local address
    "64:ff9b:1::a9fe:a9fe",  # local-use NAT64 (RFC 8215) at /96
    "64:ff9b:1:a9fe:a9:fe00::",  # ... at /48 (RFC 6052 2.2: bits 64-71 are the "u" octet)
    "64:ff9b:1:ffa9:fe:a9fe::",  # ... at /56
    "64:ff9b:1:0:a9:fea9:fe00:0",  # ... at /64
    "64:ff9b:1:1234:5678::6464:64c8",  # ... /96 with a longer prefix
    "2002:a9fe:a9fe::1",  # 6to4
])
def test_every_metadata_address_and_its_ipv6_forms_are_always_refused(ip):
    for policy in (DEFAULT, LOOPBACK_OK, AddressPolicy(allowlist=("0.0.0.0/0", "::/0"))):
        why = policy.refusal(ip)
        assert why is not None and "always refused" in why, (ip, why)


@pytest.mark.parametrize("ip", ["64:ff9b::7f00:1", "64:ff9b:1::7f00:1", "::127.0.0.1", "2002:7f00:1::1"])
def test_ipv6_forms_of_loopback_follow_the_loopback_rule(ip):
    assert "loopback" in DEFAULT.refusal(ip)
    assert LOOPBACK_OK.refusal(ip) is None


@pytest.mark.parametrize("ip", [
    "64:ff9b::10.1.2.3",  # NAT64 of a private address: no different from the address itself
    "64:ff9b::8.8.8.8",
    "64:ff9b:1::10.1.2.3",  # local-use /96
    "64:ff9b:1:a01:2:300::",  # local-use /48 form of 10.1.2.3 (its /96 reading, 0.0.0.0, is no reason)
    "2002:808:808::1",
    "2001:db8::1",
])
def test_ipv6_forms_of_allowed_addresses_are_allowed(ip):
    assert DEFAULT.refusal(ip) is None


def test_refusal_names_the_embedded_address():
    why = DEFAULT.refusal("64:ff9b::a9fe:a9fe")
    assert "NAT64" in why and "169.254.169.254" in why and "cloud metadata" in why


def test_check_endpoint_names_what_it_checks():
    with pytest.raises(AddressRefused, match="Provider endpoint host 'localhost' resolves to"):
        DEFAULT.check_endpoint("localhost", field="spec.endpoint", what="Provider endpoint")
