"""The app's reply logic on the scripted engine (the fast tier): what is shown, what is saved,
and which stored message each view stands for."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from textual.widgets import TextArea

from starling_local.chat.engines import EngineSpec
from starling_local.engine.interface import EngineLike
from starling_local.store.conversations import ConversationStore
from starling_local.tui.app import StarlingApp
from starling_local.tui.widgets.chat_view import MessageView
from tests.scripted import Script, ScriptedEngine
from tests.test_tui import SIZE, ready, screen, send, until


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ConversationStore]:
    store = ConversationStore(tmp_path / "tui.db")
    yield store
    store.close()


def app_on(scripted: ScriptedEngine, store: ConversationStore) -> StarlingApp:
    def opener(
        spec: EngineSpec, progress: Callable[[float], None] | None
    ) -> tuple[EngineLike, str]:
        return scripted, "scripted-starling"

    return StarlingApp(store=store, opener=opener)


def views(app: StarlingApp) -> list[MessageView]:
    return [v for v in screen(app).query(MessageView) if v.role != "notice"]


async def test_each_view_knows_the_stored_message_it_shows(
    scripted: ScriptedEngine, store: ConversationStore
) -> None:
    """Two turns: the user messages and the replies shown carry their stored ids (from the
    reply's start, not by matching views to messages by position)."""
    scripted.then(" First reply.", " Second reply.")
    app = app_on(scripted, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "Hello")
        await send(pilot, app, "And then?")
        conv = store.get(store.conversations()[0].id)
        assert [(m.role, m.content) for m in conv.messages] == [
            ("user", "Hello"),
            ("assistant", "First reply."),
            ("user", "And then?"),
            ("assistant", "Second reply."),
        ]
        assert [v.message_id for v in views(app)] == [m.id for m in conv.messages]


async def test_a_failure_mid_reply_keeps_what_came_and_says_why(
    scripted: ScriptedEngine, store: ConversationStore
) -> None:
    scripted.then(Script(" one two three four five", fail_after=2))
    app = app_on(scripted, store)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        await send(pilot, app, "Count")
        reply = store.get(store.conversations()[0].id).messages[-1]
        assert reply.incomplete and reply.stop_reason == "error" and reply.content
        assert s.chat.last("assistant").note  # type: ignore[union-attr]
        assert not s.generating and s.query_one("#input", TextArea).text == ""


async def test_escape_stops_a_reply_and_keeps_it_marked_stopped(
    scripted: ScriptedEngine, store: ConversationStore
) -> None:
    gate = threading.Event()
    held = Script(" a long reply that is stopped", gate=gate)
    scripted.then(held)
    app = app_on(scripted, store)
    async with app.run_test(size=SIZE) as pilot:
        s = await ready(pilot, app)
        s.query_one("#input", TextArea).text = "Go on"
        await pilot.press("enter")
        await until(pilot, held.started.is_set)
        await pilot.press("escape")
        gate.set()
        await until(pilot, lambda: not s.generating)
        reply = store.get(store.conversations()[0].id).messages[-1]
        assert reply.role == "assistant" and reply.stop_reason == "cancelled"
        assert s.chat.last("assistant").note == "stopped"  # type: ignore[union-attr]


async def test_f6_and_f7_copy_while_the_message_box_has_focus(
    scripted: ScriptedEngine, store: ConversationStore
) -> None:
    """Textual's TextArea binds F6 (select line) and F7 (select all); the message box always
    has focus, so the app's copy keys must come first."""
    scripted.then(" Here:\n\n```python\nprint(1)\n```\n")
    app = app_on(scripted, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "Code please")
        box = screen(app).query_one(TextArea)
        box.focus()
        await pilot.pause()
        assert app.focused is box
        await pilot.press("f6")
        await pilot.pause()
        assert app.clipboard.startswith("Here:") and "print(1)" in app.clipboard
        await pilot.press("f7")
        await pilot.pause()
        assert app.clipboard == "print(1)\n"


async def test_typed_lines_search_matches_and_the_edit_cursor_show_as_typed(
    scripted: ScriptedEngine, store: ConversationStore
) -> None:
    """A two-line message shows on two lines; a search snippet keeps its matched word (the
    store marks it `[word]`, which Rich would take for markup); Ctrl+L's editor opens with the
    cursor after the text."""
    from textual.widgets import Label
    from textual.widgets._markdown import MarkdownParagraph

    from starling_local.tui.screens.dialogs import TextScreen
    from starling_local.tui.widgets.sidebar import ConversationItem

    scripted.then(" Sure.", " Again.")
    app = app_on(scripted, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "line one\nline two about quicksort")
        mine = next(v for v in views(app) if v.role == "user")
        await until(pilot, lambda: bool(mine.query(MarkdownParagraph)))
        await pilot.pause()
        assert mine.query_one(MarkdownParagraph).size.height == 2
        await screen(app).refresh_sidebar("quicksort")
        await pilot.pause()
        item = screen(app).query(ConversationItem).first()
        detail = item.query(Label).last()
        assert "[quicksort]" in str(detail.render())
        await pilot.press("ctrl+l")
        await until(pilot, lambda: isinstance(app.screen, TextScreen))
        editor = app.screen.query_one(TextArea)
        assert editor.cursor_location == editor.document.end
