"""Named, ordered schema migrations, recorded in the `migrations` table.

Each step is a list of statements run in one `BEGIN IMMEDIATE` transaction (so two processes
opening the same database never both apply it); a database that records a step this version
does not know was written by a newer starling-local and is refused rather than guessed at.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

from starling_local.errors import StarlingError


class SchemaTooNewError(StarlingError):
    """The database has migrations this version of starling-local does not know."""


M001_INITIAL = [
    """CREATE TABLE conversations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        title TEXT NOT NULL DEFAULT '',
        mode TEXT NOT NULL DEFAULT 'chat' CHECK (mode IN ('chat', 'code')),
        system TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '',
        params TEXT NOT NULL DEFAULT '{}',
        created TEXT NOT NULL,
        updated TEXT NOT NULL
    )""",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL DEFAULT '',
        created TEXT NOT NULL
    )""",
    "CREATE INDEX messages_by_conversation ON messages(conversation_id, id)",
    "CREATE INDEX conversations_by_updated ON conversations(updated DESC)",
]

#: A reply can be incomplete (stopped, or the app died), knows why it stopped, and keeps the
#: token ids it was generated as (so a continued conversation reuses them exactly).
M002_REPLY_STATE = [
    "ALTER TABLE messages ADD COLUMN incomplete INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE messages ADD COLUMN stop_reason TEXT",
    "ALTER TABLE messages ADD COLUMN tokens TEXT",
    "ALTER TABLE messages ADD COLUMN stats TEXT",
]

#: Full-text search over message contents and titles (FTS5, kept in step by triggers).
M003_SEARCH = [
    """CREATE VIRTUAL TABLE messages_fts USING fts5(
        content, content='messages', content_rowid='id', tokenize='unicode61')""",
    "INSERT INTO messages_fts(rowid, content) SELECT id, content FROM messages",
    """CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END""",
    """CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content)
        VALUES ('delete', old.id, old.content); END""",
    """CREATE TRIGGER messages_au AFTER UPDATE OF content ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content)
        VALUES ('delete', old.id, old.content);
        INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END""",
    """CREATE VIRTUAL TABLE titles_fts USING fts5(
        title, content='conversations', content_rowid='id', tokenize='unicode61')""",
    "INSERT INTO titles_fts(rowid, title) SELECT id, title FROM conversations",
    """CREATE TRIGGER conversations_ai AFTER INSERT ON conversations BEGIN
        INSERT INTO titles_fts(rowid, title) VALUES (new.id, new.title); END""",
    """CREATE TRIGGER conversations_ad AFTER DELETE ON conversations BEGIN
        INSERT INTO titles_fts(titles_fts, rowid, title)
        VALUES ('delete', old.id, old.title); END""",
    """CREATE TRIGGER conversations_au AFTER UPDATE OF title ON conversations BEGIN
        INSERT INTO titles_fts(titles_fts, rowid, title) VALUES ('delete', old.id, old.title);
        INSERT INTO titles_fts(rowid, title) VALUES (new.id, new.title); END""",
]

#: A conversation can be a branch of another (forked at one of its messages).
M004_BRANCHES = [
    "ALTER TABLE conversations ADD COLUMN parent_id INTEGER "
    "REFERENCES conversations(id) ON DELETE SET NULL",
]

MIGRATIONS: list[tuple[str, list[str]]] = [
    ("m001_initial", M001_INITIAL),
    ("m002_reply_state", M002_REPLY_STATE),
    ("m003_search", M003_SEARCH),
    ("m004_branches", M004_BRANCHES),
]


def applied_migrations(db: sqlite3.Connection) -> list[str]:
    db.execute(
        "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied TEXT NOT NULL)"
    )
    return [row[0] for row in db.execute("SELECT name FROM migrations ORDER BY name")]


def migrate(db: sqlite3.Connection, upto: str | None = None) -> list[str]:
    """Apply the pending migrations (up to and including `upto`); return the names applied.

    `db` must be in autocommit mode (`isolation_level=None`): transactions are explicit here.
    """
    done = set(applied_migrations(db))
    known = [name for name, _ in MIGRATIONS]
    unknown = sorted(done - set(known))
    if unknown:
        raise SchemaTooNewError(
            f"this conversation database was written by a newer starling-local "
            f"(it has {unknown[-1]}); upgrade starling-local to open it"
        )
    applied = []
    for name, statements in MIGRATIONS:
        if name not in done:
            db.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have applied it while we waited for the lock.
                if not db.execute("SELECT 1 FROM migrations WHERE name = ?", (name,)).fetchone():
                    for statement in statements:
                        db.execute(statement)
                    db.execute(
                        "INSERT INTO migrations(name, applied) VALUES (?, ?)",
                        (name, datetime.now(timezone.utc).isoformat()),
                    )
                    applied.append(name)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if name == upto:
            break
    return applied
