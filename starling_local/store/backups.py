"""Rolling backups of the conversation database, made with SQLite's online backup API (a
consistent copy while other processes read and write), and restoring one.

On the first start of a day a backup is made; the newest `KEEP` are kept, in the data folder's
`backups/`. `STARLING_BACKUPS=0` turns the daily backup off. Restoring moves the current file
aside (`starling.db.damaged-<time>`, never deleted) and copies the backup into place.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from starling_local.config import environment
from starling_local.errors import StarlingError, UsageError

KEEP = 7
PREFIX = "starling-"


class BackupError(StarlingError):
    """A backup could not be made or restored."""


@dataclass(frozen=True)
class Backup:
    path: Path
    made: datetime
    size: int


def backup_folder(database: Path) -> Path:
    return database.parent / "backups"


def backups(database: Path) -> list[Backup]:
    """The backups of `database`, newest first."""
    folder = backup_folder(database)
    found = []
    for path in folder.glob(f"{PREFIX}*.db") if folder.is_dir() else []:
        try:
            made = datetime.strptime(path.stem.removeprefix(PREFIX), "%Y%m%d-%H%M%S")
            found.append(Backup(path, made.replace(tzinfo=timezone.utc), path.stat().st_size))
        except (ValueError, OSError):
            continue
    return sorted(found, key=lambda b: b.made, reverse=True)


def _copy(source: sqlite3.Connection, target: Path) -> None:
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        dest = sqlite3.connect(partial)
        try:
            source.backup(dest)
        finally:
            dest.close()
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def make_backup(database: Path, connection: sqlite3.Connection | None = None) -> Path:
    """A backup of `database` now (through `connection` when given); the oldest beyond
    `KEEP` are removed."""
    folder = backup_folder(database)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = folder / f"{PREFIX}{stamp}.db"
    source = connection or sqlite3.connect(database)
    try:
        _copy(source, target)
    except (sqlite3.Error, OSError) as exc:
        raise BackupError(f"cannot back up {database} into {folder}: {exc}") from exc
    finally:
        if connection is None:
            source.close()
    for old in backups(database)[KEEP:]:
        old.path.unlink(missing_ok=True)
    return target


def daily_backup(database: Path, connection: sqlite3.Connection) -> Path | None:
    """A backup unless one was made today (UTC) or `STARLING_BACKUPS=0`; None if none made.
    A failure (a full disk) costs the backup, never the command."""
    if not environment().backups:
        return None
    today = datetime.now(timezone.utc).date()
    found = backups(database)
    if found and found[0].made.date() == today:
        return None
    try:
        return make_backup(database, connection)
    except BackupError:
        return None


def restore(database: Path, backup: Path | None = None) -> tuple[Path, Path | None]:
    """Put `backup` (default: the newest) in place of `database`; (the backup used, where the
    old file was moved, or None when there was none). The old file is never deleted."""
    if backup is None:
        found = backups(database)
        if not found:
            raise UsageError(f"no backups in {backup_folder(database)}")
        backup = found[0].path
    if not backup.is_file():
        raise UsageError(f"{backup}: no such backup file")
    try:
        source = sqlite3.connect(f"file:{backup}?mode=ro", uri=True)
        try:
            if source.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                raise UsageError(f"{backup}: the backup itself is damaged")
            aside = None
            if database.exists():
                stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
                aside = database.with_name(f"{database.name}.damaged-{stamp}")
                os.replace(database, aside)
                for suffix in ("-wal", "-shm"):
                    side = database.with_name(database.name + suffix)
                    if side.exists():
                        os.replace(side, aside.with_name(aside.name + suffix))
            _copy(source, database)
        finally:
            source.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{backup}: cannot restore it ({exc})") from exc
    return backup, aside
