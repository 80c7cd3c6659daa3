"""Folding what scrolled away while a reply streams: real Textual widgets, laid out headless."""

from __future__ import annotations

from pathlib import Path

from textual.app import App, ComposeResult
from textual.widgets import Markdown, TextArea

from starling_local.bench.tui import markdown_document
from starling_local.store.conversations import ConversationStore
from starling_local.tui.app import StarlingApp
from starling_local.tui.screens.chat import ChatScreen
from starling_local.tui.widgets.chat_view import ChatView, MessageView
from starling_local.tui.widgets.fold import MIN_FOLD, Fold
from tests.test_tui import until


class ChatApp(App[None]):
    CSS_PATH = "../starling_local/tui/starling.tcss"  # messages get their real (auto) height

    def compose(self) -> ComposeResult:
        yield ChatView(id="chat")


def displayed(app: App[None]) -> int:
    """Widgets a layout places (displayed, and so are all their containers)."""
    return sum(
        1
        for w in app.screen.walk_children()
        if w.display and all(a.display for a in w.ancestors if hasattr(a, "display"))
    )


def layout_of(chat: ChatView, reply: MessageView) -> tuple[object, ...]:
    blocks = list(reply.markdown.children)
    return (
        chat.scroll_y,
        chat.max_scroll_y,
        chat.virtual_size,
        reply.virtual_region,
        blocks[-1].virtual_region,
    )


async def test_what_scrolled_away_is_folded_then_shown_unchanged() -> None:
    app = ChatApp()
    async with app.run_test(size=(100, 30)) as pilot:
        chat = app.query_one(ChatView)
        for i in range(6):
            await chat.add("user" if i % 2 == 0 else "assistant", markdown_document(3))
        reply = await chat.add("assistant", "")
        await reply.markdown.append(markdown_document(20))
        chat.scroll_end(animate=False, immediate=True)
        await pilot.pause(0.1)
        before, shown_before = layout_of(chat, reply), displayed(app)
        assert chat.is_vertical_scroll_end

        chat.fold_above_view(reply)
        await pilot.pause(0.1)
        folds = list(chat.query(Fold))
        assert len(folds) == 2  # one for the earlier messages, one in the reply
        assert all(f.hidden for f in folds)
        assert sum(isinstance(v, MessageView) and not v.display for v in chat.children) == 6
        assert displayed(app) < shown_before / 3  # what a layout now walks
        assert layout_of(chat, reply) == before  # nothing moved: not the view, not the scrollbar

        # More text keeps streaming in; folding again hides what newly scrolled away.
        await reply.markdown.append("\n" + markdown_document(5))
        chat.scroll_end(animate=False, immediate=True)
        await pilot.pause(0.1)
        chat.fold_above_view(reply)
        await pilot.pause(0.1)
        grown = layout_of(chat, reply)

        # The user scrolls up: everything is back, where it was.
        chat.scroll_home(animate=False, immediate=True)
        await pilot.pause(0.1)
        assert not chat.query(Fold)
        assert all(w.display for w in chat.query(MessageView))
        assert all(w.display for w in reply.markdown.children)
        chat.scroll_end(animate=False, immediate=True)
        await pilot.pause(0.1)
        assert layout_of(chat, reply) == grown


async def test_nothing_is_folded_while_the_user_reads_above() -> None:
    app = ChatApp()
    async with app.run_test(size=(100, 30)) as pilot:
        chat = app.query_one(ChatView)
        for _ in range(4):
            await chat.add("user", markdown_document(3))
        reply = await chat.add("assistant", markdown_document(10))
        chat.scroll_home(animate=False, immediate=True)
        await pilot.pause(0.1)
        chat.fold_above_view(reply)
        await pilot.pause(0.1)
        assert not chat.query(Fold)
        # Selecting a message shows everything too.
        chat.scroll_end(animate=False, immediate=True)
        await pilot.pause(0.1)
        chat.fold_above_view(reply)
        await pilot.pause(0.1)
        assert chat.query(Fold)
        reply.focus()
        await pilot.pause(0.1)
        assert not chat.query(Fold)
        # So does a narrower window (what is folded would wrap to another height).
        app.set_focus(None)
        chat.scroll_end(animate=False, immediate=True)
        await pilot.pause(0.1)
        chat.fold_above_view(reply)
        await pilot.pause(0.1)
        assert chat.query(Fold)
        await pilot.resize_terminal(80, 30)
        await pilot.pause(0.2)
        assert not chat.query(Fold)
        assert isinstance(reply.markdown, Markdown)


async def test_a_streaming_reply_folds_the_history_and_shows_it_when_done(
    talker_gguf: Path, tmp_path: Path
) -> None:
    """The real app and engine: while a long reply streams below a long conversation, the
    messages above the view are folded; when it ends, all of them are there again."""
    store = ConversationStore(tmp_path / "fold.db")
    conv = store.create(title="long")
    for i in range(8):
        store.add_message(conv.id, "user" if i % 2 == 0 else "assistant", markdown_document(2))
    app = StarlingApp(model=str(talker_gguf), conversation_id=conv.id, store=store, n_ctx=4096)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model_ready)
        s = app.screen
        assert isinstance(s, ChatScreen)
        s.settings = s.settings.with_sampling(max_tokens=3000, temperature=0.0)
        s.query_one("#input", TextArea).text = "Go on and on"
        await pilot.press("enter")
        await until(pilot, lambda: bool(s.chat.query(Fold)) or not s.generating)
        assert s.generating, "the reply ended before anything was folded"
        fold = s.chat.query_one(Fold)
        assert len(fold.hidden) >= MIN_FOLD
        assert all(not v.display for v in fold.hidden)
        await pilot.press("escape")
        await until(pilot, lambda: not s.generating)
        await pilot.pause(0.1)
        assert not s.chat.query(Fold)
        views = list(s.chat.query(MessageView))
        assert len(views) == 10 and all(v.display for v in views)
    store.close()
