"""Rolling backups of the conversation database, made with SQLite's online backup API (a
consistent copy while other processes read and write), and restoring one.

On the first start of a day a backup is made and checked; the newest `KEEP` good ones are kept,
in the data folder's `backups/` (a database that fails its integrity check is not copied, so
it never rotates a good backup out). `STARLING_BACKUPS=0` turns the daily backup off.

Restoring never leaves the history missing: the backup is checked (SQLite's integrity check,
starling-local's tables, not written by a newer version), copied beside the database and
checked again, and only then swapped in; the current file is moved aside first
(`starling.db.damaged-<time>`, never deleted). Without a file named, the newest good backup is
used, and the ones passed over are named. A process that has the database open (the app,
`starling serve`) is named and the restore refused until it stops.
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
#: The tables a starling-local history has (see `migrations`).
TABLES = ("conversations", "messages", "migrations")


class BackupError(StarlingError):
    """A backup could not be made or restored."""


@dataclass(frozen=True)
class Backup:
    path: Path
    made: datetime
    size: int


@dataclass(frozen=True)
class Restored:
    used: Path
    aside: Path | None
    """Where the previous file went (None: there was none)."""
    passed_over: list[tuple[Path, str]]
    """Newer backups that were not used, and why."""


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


def problem(path: Path) -> str | None:
    """Why `path` is not a history starling-local can use (None: it is one)."""
    from starling_local.store.migrations import MIGRATIONS

    try:
        if path.stat().st_size == 0:
            return "it is empty (0 bytes), not a history"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except (OSError, sqlite3.Error) as exc:
        return f"it cannot be opened ({exc})"
    try:
        if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            return "it is damaged (SQLite's integrity check fails)"
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        missing = [t for t in TABLES if t not in tables]
        if missing:
            return f"it is not a starling-local history (no {missing[0]} table)"
        done = {row[0] for row in db.execute("SELECT name FROM migrations")}
        newer = sorted(done - {name for name, _ in MIGRATIONS})
        if newer:
            return f"a newer starling-local wrote it ({newer[-1]}); upgrade to use it"
    except sqlite3.Error as exc:
        return f"it is not a history SQLite can read ({exc})"
    finally:
        db.close()
    return None


def holders(database: Path) -> list[str]:
    """Other processes that have `database` open, as `pid (command)` (Linux's /proc; elsewhere
    none are found)."""
    try:
        target = database.resolve()
    except OSError:
        return []
    names = {str(target)} | {f"{target}{s}" for s in ("-wal", "-shm")}
    found = []
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            open_files = {os.readlink(fd) for fd in (entry / "fd").iterdir()}
        except OSError:
            continue
        if open_files & names:
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                command = "?"
            found.append(f"{entry.name} ({command[:80]})")
    return found


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
    """A backup of `database` now (through `connection` when given), checked; the oldest
    beyond `KEEP` are removed. A damaged database is refused, not copied over good backups."""
    folder = backup_folder(database)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = folder / f"{PREFIX}{stamp}.db"
    source = connection or sqlite3.connect(database)
    try:
        if source.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise BackupError(f"{database} is damaged: not backed up (the older backups stay)")
        _copy(source, target)
    except (sqlite3.Error, OSError) as exc:
        raise BackupError(f"cannot back up {database} into {folder}: {exc}") from exc
    finally:
        if connection is None:
            source.close()
    why = problem(target)
    if why is not None:
        target.unlink(missing_ok=True)
        raise BackupError(f"the backup of {database} failed its check: {why}")
    for old in backups(database)[KEEP:]:
        old.path.unlink(missing_ok=True)
    return target


def daily_backup(database: Path, connection: sqlite3.Connection) -> Path | None:
    """A backup unless one was made today (UTC) or `STARLING_BACKUPS=0`; None if none made.
    A failure (a full disk, a damaged database) costs the backup, never the command."""
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


def restore(database: Path, backup: Path | None = None) -> Restored:
    """Put `backup` (default: the newest good one) in place of `database`, safely (see the
    module's docstring). The old file is never deleted."""
    passed: list[tuple[Path, str]] = []
    chosen: Path | None = None
    if backup is not None:
        if not backup.is_file():
            raise UsageError(f"{backup}: no such backup file")
        why = problem(backup)
        if why is not None:
            raise UsageError(f"{backup}: cannot restore it: {why}")
        chosen = backup
    else:
        found = backups(database)
        if not found:
            raise UsageError(f"no backups in {backup_folder(database)}")
        for candidate in found:
            why = problem(candidate.path)
            if why is None:
                chosen = candidate.path
                break
            passed.append((candidate.path, why))
        if chosen is None:
            raise UsageError(
                f"no usable backup in {backup_folder(database)}: "
                + "; ".join(f"{p.name}: {w}" for p, w in passed)
            )
    assert chosen is not None
    busy = holders(database)
    if busy:
        raise UsageError(
            f"{database} is open in another process ({', '.join(busy)}): stop it, then restore"
        )
    staged = database.with_name(f".{database.name}.restore-{os.getpid()}")
    try:
        source = sqlite3.connect(f"file:{chosen}?mode=ro", uri=True)
        try:
            _copy(source, staged)
        finally:
            source.close()
        why = problem(staged)
        if why is not None:
            raise BackupError(f"{chosen}: the copy failed its check ({why})")
        aside = _move_aside(database)
        os.replace(staged, database)
    except (sqlite3.Error, OSError) as exc:
        raise BackupError(f"{chosen}: cannot restore it ({exc}); {database} is unchanged") from exc
    finally:
        staged.unlink(missing_ok=True)
    return Restored(chosen, aside, passed)


def _move_aside(database: Path) -> Path | None:
    """Keep the current file (and its WAL) under another name. The file is linked, not moved:
    `database` is never missing, even if the process dies before the swap."""
    if not database.exists():
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    aside = database.with_name(f"{database.name}.damaged-{stamp}")
    try:
        os.link(database, aside)
    except OSError:  # a filesystem without hard links
        os.replace(database, aside)
    for suffix in ("-wal", "-shm"):
        side = database.with_name(database.name + suffix)
        if side.exists():
            os.replace(side, aside.with_name(aside.name + suffix))
    return aside
