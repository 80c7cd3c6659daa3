"""Injected faults: a full disk (small tmpfs filesystems, mounted when the tests run as root),
a KV state save that fails alone, SIGTERM and SIGHUP mid-reply, a conversation deleted by
another process under the app, text that is not UTF-8, a FIFO as a model, and KV state files
that must not be read when the live cache already holds the prefix."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from starling_local.chat.kv_cache import ConversationCache
from starling_local.chat.service import ConversationService
from starling_local.chat.settings import ConversationSettings
from starling_local.engine import state_file
from starling_local.engine.runtime import Engine
from starling_local.store.conversations import ConversationStore, DamagedStoreError, StoreError
from tests.cli_helpers import assert_one_line_error, starling

GREEDY = ConversationSettings().with_sampling(temperature=0.0, max_tokens=8)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (root only: CI runs as root; elsewhere these tests skip and say so)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path, leave: int) -> None:
    """Fill the filesystem until `leave` bytes are free."""
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    (mount / "filler").write_bytes(b"\0" * max(0, free - leave))


def integrity(db: Path) -> str:
    with sqlite3.connect(db) as con:
        return str(con.execute("PRAGMA integrity_check").fetchone()[0])


@pytest.mark.parametrize("leave", [0, 32 << 10, 300 << 10])
def test_a_full_disk_is_one_line_and_loses_nothing_saved(
    tiny_q4: Path, tmpfs: Path, leave: int
) -> None:
    first = starling("ask", "-m", tiny_q4, "First", "--max-tokens", "4", home=tmpfs)
    assert first.returncode == 0, first.stderr
    fill(tmpfs, leave)
    r = starling("ask", "-m", tiny_q4, "--continue", "Second " * 2000, "--max-tokens", "4",
                 home=tmpfs)  # fmt: skip
    if r.returncode != 0:  # the disk filled somewhere: one line that says so
        assert_one_line_error(r, 1, "the disk is full")
        assert "rollback" not in r.stderr
    else:  # it fitted after all; a KV state that did not is a warning
        assert "Traceback" not in r.stderr
    assert "Exception ignored" not in r.stderr  # llama.cpp's log gives up quietly
    (tmpfs / "filler").unlink()
    assert integrity(tmpfs / "data" / "starling.db") == "ok"
    shown = starling("history", "show", "1", home=tmpfs)
    assert shown.returncode == 0 and "First" in shown.stdout


def test_a_failed_kv_save_is_a_warning_and_the_reply_stands(tiny_q4: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "kv").write_text("a file where the KV folder should be")
    r = starling("ask", "-m", tiny_q4, "Hello", "--max-tokens", "4", "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert "warning: the KV cache was not saved" in r.stderr and "Traceback" not in r.stderr
    import json

    out = json.loads(r.stdout)
    assert out["warnings"] and out["reply"]
    store = ConversationStore(home / "data" / "starling.db")
    reply = store.get(out["conversation_id"]).messages[-1]
    store.close()
    assert reply.role == "assistant" and not reply.incomplete and reply.content == out["reply"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_the_partial_reply(
    talker_gguf: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    env = dict(os.environ, STARLING_HOME=str(tmp_path))
    process = subprocess.Popen(
        [sys.executable, "-m", "starling_local", "ask", "-m", str(talker_gguf), "Go on",
         "--max-tokens", "3000", "--ctx", "4096"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    shown = process.stdout.read(40)  # the reply is streaming
    process.send_signal(sig)
    _, err = process.communicate(timeout=30)
    assert "Traceback" not in err
    store = ConversationStore(tmp_path / "data" / "starling.db")
    (conv,) = [store.get(c.id) for c in store.conversations()]
    store.close()
    reply = conv.messages[-1]
    assert reply.role == "assistant" and reply.stop_reason == "cancelled"
    assert reply.content.startswith(shown.strip()[:20]) and len(reply.content) >= len(shown) - 2
    assert list((tmp_path / "cache" / "kv").glob("*/*.kv"))  # its KV state was saved


def test_text_that_is_not_utf8_is_refused_and_saves_nothing(tiny_q4: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "starling_local", "ask", "-m", str(tiny_q4), b"caf\xe9"],
        capture_output=True, env=dict(os.environ, STARLING_HOME=str(tmp_path)),
    )  # fmt: skip
    assert r.returncode == 2 and b"not UTF-8" in r.stderr and b"Traceback" not in r.stderr
    piped = subprocess.run(
        [sys.executable, "-m", "starling_local", "ask", "-m", str(tiny_q4)],
        input=b"caf\xe9", capture_output=True, env=dict(os.environ, STARLING_HOME=str(tmp_path)),
    )  # fmt: skip
    assert piped.returncode == 2 and b"standard input is not UTF-8" in piped.stderr
    listed = starling("history", "list", home=tmp_path)
    assert "no saved conversations" in listed.stdout  # no empty "(untitled)" left behind


def test_a_fifo_or_a_device_as_a_model_is_one_line_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    commands = [("ask", "-m", fifo, "hi"), ("inspect", fifo), ("quantize", fifo, tmp_path / "q")]
    for args in commands:
        start = time.monotonic()
        assert_one_line_error(starling(*args, home=tmp_path, timeout=30), 1, "is a FIFO")
        assert time.monotonic() - start < 20
    assert_one_line_error(starling("ask", "-m", "/dev/null", "hi", home=tmp_path), 1, "device")


def test_a_live_prefix_reads_no_state_file_and_a_bad_file_keeps_the_live_cache(
    tiny_q4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ConversationStore(tmp_path / "db.sqlite")
    service = ConversationService(store, Engine(tiny_q4, n_ctx=2048), kv_root=tmp_path / "kv")
    conv = service.send(None, "Tell me about llamas " * 30, GREEDY)
    service.reply(conv.id)
    reads: list[Path] = []
    real = state_file.read_state_file

    def counting(path: Path, **kw: str) -> tuple[list[int], bytearray]:
        reads.append(path)
        return real(path, **kw)

    monkeypatch.setattr(state_file, "read_state_file", counting)
    service.send(conv.id, "And then?")
    outcome = service.reply(conv.id)
    assert reads == []  # the live cache held the prefix: the file's payload was not read
    assert outcome.stats.prompt_evaluated < 30
    # A damaged file: the live cache is untouched, and the next turn still reuses it.
    kv = ConversationCache(service.engine, root=tmp_path / "kv")  # type: ignore[arg-type]
    path = kv.path_for(conv.id)
    path.write_bytes(path.read_bytes()[:1000])
    assert service.engine is not None and service.engine.load_state(path) == 0
    service.send(conv.id, "More?")
    again = service.reply(conv.id)
    assert again.stats.prompt_evaluated < 30
    service.close()


def _chatgpt(**node: object) -> list[dict[str, object]]:
    message = {"author": {"role": "user"}, "content": {"content_type": "text", "parts": ["hi"]},
               "create_time": 1700000000}  # fmt: skip
    mapping = {"a": {"id": "a", "message": message, "parent": None, **node}}
    return [{"title": "t", "mapping": mapping, "current_node": "a"}]


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ('{"messages": ' + "[" * 5000 + "]" * 5000 + "}", "nests"),
        (json.dumps(_chatgpt(parent=["x"])), "broken message tree"),
        (
            json.dumps(
                [{"role": "user", "content": "x", "extra": {"deep": [[[[[[]]]]]]}}] * 2
            ).replace('"x"', '"' + "x" * 10 + '"'),
            None,
        ),
        (
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}], "params": {"temperature": "hot"}}
            ),
            "temperature",
        ),
        (
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}], "params": {"max_tokens": -5}}
            ),
            "max_tokens",
        ),
        (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), "role"),
        ("[1, 2, 3]", "not a conversation file"),
    ],
)
def test_malformed_imports_are_one_line_and_import_nothing(
    tmp_path: Path, document: str, needle: str | None
) -> None:
    path = tmp_path / "import.json"
    path.write_text(document)
    r = starling("history", "import", path, home=tmp_path)
    if needle is None:  # a valid document: imported
        assert r.returncode == 0, r.stderr
        return
    assert_one_line_error(r, 2, needle)
    assert "no saved conversations" in starling("history", "list", home=tmp_path).stdout


def test_odd_but_readable_imports_are_taken_as_one_rule_says(tmp_path: Path) -> None:
    """`author` as a string (that message has no role: skipped), impossible times (left
    empty) and lone surrogates (made U+FFFD): the rest imports, no traceback."""
    doc = _chatgpt()
    mapping = doc[0]["mapping"]
    assert isinstance(mapping, dict)
    mapping["b"] = {"id": "b", "parent": "a", "message": {
        "author": "user", "content": {"content_type": "text", "parts": ["lost?"]}}}  # fmt: skip
    mapping["c"] = {"id": "c", "parent": "b", "message": {
        "author": {"role": "assistant"}, "create_time": float("nan"),
        "content": {"content_type": "text", "parts": ["bad \\ud800 text"]}}}  # fmt: skip
    doc[0]["current_node"] = "c"
    doc[0]["create_time"] = 1e20
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(doc).replace("\\\\ud800", "\\ud800"))
    r = starling("history", "import", path, home=tmp_path)
    assert r.returncode == 0, r.stderr
    shown = starling("history", "show", "1", home=tmp_path)
    assert "bad \ufffd text" in shown.stdout and "hi" in shown.stdout


def test_two_asks_on_one_conversation_take_turns(talker_gguf: Path, tmp_path: Path) -> None:
    first = starling("ask", "-m", talker_gguf, "Start", "--max-tokens", "4", home=tmp_path)
    assert first.returncode == 0, first.stderr
    env = dict(os.environ, STARLING_HOME=str(tmp_path))
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "starling_local",
                "ask",
                "-m",
                str(talker_gguf),
                "--conversation",
                "1",
                f"Turn {name}",
                "--max-tokens",
                "60",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in ("A", "B")
    ]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in runs]
    assert all(p.returncode == 0 for p in runs)
    store = ConversationStore(tmp_path / "data" / "starling.db")
    conv = store.get(1)
    store.close()
    assert [m.role for m in conv.messages] == ["user", "assistant"] * 3  # turns alternate
    early, late = sorted(outs, key=lambda o: o["prompt_tokens"])
    # The later prompt holds the earlier reply: it is longer by that turn and its reply.
    assert late["prompt_tokens"] > early["prompt_tokens"] + early["completion_tokens"]


def _killed_writer(target: Path) -> Path:
    """A process that starts writing `target` the way starling-local does and is killed -9."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from starling_local.files import partial_path\n"
        f"p = partial_path(Path({str(target)!r}))\n"
        "p.parent.mkdir(parents=True, exist_ok=True)\n"
        "p.write_bytes(b'half a file')\n"
        "print(p, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL
    left = Path(r.stdout.strip())
    assert left.exists()
    return left


def test_files_left_by_killed_writers_are_removed_by_the_next_writer(
    tiny_f16: Path, tiny_q4: Path, tmp_path: Path
) -> None:
    out = tmp_path / "models"
    orphan = _killed_writer(out / "big-q8_0.gguf")
    intermediate = orphan.with_name(orphan.name + ".f16.gguf")  # convert's unquantized step
    orphan.rename(intermediate)
    r = starling("quantize", tiny_f16, out / "small-q8_0.gguf", "--quant", "Q8_0", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not intermediate.exists() and (out / "small-q8_0.gguf").exists()
    ask = starling("ask", "-m", tiny_q4, "Hello", "--max-tokens", "2", home=tmp_path)
    assert ask.returncode == 0, ask.stderr
    saved = list((tmp_path / "cache" / "kv").glob("*/*.kv"))
    assert saved
    # A KV state save killed half-way in this model's folder: swept by the next save there.
    same = _killed_writer(saved[0].parent / "9.kv")
    again = starling("ask", "-m", tiny_q4, "--continue", "More", "--max-tokens", "2", home=tmp_path)
    assert again.returncode == 0 and not same.exists()
    alive = saved[0].parent / f".x.kv.{os.getpid()}.partial"  # a live writer's: kept
    alive.write_bytes(b"in progress")
    starling("ask", "-m", tiny_q4, "--continue", "More", "--max-tokens", "2", home=tmp_path)
    assert alive.exists()


def test_serve_save_on_a_full_disk_answers_a_5xx_and_keeps_serving(
    tiny_q4: Path, tmpfs: Path
) -> None:
    import httpx2 as httpx

    from tests.server_helpers import serve

    with serve(tiny_q4, tmpfs, "--ctx", "512", "--save", "--quiet") as s:
        body = {"messages": [{"role": "user", "content": "x " * 200}], "max_tokens": 2}
        fill(tmpfs, 0)
        r = httpx.post(f"{s.v1}/chat/completions", json=body, timeout=60)
        assert 500 <= r.status_code < 600 and "disk is full" in r.json()["error"]["message"]
        (tmpfs / "filler").unlink()
        ok = httpx.post(
            f"{s.v1}/chat/completions",
            json={**body, "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )
        assert ok.status_code == 200
    assert integrity(tmpfs / "data" / "starling.db") == "ok"


async def test_the_app_keeps_the_message_when_the_disk_is_full(
    eager_gguf: Path, tmpfs: Path
) -> None:
    from textual.widgets import TextArea

    from starling_local.tui.app import StarlingApp
    from tests.test_tui import SIZE, ready, until

    store = ConversationStore(tmpfs / "tui.db")
    app = StarlingApp(model=str(eager_gguf), store=store, n_ctx=512)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        fill(tmpfs, 0)
        box = s.query_one("#input", TextArea)
        typed = "A message the disk has no room for " * 200
        box.text = typed
        await pilot.press("enter")
        await until(pilot, lambda: box.text == typed and not s.generating)
        assert app.is_running
        (tmpfs / "filler").unlink()
        await pilot.press("enter")  # room again: it is saved
        await until(pilot, lambda: bool(store.conversations()) and not s.generating)
        (conv,) = [store.get(c.id) for c in store.conversations()]
        assert conv.messages[0].content == typed
    store.close()


def test_pull_of_a_missing_file_or_a_folder_says_so(tmp_path: Path) -> None:
    assert_one_line_error(starling("pull", "./missing.gguf", home=tmp_path), 2, "no such file")
    assert_one_line_error(starling("pull", str(tmp_path), home=tmp_path), 2, "is a directory")


def test_a_stop_pressed_while_a_reply_waits_for_its_turn_is_kept(
    talker_gguf: Path, tmp_path: Path
) -> None:
    import threading

    from starling_local.chat.generation import ReplyHooks
    from starling_local.chat.template import Message

    store = ConversationStore(tmp_path / "db.sqlite")
    service = ConversationService(store, Engine(talker_gguf, n_ctx=2048), kv_root=tmp_path / "kv")
    conv = service.send(None, "Hello", GREEDY.with_sampling(max_tokens=200))
    started = threading.Event()
    busy = GREEDY.with_sampling(max_tokens=1500)
    running = threading.Thread(
        target=service.answer,
        args=([Message("user", "go on")], busy),
        kwargs={"hooks": ReplyHooks(on_text=lambda text, stream: started.set())},
    )
    running.start()
    assert started.wait(30)
    results: list[object] = []
    queued = threading.Thread(target=lambda: results.append(service.reply(conv.id)))
    queued.start()
    deadline = time.monotonic() + 10
    while not service.runner.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    service.stop()  # the running reply stops, and the waiting one as soon as it starts
    running.join(30)
    queued.join(30)
    (outcome,) = results
    assert outcome.stats.stop_reason == "cancelled"  # type: ignore[attr-defined]
    assert outcome.stats.completion_tokens <= 1  # type: ignore[attr-defined]
    service.close()


def test_database_errors_name_their_cause(tmp_path: Path) -> None:
    from starling_local.store.conversations import store_error

    db = tmp_path / "starling.db"
    locked = store_error(sqlite3.OperationalError("database is locked"), db)
    assert "another starling process holds the database" in str(locked)
    full = store_error(sqlite3.OperationalError("database or disk is full"), db)
    assert str(full).startswith("the disk is full (") and "KB free in" in str(full)
    damaged = store_error(sqlite3.DatabaseError("database disk image is malformed"), db)
    assert isinstance(damaged, DamagedStoreError) and "history restore" in str(damaged)
    # A real second writer: BEGIN IMMEDIATE waits, then fails with the "locked" line.
    store = ConversationStore(db)
    store._db.execute("PRAGMA busy_timeout = 100")
    other = sqlite3.connect(db)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="another starling process holds the database"):
            store.create(title="x")
    finally:
        other.rollback()
        other.close()
        store.close()
