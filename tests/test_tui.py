"""The app, driven with Pilot against the real engine on the tiny models."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Input, Label, TextArea

from starling_local.store.conversations import ConversationStore
from starling_local.tui.app import COMMANDS, StarlingApp
from starling_local.tui.screens.chat import ChatScreen
from starling_local.tui.screens.dialogs import (
    ConfirmScreen,
    FileScreen,
    PromptScreen,
    TextScreen,
)
from starling_local.tui.widgets.chat_view import MessageView
from starling_local.tui.widgets.sidebar import ConversationItem, Sidebar

SIZE = (120, 40)


async def until(pilot: Any, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


def screen(app: StarlingApp) -> ChatScreen:
    s = app.screen
    assert isinstance(s, ChatScreen)
    return s


async def ready(pilot: Any, app: StarlingApp) -> ChatScreen:
    await until(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model_ready)
    s = screen(app)
    s.settings = s.settings.with_sampling(temperature=0.0)  # greedy: the same reply every run
    return s


def replies(app: StarlingApp) -> int:
    return sum(1 for v in screen(app).query(MessageView) if v.role == "assistant")


async def send(pilot: Any, app: StarlingApp, text: str) -> None:
    s = screen(app)
    before = replies(app)
    s.query_one("#input", TextArea).focus()
    s.query_one("#input", TextArea).text = text
    await pilot.press("enter")
    await until(pilot, lambda: replies(app) > before and not s.generating)


def last_reply_id(store: ConversationStore, cid: int) -> int:
    m = store.get(cid).messages
    return m[-1].id if m and m[-1].role == "assistant" and not m[-1].incomplete else -1


def roles(app: StarlingApp) -> list[str]:
    return [v.role for v in screen(app).query(MessageView)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ConversationStore]:
    store = ConversationStore(tmp_path / "tui.db")
    yield store
    store.close()


async def test_send_streams_a_reply_and_saves_it(
    eager_gguf: Path, store: ConversationStore
) -> None:
    app = StarlingApp(model=str(eager_gguf), store=store, n_ctx=1024)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        await pilot.click("#input")
        await pilot.press(*"Hello there")
        await pilot.press("enter")
        await until(pilot, lambda: not s.generating and roles(app) == ["user", "assistant"])
        conv = store.get(store.conversations()[0].id)
        assert conv.title == "Hello there"
        user, reply = conv.messages
        assert user.content == "Hello there" and not reply.incomplete
        assert reply.stop_reason == "end_of_turn" and reply.content
        assert reply.tokens and len(reply.tokens) == reply.stats["completion_tokens"]
        view = s.chat.last("assistant")
        assert view is not None and view.markdown.source == reply.content
        status = str(s.status.render())
        assert "tok/s" in status and "/1024 tokens" in status and "mode chat" in status
        assert s.query_one("#input", TextArea).text == ""
        assert s.pacer.redraws >= 1 and s.prompt_input.cursor_blink  # blinks again when done


async def test_escape_stops_and_keeps_the_partial_reply(
    talker_gguf: Path, store: ConversationStore
) -> None:
    app = StarlingApp(model=str(talker_gguf), store=store, n_ctx=4096)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        # A reply that runs to the end of the 4096-token window unless stopped.
        s.settings = s.settings.with_sampling(max_tokens=4096, temperature=0.0)
        s.query_one("#input", TextArea).text = "Go on and on"
        await pilot.press("enter")
        await until(pilot, lambda: s.reply_view is not None and bool(s.reply_view.markdown.source))
        assert not s.prompt_input.cursor_blink  # no redraws for a blink while it streams

        def context_used() -> int:
            found = re.search(r"(\d+)/4096 tokens", str(s.status.render()))
            return int(found.group(1)) if found else 0

        # The context meter counts the reply's tokens while it streams.
        prompt_tokens = s._context_base[0]
        await until(pilot, lambda: s.generating and context_used() > prompt_tokens + 20)
        await pilot.press("escape")
        await until(pilot, lambda: not s.generating)
        reply = store.get(store.conversations()[0].id).messages[-1]
        assert reply.incomplete and reply.stop_reason == "cancelled" and reply.content
        assert s.chat.last("assistant").note == "stopped"  # type: ignore[union-attr]


async def test_regenerate_and_edit(eager_gguf: Path, store: ConversationStore) -> None:
    app = StarlingApp(model=str(eager_gguf), store=store, n_ctx=1024)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        await send(pilot, app, "First question")
        cid = store.conversations()[0].id
        first_reply = store.get(cid).messages[-1].id
        await pilot.press("ctrl+g")
        await until(pilot, lambda: last_reply_id(store, cid) > first_reply and not s.generating)
        messages = store.get(cid).messages
        assert [m.role for m in messages] == ["user", "assistant"]
        assert messages[-1].id != first_reply
        await pilot.press("ctrl+l")
        await until(pilot, lambda: isinstance(app.screen, TextScreen))
        app.screen.query_one(TextArea).text = "Edited question"
        second_reply = last_reply_id(store, cid)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: last_reply_id(store, cid) > second_reply and not s.generating)
        messages = store.get(cid).messages
        assert (messages[0].role, messages[0].content) == ("user", "Edited question")
        assert len(messages) == 2 and roles(app) == ["user", "assistant"]


async def test_switch_search_and_restart(eager_gguf: Path, store: ConversationStore) -> None:
    other = store.create()
    store.add_message(other.id, "user", "Tell me about alpacas")
    store.add_message(other.id, "assistant", "Alpacas are *fluffy*.")
    app = StarlingApp(model=str(eager_gguf), store=store, n_ctx=1024)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        await send(pilot, app, "Hello llamas")
        items = list(s.query(ConversationItem))
        assert len(items) == 2
        s.post_message(type(s.query_one("#sidebar")).Selected(other.id))  # type: ignore[attr-defined]
        await until(pilot, lambda: s.conversation is not None and s.conversation.id == other.id)
        assert [v.markdown.source for v in s.query(MessageView)] == [
            "Tell me about alpacas",
            "Alpacas are *fluffy*.",
        ]
        s.query_one("#search", Input).value = "alpaca"
        await until(pilot, lambda: len(list(s.query(ConversationItem))) == 1)
        assert next(iter(s.query(ConversationItem))).conversation_id == other.id
    llama = next(c for c in store.conversations() if c.title == "Hello llamas")
    again = StarlingApp(
        model=str(eager_gguf),
        store=ConversationStore(store.path),
        n_ctx=1024,
        conversation_id=llama.id,
    )
    async with again.run_test(size=SIZE) as pilot:
        s = await ready(pilot, again)
        assert len(list(s.query(ConversationItem))) == 2
        assert [v.role for v in s.query(MessageView)] == ["user", "assistant"]
        assert s.query(MessageView).first().markdown.source == "Hello llamas"


async def test_mode_system_and_prompt_view(eager_gguf: Path, store: ConversationStore) -> None:
    app = StarlingApp(model=str(eager_gguf), store=store, n_ctx=1024)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        await send(pilot, app, "Sort a list")
        cid = store.conversations()[0].id
        await pilot.press("ctrl+t")
        assert store.get(cid).mode == "code" and "mode code" in str(s.status.render())
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, TextScreen))
        app.screen.query_one(TextArea).text = "Be terse."
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen))
        assert store.get(cid).system == "Be terse."
        await pilot.press("f4")
        await until(pilot, lambda: isinstance(app.screen, PromptScreen))
        shown = app.screen
        assert isinstance(shown, PromptScreen)
        assert shown.text.startswith(
            "<s>Be terse.<|end_of_turn|>Code User: Sort a list<|end_of_turn|>"
        )
        assert shown.text.endswith("Code User: …<|end_of_turn|>Code Assistant:")
        assert shown.tokens > 10


async def test_no_model_says_how_to_get_one(
    store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textual.widgets import Button

    from starling_local.tui.screens.models import DEFAULT_DOWNLOAD, ModelsScreen

    asked: list[str] = []  # the download itself (4.4 GB) is tested in test_terminal.py
    monkeypatch.setattr(ModelsScreen, "start_download", lambda self, name: asked.append(name))
    app = StarlingApp(model=None, store=store)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: screen(app).model_error is not None)
        notice = screen(app).chat.last("notice")
        assert notice is not None
        await until(pilot, lambda: "starling pull" in notice.markdown.source)
        button = screen(app).query_one("#get-default", Button)
        label = str(button.label)
        assert "Starling-LM-7B-alpha Q4_K_M" in label and "free" in label
        await pilot.click("#get-default")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen))
        assert asked == [DEFAULT_DOWNLOAD]
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen))
        box = screen(app).query_one("#input", TextArea)
        box.focus()
        box.text = "Hello?"
        await pilot.press("enter")
        await until(pilot, lambda: any("no model yet" in n.message for n in app._notifications))
        assert box.text == "Hello?"  # kept for when a model is there: nothing was sent
        assert store.conversations() == []  # nothing half-saved without a model


async def test_quit_while_a_reply_streams(talker_gguf: Path, store: ConversationStore) -> None:
    """Ctrl+Q mid-reply: the reply stops, is saved marked stopped, then llama.cpp is freed
    (closing it under the generating thread was a SIGSEGV)."""
    app = StarlingApp(model=str(talker_gguf), store=store, n_ctx=4096)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        s.settings = s.settings.with_sampling(max_tokens=4000, temperature=0.0)
        s.query_one("#input", TextArea).text = "Go on and on"
        await pilot.press("enter")
        await until(pilot, lambda: s.reply_view is not None and bool(s.reply_view.markdown.source))
        await pilot.press("ctrl+q")
    assert app.return_code in (0, None)
    engine = app.service.engine
    assert engine is not None and engine.closed
    reply = store.get(store.conversations()[0].id).messages[-1]
    assert reply.role == "assistant" and reply.content
    assert reply.incomplete and reply.stop_reason == "cancelled"


async def test_no_store_write_on_the_ui_thread(
    eager_gguf: Path, store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sending, regenerating, editing, renaming, settings, mode and deleting all write the store
    from worker threads: a writer waiting on another process's lock never freezes the UI."""
    writers: list[str] = []
    original = ConversationStore._write

    def spy(self: ConversationStore) -> Any:
        writers.append(threading.current_thread().name)
        assert threading.current_thread() is not threading.main_thread(), "store write on UI"
        return original(self)

    monkeypatch.setattr(ConversationStore, "_write", spy)
    app = StarlingApp(model=str(eager_gguf), store=store, n_ctx=1024)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        await send(pilot, app, "Hello there")
        cid = store.conversations()[0].id
        before = len(writers)
        await pilot.press("ctrl+g")
        await until(pilot, lambda: len(writers) > before + 2 and not s.generating)
        await pilot.press("ctrl+l")
        await until(pilot, lambda: isinstance(app.screen, TextScreen))
        app.screen.query_one(TextArea).text = "Edited"
        await pilot.press("ctrl+s")
        await until(
            pilot, lambda: store.get(cid).messages[0].content == "Edited" and not s.generating
        )
        await until(pilot, lambda: not s.generating)
        await pilot.press("ctrl+t")
        await until(pilot, lambda: store.get(cid).mode == "code")
        await pilot.press("ctrl+r")
        await until(pilot, lambda: isinstance(app.screen, TextScreen))
        app.screen.query_one(Input).value = "Renamed"
        await pilot.press("enter")
        await until(pilot, lambda: store.get(cid).title == "Renamed")
        await pilot.press("f8")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.click("#yes")
        await until(pilot, lambda: store.conversations() == [])
    assert len(writers) > 8 and "MainThread" not in writers


def test_main_screen_snapshot(
    snap_compare: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STARLING_HOME", str(tmp_path / "home"))
    # The first-run download button says how much disk is free: the same on every machine here.
    monkeypatch.setattr("starling_local.files.free_bytes", lambda directory: 100 << 30)
    app = StarlingApp(model=None, store=ConversationStore(tmp_path / "snap.db"))

    async def settle(pilot: Any) -> None:
        await until(pilot, lambda: screen(app).model_error is not None)
        # A blinking cursor is on or off depending on when the picture is taken.
        screen(app).query_one("#input", TextArea).cursor_blink = False
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=SIZE, run_before=settle)


async def test_the_theme_is_kept(store: ConversationStore, starling_home: Path) -> None:
    app = StarlingApp(model=None, store=store)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: screen(app).model_error is not None)
        assert app.theme != "nord"
        app.theme = "nord"  # what the palette's "Change theme" does
        await pilot.pause()
    config = json.loads((starling_home / "config" / "config.json").read_text())
    assert config["theme"] == "nord"
    again = StarlingApp(model=None, store=store)
    async with again.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert again.theme == "nord"


async def test_message_actions_copy_branch_and_delete(
    eager_gguf: Path, store: ConversationStore
) -> None:
    conv = store.create(title="Sorting")
    store.add_message(conv.id, "user", "Sort a list")
    store.add_message(
        conv.id, "assistant", "Two ways:\n\n```python\nsorted(xs)\n```\n\n```python\nxs.sort()\n```"
    )
    store.add_message(conv.id, "user", "Which is faster?")
    store.add_message(conv.id, "assistant", "The second, in place.")
    app = StarlingApp(model=str(eager_gguf), store=store, n_ctx=1024, conversation_id=conv.id)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        await pilot.press("ctrl+up")  # from the message box to the last message
        assert isinstance(app.focused, MessageView) and app.focused.role == "assistant"
        await pilot.press("up", "up")  # the first reply
        await pilot.press("2")
        assert app.clipboard == "xs.sort()\n"
        await pilot.press("c")
        assert app.clipboard.startswith("Two ways:")
        await pilot.press("escape")  # back to typing
        assert app.focused is s.query_one("#input", TextArea)
        first = s.query(MessageView).first()
        await pilot.click(first)  # the mouse selects a message too
        assert app.focused is first
        await pilot.press("c")
        assert app.clipboard == "Sort a list"
        await pilot.press("escape")
        await pilot.press("ctrl+up", "up", "up")
        await pilot.press("b")  # branch here: the first question and its reply
        await until(pilot, lambda: s.conversation is not None and s.conversation.id != conv.id)
        branch = store.get(s.conversation.id)  # type: ignore[union-attr]
        assert branch.parent_id == conv.id and len(branch.messages) == 2
        titles = [str(i.query_one(".title", Label).render()) for i in s.query(ConversationItem)]
        assert titles[titles.index("Sorting") + 1] == "↳ Sorting (branch)"  # under its parent
        s.post_message(Sidebar.Selected(conv.id))
        await until(pilot, lambda: s.conversation is not None and s.conversation.id == conv.id)
        await pilot.press("ctrl+up", "d")  # delete the last pair
        await until(pilot, lambda: app.focused is s.query_one("#input", TextArea))
        assert len(store.get(conv.id).messages) == 2
        assert [v.role for v in s.query(MessageView)] == ["user", "assistant"]


async def test_attach_a_file_and_import_in_the_app(
    eager_gguf: Path, store: ConversationStore, tmp_path: Path
) -> None:
    code = tmp_path / "sort.py"
    code.write_text("def sort(xs):\n    return sorted(xs)\n")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01")
    export = tmp_path / "messages.json"
    export.write_text(
        json.dumps(
            [{"role": "user", "content": "Imported hello"}, {"role": "assistant", "content": "Hi"}]
        )
    )
    app = StarlingApp(model=str(eager_gguf), store=store, n_ctx=1024)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        box = s.query_one("#input", TextArea)
        box.text = "Add type hints"
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, FileScreen) and app.screen.query("#path"))
        app.screen.query_one("#path", Input).value = str(code)
        await pilot.press("enter")
        await until(pilot, lambda: "```python" in box.text)
        assert box.text.startswith("Add type hints\n\n`sort.py`:\n```python\ndef sort(xs):")
        assert any("tokens" in n.message for n in app._notifications)
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, FileScreen) and app.screen.query("#path"))
        app.screen.query_one("#path", Input).value = str(binary)
        await pilot.press("enter")
        await until(pilot, lambda: any("binary" in n.message for n in app._notifications))
        assert "blob" not in box.text
        await s.run_action("import")  # also in the command palette
        await until(pilot, lambda: isinstance(app.screen, FileScreen) and app.screen.query("#path"))
        app.screen.query_one("#path", Input).value = str(export)
        await pilot.press("enter")
        await until(pilot, lambda: any(c.title == "Imported hello" for c in store.conversations()))
        await until(pilot, lambda: any("Imported hello" in str(i.render()) for i in s.query(Label)))


async def test_models_screen_uses_defaults_and_deletes(
    tiny_q4: Path, eager_gguf: Path, store: ConversationStore, tmp_path: Path
) -> None:
    import shutil

    from starling_local.acquire.library import ModelLibrary
    from starling_local.tui.screens.models import ModelsScreen

    library = ModelLibrary()
    for source, name in ((tiny_q4, "tiny"), (eager_gguf, "eager")):
        copy = tmp_path / f"{name}.gguf"
        shutil.copyfile(source, copy)
        library.register(copy, name=name, source="local")
    app = StarlingApp(model="tiny", store=store, n_ctx=1024)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        first_engine = app.service.engine
        await pilot.press("f5")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen))
        models = app.screen
        assert isinstance(models, ModelsScreen)
        table = models.query_one(DataTable)
        names = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        assert "starling-lm-7b-alpha:Q4_K_M" in names and "starling-lm-7b-beta:Q8_0" in names
        assert names[-2:] == ["tiny", "eager"]
        statuses = {
            str(table.get_row_at(i)[0]): str(table.get_row_at(i)[2]) for i in range(len(names))
        }
        assert statuses["starling-lm-7b-alpha:Q4_K_M"] == "—" and statuses["eager"] == "here"
        table.move_cursor(row=names.index("eager"))
        await pilot.press("s")
        assert library.default_name() == "eager"
        await pilot.press("u")  # switch the running model, in the background
        await until(pilot, lambda: isinstance(app.screen, ChatScreen))
        await until(pilot, lambda: app.service.engine is not first_engine and s.model_ready)
        assert "eager.gguf" in str(s.status.render())
        assert first_engine is not None and first_engine.closed  # the old one was freed
        await send(pilot, app, "Hello after the switch")
        reply = store.get(store.conversations()[0].id).messages[-1]
        assert reply.role == "assistant" and reply.stop_reason == "end_of_turn"
        await pilot.press("f5")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen))
        table = app.screen.query_one(DataTable)
        table.move_cursor(row=names.index("tiny"))
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.click("#yes")
        await until(pilot, lambda: library.find("tiny") is None)
        assert (tmp_path / "tiny.gguf").exists()  # registered from the user's folder: kept


def _snapshot_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[StarlingApp, Any]:
    monkeypatch.setenv("STARLING_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("starling_local.files.free_bytes", lambda directory: 100 << 30)
    store = ConversationStore(tmp_path / "snap.db")
    app = StarlingApp(model=None, store=store)
    return app, store


def test_models_screen_snapshot(
    snap_compare: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _ = _snapshot_app(tmp_path, monkeypatch)

    async def open_models(pilot: Any) -> None:
        await until(pilot, lambda: screen(app).model_error is not None)
        await pilot.press("f5")
        await until(pilot, lambda: app.screen.query("#model-table"))
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=SIZE, run_before=open_models)


def test_branch_and_attached_file_snapshot(
    snap_compare: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, store = _snapshot_app(tmp_path, monkeypatch)
    parent = store.create(title="Sorting")
    store.add_message(parent.id, "user", "Sort a list")
    store.add_message(parent.id, "assistant", "Use `sorted(xs)`.")
    branch = store.insert(
        replace(
            store.get(parent.id),
            id=0,
            title="Sorting (branch)",
            parent_id=parent.id,
            created="2026-01-01T00:00:00",
            updated="",
        )
    )
    with sqlite3.connect(store.path) as db:  # fixed times: the sidebar shows them
        db.execute("UPDATE conversations SET updated = '2026-01-01T10:00:00'")
    assert branch.parent_id == parent.id
    code = tmp_path / "sort.py"
    code.write_text("def sort(xs):\n    return sorted(xs)\n")

    async def attach(pilot: Any) -> None:
        await until(pilot, lambda: screen(app).model_error is not None)
        box = screen(app).query_one("#input", TextArea)
        from starling_local.chat.attachments import with_files

        box.text = with_files("Add type hints", [code])
        box.cursor_blink = False
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=SIZE, run_before=attach)


async def test_speculative_decoding_toggle_reloads_and_is_kept(
    distinct_q8: Path, store: ConversationStore, starling_home: Path
) -> None:
    """The palette's toggle turns speculative decoding on (the model reloads with flash
    attention and a q8_0 KV cache, which make it exact on a CPU), the status shows the drafts
    kept, and the choice is saved for the next start."""
    from starling_local.config import preferences
    from starling_local.engine.runtime import Engine

    app = StarlingApp(model=str(distinct_q8), store=store, n_ctx=2048)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        first = app.service.engine
        assert isinstance(first, Engine) and not first.speculate and not first.flash_attn
        s.action_toggle_speculate()
        await until(pilot, lambda: app.service.engine is not first and s.model_ready)
        engine = app.service.engine
        assert isinstance(engine, Engine) and engine.speculate and engine.flash_attn
        assert engine.kv_type == ("q8_0" if engine.backend == "CPU" else "f16")
        assert preferences().speculate is True
        s.settings = s.settings.with_sampling(temperature=0.0, max_tokens=200)
        await send(pilot, app, "1 2 3 4 5 1 2 3 4 5 1 2 3 4 5 1 2 3")
        await until(pilot, lambda: "drafts" in str(s.status.render()))
        assert "accepted" in str(s.status.render())
    again = StarlingApp(model=str(distinct_q8), store=store, n_ctx=2048)
    async with again.run_test(size=SIZE) as pilot:
        await ready(pilot, again)
        engine = again.service.engine
        assert isinstance(engine, Engine) and engine.speculate


def test_redraws_are_spaced_by_what_they_cost() -> None:
    from starling_local.tui.streaming import (
        BUSY_BUDGET,
        FREE_BUDGET,
        MAX_INTERVAL_S,
        MIN_INTERVAL_S,
        RenderPacer,
        cpus_available,
        render_budget,
    )

    def burn(seconds: float) -> None:  # CPU time on this (the "UI") thread
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    assert render_budget(cpus_available()) == BUSY_BUDGET  # llama.cpp uses every core
    assert render_budget(0) == FREE_BUDGET  # a GPU or a remote engine generates
    busy, free = RenderPacer(BUSY_BUDGET), RenderPacer(FREE_BUDGET)
    assert busy.interval == MIN_INTERVAL_S  # the first text shows at once
    for pacer in (busy, free):
        pacer.drawn()
        burn(0.02)
        pacer.drawn()
    # 20 ms a redraw within 1.5% of a core: one every 1.3 s; with a core to spare, 10 a second.
    assert 0.6 < busy.interval <= MAX_INTERVAL_S
    assert free.interval == MIN_INTERVAL_S
    burn(0.2)
    busy.drawn()
    assert busy.interval == MAX_INTERVAL_S


async def test_continue_extends_a_cut_reply_in_place(
    talker_gguf: Path, store: ConversationStore
) -> None:
    from starling_local.chat.template import Message, render_tokens
    from starling_local.engine.runtime import Engine
    from starling_local.engine.types import SamplingParams

    app = StarlingApp(model=str(talker_gguf), store=store, n_ctx=1024)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        s.settings = s.settings.with_sampling(temperature=0.0, max_tokens=6)
        await pilot.press("f9")  # nothing to continue yet: a notice, no reply
        assert not s.generating
        await send(pilot, app, "Tell me a story")
        cid = store.conversations()[0].id
        cut = store.get(cid).messages[-1]
        assert cut.stop_reason == "length" and cut.tokens and len(cut.tokens) == 6
        await pilot.press("f9")
        await until(
            pilot, lambda: len(store.get(cid).messages[-1].tokens or ()) == 12 and not s.generating
        )
        grown = store.get(cid).messages[-1]
        assert grown.id == cut.id and grown.content.startswith(cut.content)
        assert roles(app) == ["user", "assistant"]  # the same message, longer
        view = s.chat.last("assistant")
        assert view is not None and view.markdown.source == grown.content
        assert ("Continue reply", "continue_reply") in [(t, a) for t, _, a in COMMANDS]
    # Greedy decoding of 12 tokens in one go gives the same ids: the continuation was exact.
    engine = Engine(talker_gguf, n_ctx=1024)
    try:
        prompt = render_tokens([Message("user", "Tell me a story")], engine.tokenize_text)
        whole = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12))
        whole.consume()
    finally:
        engine.close()
    assert tuple(whole.token_ids) == grown.tokens


async def test_a_conversation_deleted_elsewhere_keeps_the_typed_message(
    eager_gguf: Path, store: ConversationStore
) -> None:
    app = StarlingApp(model=str(eager_gguf), store=store, n_ctx=1024)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        await send(pilot, app, "First question")
        cid = store.conversations()[0].id
        other = ConversationStore(store.path)  # another process's view of the same file
        other.delete(cid)
        other.close()
        box = s.query_one("#input", TextArea)
        box.text = "My carefully typed follow-up"
        await pilot.press("enter")
        await until(pilot, lambda: box.text == "My carefully typed follow-up" and not s.generating)
        assert app.is_running and s.conversation is None  # the next send starts a new one
        await pilot.press("enter")
        await until(pilot, lambda: bool(store.conversations()) and not s.generating)
        (conv,) = [store.get(c.id) for c in store.conversations()]
        assert conv.messages[0].content == "My carefully typed follow-up"
