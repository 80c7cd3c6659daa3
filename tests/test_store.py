"""The conversation store on real SQLite: every operation, migrations, crashes, two writers."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from starling_local.chat.transcripts import from_json, to_json, to_markdown
from starling_local.errors import UsageError
from starling_local.store.conversations import ConversationStore, NotFoundError, title_from
from starling_local.store.migrations import MIGRATIONS, SchemaTooNewError, migrate


@pytest.fixture
def store(tmp_path: Path) -> ConversationStore:
    return ConversationStore(tmp_path / "s.db")


def test_pragmas(store: ConversationStore) -> None:
    db = store._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000


def test_create_get_list_rename_update_delete(store: ConversationStore) -> None:
    a = store.create(mode="code", system="Be terse", model="m:Q4", params={"temperature": 0.2})
    b = store.create()
    assert (a.mode, a.system, a.model, a.params) == (
        "code",
        "Be terse",
        "m:Q4",
        {"temperature": 0.2},
    )
    assert [c.id for c in store.conversations()] == [b.id, a.id]  # newest first
    store.rename(a.id, "  Sorting  ")
    assert store.get(a.id).title == "Sorting"
    assert [c.id for c in store.conversations()] == [a.id, b.id]  # renaming touches `updated`
    store.update(a.id, mode="chat", params={"top_p": 0.5})
    assert store.get(a.id).mode == "chat" and store.get(a.id).params == {"top_p": 0.5}
    store.delete(b.id)
    with pytest.raises(NotFoundError):
        store.get(b.id)
    with pytest.raises(NotFoundError):
        store.delete(b.id)


def test_messages_title_and_cascade(store: ConversationStore) -> None:
    c = store.create()
    store.add_message(c.id, "user", "What is the airspeed velocity of an unladen swallow?" * 3)
    r = store.add_message(c.id, "assistant", "", incomplete=True)
    store.update_message(
        r.id,
        "African or European?",
        incomplete=False,
        stop_reason="end_of_turn",
        tokens=(1, 2, 3),
        stats={"completion_tokens": 3},
    )
    got = store.get(c.id)
    assert got.title.startswith("What is the airspeed") and len(got.title) <= 60
    assert [m.role for m in got.messages] == ["user", "assistant"]
    reply = got.messages[1]
    assert (reply.content, reply.incomplete, reply.stop_reason, reply.tokens) == (
        "African or European?",
        False,
        "end_of_turn",
        (1, 2, 3),
    )
    store.truncate(c.id, reply.id)
    assert [m.role for m in store.get(c.id).messages] == ["user"]
    store.delete(c.id)
    assert store._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_search_titles_and_messages(store: ConversationStore) -> None:
    a = store.create()
    store.add_message(a.id, "user", "Tell me about llamas")
    store.add_message(a.id, "assistant", "Llamas are camelids from South America.")
    b = store.create(title="Quicksort in C++")
    store.add_message(b.id, "user", "write it")
    assert [c.id for c, _ in store.search("camelid")] == [a.id]
    assert [c.id for c, _ in store.search("quicksort")] == [b.id]
    assert [c.id for c, _ in store.search("south americ")] == [a.id]  # prefix on the last word
    assert store.search("llamas zebras") == []
    assert store.search('"; DROP TABLE messages; --') == []  # user text is quoted, not parsed
    m = store.get(a.id).messages[1]
    store.update_message(m.id, "Now about alpacas.", incomplete=False)
    assert store.search("camelid") == [] and [c.id for c, _ in store.search("alpacas")] == [a.id]


def test_export_import_round_trip(store: ConversationStore) -> None:
    c = store.create(mode="code", system="sys", model="x")
    store.add_message(c.id, "user", "Hello")
    store.add_message(c.id, "assistant", "Hi", incomplete=True, stop_reason="cancelled")
    data = to_json(store.get(c.id))
    assert set(data) >= {"id", "title", "mode", "system", "model", "messages"}
    copy = store.insert(from_json(json.loads(json.dumps(data))))
    assert copy.id != c.id
    assert [(m.role, m.content, m.incomplete) for m in copy.messages] == [
        ("user", "Hello", False),
        ("assistant", "Hi", True),
    ]
    assert (copy.mode, copy.system, copy.title) == ("code", "sys", "Hello")
    md = to_markdown(store.get(c.id))
    assert "## You" in md and "## Starling *(incomplete)*" in md
    with pytest.raises(UsageError, match="role must be"):
        from_json({"messages": [{"role": "robot", "content": "x"}]})


def test_insert_is_all_or_nothing(store: ConversationStore) -> None:
    data = {"messages": [{"role": "user", "content": "kept?"}]}
    conv = from_json(data)
    conv.messages.append(replace(conv.messages[0], role="robot"))
    with pytest.raises(UsageError, match="role must be"):
        store.insert(conv)
    assert store.conversations() == []  # the conversation row was rolled back too


def test_update_takes_typed_fields(store: ConversationStore) -> None:
    c = store.create()
    assert store.update(c.id, title="T", params={"seed": 3}).params == {"seed": 3}
    assert store.update(c.id).title == "T"  # nothing given, nothing changed
    with pytest.raises(TypeError):
        store.update(c.id, colour="red")  # type: ignore[call-arg]
    with pytest.raises(UsageError, match="mode must be"):
        store.update(c.id, mode="poetry")


@pytest.mark.parametrize("upto", [name for name, _ in MIGRATIONS])
def test_each_migration_applies_on_the_previous_schema(tmp_path: Path, upto: str) -> None:
    db = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    names = [n for n, _ in MIGRATIONS]
    previous = names[: names.index(upto)]
    if previous:
        migrate(db, upto=previous[-1])
        if "m001_initial" in previous:
            db.execute(
                "INSERT INTO conversations(title, created, updated) VALUES ('old', 't', 't')"
            )
            db.execute(
                "INSERT INTO messages(conversation_id, role, content, created) "
                "VALUES (1, 'user', 'kept across upgrades', 't')"
            )
    assert migrate(db, upto=upto) == [upto]
    assert migrate(db, upto=upto) == []  # idempotent
    if upto == "m003_search":
        # Existing rows are indexed by the migration that adds search.
        hits = db.execute("SELECT rowid FROM messages_fts WHERE messages_fts MATCH 'upgrades'")
        assert [r[0] for r in hits] == [1]
    if upto == "m002_reply_state":
        row = db.execute("SELECT content, incomplete FROM messages").fetchone()
        assert row == ("kept across upgrades", 0)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    ConversationStore(tmp_path / "n.db").close()
    db = sqlite3.connect(tmp_path / "n.db")
    db.execute("INSERT INTO migrations VALUES ('m999_from_the_future', 'x')")
    db.commit()
    db.close()
    with pytest.raises(SchemaTooNewError, match="newer starling-local"):
        ConversationStore(tmp_path / "n.db")


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from starling_local.store.conversations import ConversationStore
    s = ConversationStore(Path(sys.argv[1]))
    c = s.create()
    m = s.add_message(c.id, "assistant", "", incomplete=True)
    text = ""
    i = 0
    while True:
        i += 1
        text += f"token{i} "
        s.update_message(m.id, text, incomplete=True)
        if i == 50:
            print("streaming", flush=True)
    """
)


def test_killed_mid_write_leaves_a_consistent_database(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "streaming"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = ConversationStore(path)
    assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    reply = store.get(1).messages[0]
    assert reply.incomplete and reply.content.startswith("token1 token2 ")
    words = reply.content.split()
    assert words == [f"token{i}" for i in range(1, len(words) + 1)]  # a whole committed state


def _hammer(path: str, worker: int, n: int) -> None:
    store = ConversationStore(Path(path))
    for i in range(n):
        c = store.create(title=f"w{worker}-{i}")
        store.add_message(c.id, "user", f"message {worker} {i}")


def test_two_writers_do_not_corrupt(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    ConversationStore(Path(path)).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(path, w, 40)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = ConversationStore(Path(path))
    assert len(store.conversations()) == 80
    assert store._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 80
    assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert title_from("  many   spaces\nand lines ") == "many spaces and lines"
