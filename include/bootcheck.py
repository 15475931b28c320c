"""The opt-in boot check of a migrated VM, and the other annotations a running source brings.

``vmmigration.virtrigaud.io/boot-check: serial`` boots the target once (NIC links down) and waits for a
marker line on its serial console (``.../boot-check-marker``, default ``login:``); ``guest-agent`` waits
for the guest agent to answer instead. ``.../boot-check-timeout`` is in seconds (default 120).
``.../delete-running-source: "true"`` lets ``cleanupPolicy.deleteSource`` delete a source VM that was
running when the migration was validated (otherwise refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from include.errors import InvalidMigration

PREFIX = "vmmigration.virtrigaud.io/"
BOOT_CHECK = PREFIX + "boot-check"
BOOT_MARKER = PREFIX + "boot-check-marker"
BOOT_TIMEOUT = PREFIX + "boot-check-timeout"
DELETE_RUNNING = PREFIX + "delete-running-source"
MODES = ("none", "serial", "guest-agent")
DEFAULT_MARKER = "login:"
DEFAULT_TIMEOUT = 120.0
MAX_TIMEOUT = 3600.0


def _field(name: str) -> str:
    return f"metadata.annotations[{name}]"


@dataclass(frozen=True)
class BootCheckPlan:
    mode: str  # serial | guest-agent
    marker: str
    timeout: float


def boot_check_from(annotations: Mapping[str, str]) -> tuple[BootCheckPlan | None, list[InvalidMigration]]:
    """The boot check the annotations ask for (None: not asked), and every error in them."""
    errors: list[InvalidMigration] = []
    mode = (annotations.get(BOOT_CHECK) or "none").strip().lower()
    if mode not in MODES:
        errors.append(InvalidMigration(f"{mode!r} is not a boot check (use one of {', '.join(MODES)})",
                                       field=_field(BOOT_CHECK)))
    marker = annotations.get(BOOT_MARKER, DEFAULT_MARKER)
    if not marker.strip() or "\n" in marker or len(marker) > 200:
        errors.append(InvalidMigration("the boot marker must be one non-empty line of at most 200 characters",
                                       field=_field(BOOT_MARKER)))
    raw = annotations.get(BOOT_TIMEOUT)
    timeout = DEFAULT_TIMEOUT
    if raw is not None:
        try:
            timeout = float(raw)
        except ValueError:
            timeout = -1.0
        if not 1 <= timeout <= MAX_TIMEOUT:
            errors.append(InvalidMigration(f"{raw!r} is not a boot check timeout in seconds (1 to {MAX_TIMEOUT:g})",
                                           field=_field(BOOT_TIMEOUT)))
    if errors or mode == "none" or mode not in MODES:
        return None, errors
    return BootCheckPlan(mode=mode, marker=marker, timeout=timeout), errors


def delete_running_from(annotations: Mapping[str, str]) -> tuple[bool, list[InvalidMigration]]:
    raw = (annotations.get(DELETE_RUNNING) or "false").strip().lower()
    if raw not in ("true", "false"):
        return False, [InvalidMigration(f"{raw!r} is not true or false", field=_field(DELETE_RUNNING))]
    return raw == "true", []
