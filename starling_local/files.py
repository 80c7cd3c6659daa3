"""Writing big files safely: free-space checks and write-then-rename."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from starling_local.errors import StarlingError

#: Room left over after a write, so the disk is never filled to the last byte.
DISK_MARGIN = 64 << 20


class DiskSpaceError(StarlingError):
    """Not enough free space for the file about to be written."""


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(directory: Path) -> int:
    """Free space on the file system holding `directory` (or its nearest existing parent)."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def require_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse up front when `needed` bytes (plus a margin) will not fit."""
    free = free_bytes(directory)
    if needed + DISK_MARGIN > free:
        raise DiskSpaceError(
            f"not enough disk space for {what}: needs {human_bytes(needed)}, "
            f"{human_bytes(free)} free in {directory}"
        )


def partial_path(final: Path) -> Path:
    """The temporary name a file is written under before it is complete (it carries the
    writer's PID: `sweep_orphans` removes those whose writer is gone)."""
    return final.with_name(f".{final.name}.{os.getpid()}.partial")


_ORPHAN = re.compile(r"^\..+\.(\d+)\.(partial|tmp)(\..+)?$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_orphans(folder: Path, recursive: bool = False) -> list[Path]:
    """Remove the temporary and partial files in `folder` whose writer's process is gone (a
    `kill -9` during a conversion, a KV state save, a library update); return them."""
    removed = []
    try:
        candidates = folder.rglob(".*") if recursive else folder.glob(".*")
        for path in candidates:
            found = _ORPHAN.match(path.name)
            if found and path.is_file() and not _alive(int(found.group(1))):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    except OSError:
        pass
    return removed


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it into place only if the block succeeds.

    An interrupted or failed write leaves nothing under the final name.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_orphans(final.parent)
    tmp = partial_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
