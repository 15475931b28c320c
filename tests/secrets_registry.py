"""The secrets the test suite hands out, for the end-of-session secret scan (tests/secret_scan.py).

The test servers (tests/servers/*.py) register the credentials they are started with, and the files that
legitimately hold them (their own config and key files), which the scan leaves out. Secrets written into
spec stores as Kubernetes ``Secret`` documents need no registration: the scan finds those files itself.

Only this process's servers are known here; a server started by a subprocess (the benchmark) is covered
by the Secret documents it writes.
"""

from __future__ import annotations

from pathlib import Path

_secrets: dict[str, str] = {}  # value -> where it came from (never the value itself)
_inputs: set[Path] = set()


def register(value: str | bytes | None, source: str = "test credential") -> None:
    """Remember ``value`` as a secret that must not show up in any log, XCom or status file."""
    if value is None:
        return
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value and value not in _secrets:
        _secrets[value] = source


def register_input(*paths: str | Path) -> None:
    """Files or folders that hold secrets by design (server config, key files): not scanned."""
    for path in paths:
        _inputs.add(Path(path).resolve())


def secrets() -> dict[str, str]:
    return dict(_secrets)


def inputs() -> set[Path]:
    return set(_inputs)
