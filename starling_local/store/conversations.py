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
from starling_local.store.migrations import migrate
from starling_local.store.models import Conversation, StoredMessage

TITLE_LENGTH = 60
EXPORT_FORMAT = "starling-local/conversation@1"


class StoreError(StarlingError):
    """The conversation database cannot be used."""


class NotFoundError(UsageError):
    """No conversation with that id."""


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
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, timeout=30, check_same_thread=False
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            migrate(self._db)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: cannot open the conversation database ({exc})") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

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
        with self._lock:
            row = self._db.execute(
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
                    for r in self._db.execute(
                        "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id",
                        (conversation_id,),
                    )
                ]
        return conv

    def conversations(self, limit: int | None = None) -> list[Conversation]:
        """Conversations, most recently updated first (without their messages)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM conversations ORDER BY updated DESC, id DESC LIMIT ?",
                (limit if limit is not None else -1,),
            ).fetchall()
        return [self._conversation(r) for r in rows]

    def latest(self) -> Conversation | None:
        found = self.conversations(limit=1)
        return self.get(found[0].id) if found else None

    def update(self, conversation_id: int, **changes: Any) -> Conversation:
        """Change title, mode, system, model or params."""
        allowed = {"title", "mode", "system", "model", "params"}
        bad = set(changes) - allowed
        if bad:
            raise ValueError(f"cannot change {sorted(bad)}")
        if "params" in changes:
            changes["params"] = json.dumps(changes["params"])
        if "mode" in changes and changes["mode"] not in ("chat", "code"):
            raise UsageError(f"mode must be chat or code, not {changes['mode']!r}")
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
        with self._lock:
            row = self._db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
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
        with self._lock:
            rows = self._db.execute(
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

    def export_json(self, conversation_id: int) -> dict[str, Any]:
        conv = self.get(conversation_id)
        return {
            "format": EXPORT_FORMAT,
            "id": conv.id,
            "title": conv.title,
            "mode": conv.mode,
            "system": conv.system,
            "model": conv.model,
            "params": conv.params,
            "created": conv.created,
            "updated": conv.updated,
            "messages": [
                {
                    "role": m.role,
                    "content": m.content,
                    "created": m.created,
                    "incomplete": m.incomplete,
                    "stop_reason": m.stop_reason,
                }
                for m in conv.messages
            ],
        }

    def export_markdown(self, conversation_id: int) -> str:
        conv = self.get(conversation_id)
        lines = [f"# {conv.title or 'Untitled'}", ""]
        meta = f"*{conv.mode} mode · {conv.model or 'no model'} · {conv.created[:19]}*"
        lines += [meta, ""]
        if conv.system:
            lines += ["**System:** " + conv.system, ""]
        for m in conv.messages:
            who = "You" if m.role == "user" else "Starling"
            note = " *(incomplete)*" if m.incomplete else ""
            lines += [f"## {who}{note}", "", m.content, ""]
        return "\n".join(lines)

    def import_json(self, data: Any) -> Conversation:
        """Create a conversation from an `export_json` object (a new id is given)."""
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise UsageError("not a starling-local conversation export (needs 'messages')")
        messages = []
        for i, m in enumerate(data["messages"]):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
                raise UsageError(f"message {i}: role must be user or assistant")
            if not isinstance(m.get("content"), str):
                raise UsageError(f"message {i}: content must be a string")
            messages.append(m)
        mode = data.get("mode", "chat")
        if mode not in ("chat", "code"):
            raise UsageError(f"mode must be chat or code, not {mode!r}")
        stamp = now()
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO conversations(title, mode, system, model, params, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    str(data.get("title") or ""),
                    mode,
                    str(data.get("system") or ""),
                    str(data.get("model") or ""),
                    json.dumps(data.get("params") or {}),
                    str(data.get("created") or stamp),
                    stamp,
                ),
            )
            new_id = int(cur.lastrowid or 0)
            for m in messages:
                db.execute(
                    "INSERT INTO messages(conversation_id, role, content, created, incomplete, "
                    "stop_reason) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        new_id,
                        m["role"],
                        m["content"],
                        str(m.get("created") or stamp),
                        int(bool(m.get("incomplete"))),
                        m.get("stop_reason"),
                    ),
                )
            if not data.get("title"):
                first = next((m["content"] for m in messages if m["role"] == "user"), "")
                db.execute(
                    "UPDATE conversations SET title = ? WHERE id = ?", (title_from(first), new_id)
                )
        return self.get(new_id)
