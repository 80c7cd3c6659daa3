"""`ConversationStore`: conversations in SQLite (WAL, foreign keys, busy timeout).

Safe against a killed process (every change is a committed transaction; WAL never leaves a
half-written page behind) and against two app instances on the same file (writers take
`BEGIN IMMEDIATE`, readers never block).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from starling_local.errors import StarlingError, UsageError
from starling_local.paths import ensure, get_paths
from starling_local.store.backups import daily_backup
from starling_local.store.migrations import migrate
from starling_local.store.models import Conversation, StoredMessage

TITLE_LENGTH = 60
MODES = ("chat", "code")


class StoreError(StarlingError):
    """The conversation database cannot be used."""


class NotFoundError(UsageError):
    """No conversation with that id."""


#: SQLite's primary result codes (the `sqlite3` module names them only from Python 3.11).
_BUSY, _LOCKED, _IOERR, _CORRUPT, _FULL, _NOTADB = 5, 6, 10, 11, 13, 26


def store_error(exc: sqlite3.Error, path: Path) -> StoreError:
    """A database error as one line that says what happened and what to do."""
    import shutil

    text = str(exc)
    extended = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    code = extended & 0xFF if isinstance(extended, int) else None
    try:
        free: int | None = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    # A full disk shows as SQLITE_FULL, or (writing the WAL's index) as an I/O error.
    if (
        code == _FULL
        or "disk is full" in text
        or (code == _IOERR and free is not None and free < 1 << 20)
    ):
        room = f"{free // 1024} KB free in {path.parent}" if free is not None else str(path.parent)
        return StoreError(f"the disk is full ({room}): the last change was not saved")
    if code in (_BUSY, _LOCKED) or "locked" in text:
        return StoreError(
            f"another starling process holds the database {path} (it waited 30 s); try again"
        )
    if isinstance(exc, sqlite3.DatabaseError) and (
        code in (_CORRUPT, _NOTADB) or "malformed" in text or "not a database" in text
    ):
        return DamagedStoreError(
            f"{path}: the conversation database is damaged ({text}); "
            "`starling history restore` brings back the newest backup"
        )
    return StoreError(f"{path}: the conversation database failed ({text})")


class DamagedStoreError(StoreError):
    """The database file is damaged (a backup can be restored)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_LENGTH else line[: TITLE_LENGTH - 1].rstrip() + "…"


def _fts_query(text: str) -> str:
    """User text as an FTS5 query: every word must appear (prefix match on the last one)."""
    words = [w.replace('"', '""') for w in text.split()]
    if not words:
        return ""
    quoted = [f'"{w}"' for w in words]
    quoted[-1] += "*"
    return " AND ".join(quoted)


class ConversationStore:
    """All reads and writes of saved conversations."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or get_paths().database
        ensure(self.path.parent)
        # Two connections: writes wait for SQLite's write lock (up to the busy timeout, when
        # another process writes), reads never do (WAL). A thread that only reads, such as a
        # UI thread, therefore never waits behind a writer.
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        if self.path.exists() and self.path.stat().st_size == 0:
            # starling-local never leaves an empty file: something truncated it.
            raise DamagedStoreError(
                f"{self.path}: the conversation database is empty (0 bytes): "
                "`starling history restore` brings back the newest backup"
            )
        try:
            self._db = self._connect()
            migrate(self._db)
            self._reader = self._connect()
        except sqlite3.Error as exc:
            raise store_error(exc, self.path) from exc
        daily_backup(self.path, self._db)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout = 30000")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        return db

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._db.close()
            self._reader.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction; a database error is a `StoreError` naming its cause."""
        with self._write_lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    # After a failed COMMIT (a full disk) SQLite has already rolled back: a
                    # second ROLLBACK would raise and hide the real error.
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise store_error(exc, self.path) from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent snapshot for the reads in the block."""
        with self._read_lock:
            try:
                self._reader.execute("BEGIN")
                try:
                    yield self._reader
                finally:
                    if self._reader.in_transaction:
                        self._reader.execute("COMMIT")
            except sqlite3.Error as exc:
                raise store_error(exc, self.path) from exc

    # --- rows -> objects, in one place -------------------------------------------------------

    @staticmethod
    def _conversation(row: sqlite3.Row) -> Conversation:
        return Conversation(
            id=row["id"],
            title=row["title"],
            mode=row["mode"],
            system=row["system"],
            model=row["model"],
            params=json.loads(row["params"] or "{}"),
            created=row["created"],
            updated=row["updated"],
            parent_id=row["parent_id"],
        )

    @staticmethod
    def _message(row: sqlite3.Row) -> StoredMessage:
        return StoredMessage(
            id=row["id"],
            conversation_id=row["conversation_id"],
            role=row["role"],
            content=row["content"],
            created=row["created"],
            incomplete=bool(row["incomplete"]),
            stop_reason=row["stop_reason"],
            tokens=tuple(json.loads(row["tokens"])) if row["tokens"] else None,
            stats=json.loads(row["stats"]) if row["stats"] else None,
        )

    # --- conversations ------------------------------------------------------------------------

    def create(
        self,
        *,
        title: str = "",
        mode: str = "chat",
        system: str = "",
        model: str = "",
        params: dict[str, Any] | None = None,
    ) -> Conversation:
        if mode not in MODES:
            raise UsageError(f"mode must be chat or code, not {mode!r}")
        stamp = now()
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO conversations(title, mode, system, model, params, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (title, mode, system, model, json.dumps(params or {}), stamp, stamp),
            )
            new_id = int(cur.lastrowid or 0)
        return self.get(new_id)

    def get(self, conversation_id: int, *, messages: bool = True) -> Conversation:
        with self._read() as db:
            row = db.execute(
                "SELECT * FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
            if row is None:
                raise NotFoundError(
                    f"no conversation {conversation_id} (see `starling history list`)"
                )
            conv = self._conversation(row)
            if messages:
                conv.messages = [
                    self._message(r)
                    for r in db.execute(
                        "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id",
                        (conversation_id,),
                    )
                ]
        return conv

    def conversations(self, limit: int | None = None) -> list[Conversation]:
        """Conversations, most recently updated first (without their messages)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM conversations ORDER BY updated DESC, id DESC LIMIT ?",
                (limit if limit is not None else -1,),
            ).fetchall()
        return [self._conversation(r) for r in rows]

    def latest(self) -> Conversation | None:
        found = self.conversations(limit=1)
        return self.get(found[0].id) if found else None

    def update(
        self,
        conversation_id: int,
        *,
        title: str | None = None,
        mode: str | None = None,
        system: str | None = None,
        model: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> Conversation:
        """Change the fields given (None: leave as it is)."""
        changes: dict[str, Any] = {
            k: v
            for k, v in (
                ("title", title),
                ("mode", mode),
                ("system", system),
                ("model", model),
                ("params", json.dumps(params) if params is not None else None),
            )
            if v is not None
        }
        if mode is not None and mode not in MODES:
            raise UsageError(f"mode must be chat or code, not {mode!r}")
        if changes:
            sets = ", ".join(f"{k} = ?" for k in changes)
            with self._write() as db:
                cur = db.execute(
                    f"UPDATE conversations SET {sets}, updated = ? WHERE id = ?",
                    (*changes.values(), now(), conversation_id),
                )
                if cur.rowcount == 0:
                    raise NotFoundError(f"no conversation {conversation_id}")
        return self.get(conversation_id)

    def rename(self, conversation_id: int, title: str) -> Conversation:
        return self.update(conversation_id, title=title.strip())

    def delete(self, conversation_id: int) -> None:
        with self._write() as db:
            cur = db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            if cur.rowcount == 0:
                raise NotFoundError(f"no conversation {conversation_id}")

    # --- messages -----------------------------------------------------------------------------

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        incomplete: bool = False,
        stop_reason: str | None = None,
        tokens: tuple[int, ...] | None = None,
        stats: dict[str, Any] | None = None,
    ) -> StoredMessage:
        """Append a message (committed before this returns); the first user message names an
        untitled conversation."""
        stamp = now()
        with self._write() as db:
            conv = db.execute(
                "SELECT title FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
            if conv is None:
                raise NotFoundError(f"no conversation {conversation_id}")
            cur = db.execute(
                "INSERT INTO messages(conversation_id, role, content, created, incomplete, "
                "stop_reason, tokens, stats) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    conversation_id,
                    role,
                    content,
                    stamp,
                    int(incomplete),
                    stop_reason,
                    json.dumps(list(tokens)) if tokens is not None else None,
                    json.dumps(stats) if stats is not None else None,
                ),
            )
            if role == "user" and not conv["title"]:
                db.execute(
                    "UPDATE conversations SET title = ? WHERE id = ?",
                    (title_from(content), conversation_id),
                )
            db.execute(
                "UPDATE conversations SET updated = ? WHERE id = ?", (stamp, conversation_id)
            )
            message_id = int(cur.lastrowid or 0)
        return self.message(message_id)

    def message(self, message_id: int) -> StoredMessage:
        with self._read() as db:
            row = db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no message {message_id}")
        return self._message(row)

    def update_message(
        self,
        message_id: int,
        content: str,
        *,
        incomplete: bool,
        stop_reason: str | None = None,
        tokens: tuple[int, ...] | None = None,
        stats: dict[str, Any] | None = None,
    ) -> None:
        """Save a streaming reply's progress (or its end)."""
        with self._write() as db:
            db.execute(
                "UPDATE messages SET content = ?, incomplete = ?, stop_reason = ?, tokens = ?, "
                "stats = ? WHERE id = ?",
                (
                    content,
                    int(incomplete),
                    stop_reason,
                    json.dumps(list(tokens)) if tokens is not None else None,
                    json.dumps(stats) if stats is not None else None,
                    message_id,
                ),
            )
            db.execute(
                "UPDATE conversations SET updated = ? WHERE id = "
                "(SELECT conversation_id FROM messages WHERE id = ?)",
                (now(), message_id),
            )

    def delete_messages(self, conversation_id: int, message_ids: list[int]) -> None:
        """Delete some messages of a conversation (in one transaction)."""
        with self._write() as db:
            db.executemany(
                "DELETE FROM messages WHERE conversation_id = ? AND id = ?",
                [(conversation_id, i) for i in message_ids],
            )

    def truncate(self, conversation_id: int, from_message_id: int) -> None:
        """Delete a message and everything after it (for regenerate and edit-and-resend)."""
        with self._write() as db:
            db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND id >= ?",
                (conversation_id, from_message_id),
            )

    # --- search, export, import ---------------------------------------------------------------

    def search(self, text: str, limit: int = 50) -> list[tuple[Conversation, str]]:
        """Conversations whose title or messages contain every word of `text`, newest first,
        each with a snippet of the best match."""
        query = _fts_query(text)
        if not query:
            return []
        with self._read() as db:
            rows = db.execute(
                """
                SELECT c.*, snippet(messages_fts, 0, '[', ']', '…', 12) AS snip
                FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid
                JOIN conversations c ON c.id = m.conversation_id
                WHERE messages_fts MATCH ?
                UNION ALL
                SELECT c.*, c.title AS snip
                FROM titles_fts JOIN conversations c ON c.id = titles_fts.rowid
                WHERE titles_fts MATCH ?
                """,
                (query, query),
            ).fetchall()
        seen: dict[int, tuple[Conversation, str]] = {}
        for row in rows:
            if row["id"] not in seen:
                seen[row["id"]] = (self._conversation(row), row["snip"])
        found = sorted(seen.values(), key=lambda cs: (cs[0].updated, cs[0].id), reverse=True)
        return found[:limit]

    def insert(self, conversation: Conversation) -> Conversation:
        """Add a whole conversation with its messages in one transaction (a new id is given;
        an untitled one is named after its first user message)."""
        return self.insert_many([conversation])[0]

    def insert_many(self, conversations: list[Conversation]) -> list[Conversation]:
        """Add whole conversations in one transaction: all of them, or (on any error) none."""
        stamp = now()
        ids = []
        with self._write() as db:
            for conversation in conversations:
                ids.append(self._insert(db, conversation, stamp))
        return [self.get(i) for i in ids]

    @staticmethod
    def _insert(db: sqlite3.Connection, conversation: Conversation, stamp: str) -> int:
        if conversation.mode not in MODES:
            raise UsageError(f"mode must be chat or code, not {conversation.mode!r}")
        first_user = next((m.content for m in conversation.messages if m.role == "user"), "")
        cur = db.execute(
            "INSERT INTO conversations(title, mode, system, model, params, created, updated, "
            "parent_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                conversation.title or title_from(first_user),
                conversation.mode,
                conversation.system,
                conversation.model,
                json.dumps(conversation.params),
                conversation.created or stamp,
                conversation.updated or stamp,
                conversation.parent_id,
            ),
        )
        new_id = int(cur.lastrowid or 0)
        for m in conversation.messages:
            if m.role not in ("user", "assistant"):
                raise UsageError(f"role must be user or assistant, not {m.role!r}")
            db.execute(
                "INSERT INTO messages(conversation_id, role, content, created, incomplete, "
                "stop_reason, tokens, stats) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    new_id,
                    m.role,
                    m.content,
                    m.created or stamp,
                    int(m.incomplete),
                    m.stop_reason,
                    json.dumps(list(m.tokens)) if m.tokens is not None else None,
                    json.dumps(m.stats) if m.stats is not None else None,
                ),
            )
        return new_id
