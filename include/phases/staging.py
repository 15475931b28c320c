"""The staging folder's work: free-space checks, full filesystems named clearly, and qemu-img
conversions with progress (the only place a disk is ever a whole file on this host)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from include import diskio
from include.errors import ConversionError, StorageError, UnsupportedDiskFormat
from include.phases.context import MigrationContext
from include.status import Phase


def seal(path: Path) -> str:
    """Make a staged image private and return its sha256: the next phase uses exactly this file, not one
    swapped in between."""
    os.chmod(path, 0o600)
    return diskio.sha256_file(path)


def discard(path: Path | None) -> None:
    """Remove a staged file if it is there."""
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def ensure_space(folder: Path, needed: int, disk: str) -> None:
    try:
        diskio.ensure_free_space(folder, needed)
    except OSError as err:
        raise StorageError(f"disk {disk}: {err}") from err


@contextlib.contextmanager
def space_errors(disk: str, path: Path) -> Iterator[None]:
    """A full filesystem becomes an error naming the disk and the path (the caller removes the partial file)."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"disk {disk}: no space left writing {path} ({err.strerror})") from err
        raise
    except ConversionError as err:
        if "No space left" in str(err):
            raise StorageError(f"disk {disk}: no space left writing {path}: {err}") from err
        raise


def convert(ctx: MigrationContext, phase: Phase, disk: str, src: Path, src_fmt: str, dst: Path, dst_fmt: str,
            *, into_existing: bool = False) -> None:
    """qemu-img convert with progress in the log and the status; a failed conversion removes its output
    (unless it wrote into an existing target volume, which rollback owns)."""
    # qemu-img reports a percentage of the virtual size; it is shown as that share of the disk's data
    tracker = ctx.progress(phase, disk, None, f"converting {src_fmt}->{dst_fmt}")
    total = tracker.total
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        diskio.convert(src, src_fmt, dst, dst_fmt, into_existing=into_existing,
                       vmdk_subformat=ctx.target.vmdk_subformat_for(ctx.plan.target.options),
                       progress=lambda pct: tracker.add(int(total * pct / 100) - tracker.done))
    except (diskio.UnsafeImage, diskio.QemuImgError) as err:
        if not into_existing:
            discard(dst)
        if isinstance(err, diskio.UnsafeImage):
            raise UnsupportedDiskFormat(f"disk {disk}: {err}") from err
        raise ConversionError(f"Failed to convert disk format of {disk}: {err}") from err
    tracker.add(total - tracker.done)
    tracker.finish()
