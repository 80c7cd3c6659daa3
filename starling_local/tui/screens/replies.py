"""Streaming a reply onto the chat screen: the worker that runs it through the conversation
service, and the messages it posts (started, text, done)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from textual import work
from textual.widgets import Markdown

from starling_local.chat.service import ReplyHooks
from starling_local.errors import StarlingError
from starling_local.store.models import Conversation
from starling_local.tui.messages import ReplyChunk, ReplyDone, ReplyStarted
from starling_local.tui.screens.commands import ConversationCommands
from starling_local.tui.streaming import ChunkBatcher, RenderPacer, render_budget
from starling_local.tui.widgets.chat_view import NOTES, MessageView

if TYPE_CHECKING:
    from starling_local.tui.widgets.chat_view import ChatView
    from starling_local.tui.widgets.prompt_input import PromptInput


class ReplyStreaming(ConversationCommands):
    """Replies: started by the chat screen, streamed here."""

    reply_view: MessageView | None
    md_stream: Any
    reshow: bool
    reply_overrides: dict[str, Any]
    render_lag_s: float | None
    pacer: RenderPacer
    _status_at: float
    _context_base: tuple[int, int]

    if TYPE_CHECKING:

        @property
        def chat(self) -> ChatView: ...

        @property
        def prompt_input(self) -> PromptInput: ...

    def can_reply(self) -> bool:
        if self.generating:
            self.notify("Still replying: wait, or press Escape to stop.")
        elif not self.model_ready:
            self.notify(self.model_error or "The model is still loading.", severity="warning")
        return not self.generating and self.model_ready

    def start_reply(
        self,
        prepare: Callable[[], Conversation],
        reshow: bool = False,
        draft: str | None = None,
    ) -> None:
        """Commit what `prepare` does, then stream the reply. `draft` is the typed message
        `prepare` commits: should that fail, it returns to the message box."""
        self.generating = True
        self.reshow = reshow
        self.status.set(state="replying… (Esc stops)", speed="")
        engine = self.service.engine
        self.pacer = RenderPacer(render_budget(engine.cpu_threads if engine else 0))
        self.prompt_input.cursor_blink = False  # a blink is a redraw too
        self.run_reply(prepare, self.pacer, draft)

    async def on_reply_started(self, message: ReplyStarted) -> None:
        start = message.start
        assert start.conversation_id is not None
        before = self.conversation  # as shown: a continued reply's text before it grows
        if self.reshow or self.cid != start.conversation_id:
            self.conversation = self.service.get(start.conversation_id)
            if self.reshow:
                await self.open_conversation(self.conversation, hide=start.message_id)
        # A continued reply keeps its text: the stream extends it.
        extended = next(
            (
                m.content.rstrip()
                for m in (before.messages if before else [])
                if m.id == start.message_id and m.role == "assistant"
            ),
            "",
        )
        if message.user_message_id is not None:  # the message just sent learns its id
            views = [v for v in self.chat.query(MessageView) if v.role == "user"]
            if views and views[-1].message_id is None:
                views[-1].message_id = message.user_message_id
        self.reply_view = await self.chat.add("assistant", extended, message_id=start.message_id)
        self._context_base = (start.prompt_tokens, start.n_ctx)
        self.md_stream = Markdown.get_stream(self.reply_view.markdown)
        if start.dropped_messages:
            self.reply_view.set_note(f"{start.dropped_messages} oldest messages left out")
            self.notify(
                f"The conversation is longer than the {start.n_ctx}-token context: the "
                f"{start.dropped_messages} oldest messages were left out of the prompt "
                "(not deleted)."
            )
        await self.refresh_sidebar()

    async def on_reply_chunk(self, message: ReplyChunk) -> None:
        self.pacer.drawn()
        if self.md_stream is not None:
            await self.md_stream.write(message.text)
        if self.reply_view is not None:  # what scrolled away costs no layout time
            self.call_after_refresh(self._fold_while_streaming, self.reply_view)
        now = time.monotonic()
        if now - self._status_at >= 0.5:
            self._status_at = now
            used, n_ctx = self._context_base
            self.status.set(
                speed=f"{message.tokens_per_s:.1f} tok/s",
                context=f"{used + message.tokens}/{n_ctx} tokens",  # live while it streams
            )

    def _speculating(self) -> bool:
        engine = self.service.engine
        return engine is not None and engine.speculate

    def _fold_while_streaming(self, view: MessageView) -> None:
        if view is self.reply_view:  # not once the reply has ended (and everything unfolded)
            self.chat.fold_above_view(view)

    async def on_reply_done(self, message: ReplyDone) -> None:
        if self.md_stream is not None:
            await self.md_stream.stop()
            self.md_stream = None
        self.chat.unfold()
        outcome, view = message.outcome, self.reply_view
        if message.unsent is not None:
            await self._restore_unsent(message.unsent, message.error or "")
            return
        if outcome is None:
            await self.chat.add("notice", f"**The reply failed:** {message.error}")
        elif view is not None:
            reason = "error" if outcome.error else outcome.stats.stop_reason
            dropped = (
                f"{outcome.dropped_messages} oldest left out" if outcome.dropped_messages else ""
            )
            view.set_note(", ".join(filter(None, [NOTES.get(reason, ""), dropped])))
            if outcome.error:
                self.notify(outcome.error, severity="error")
            for warning in outcome.warnings:
                self.notify(warning, severity="warning")
        self.generating = False
        self.prompt_input.cursor_blink = True
        self.reply_view = None
        tps = outcome.stats.decode_tokens_per_s if outcome else 0.0
        speed = f"{tps:.1f} tok/s" if tps else ""
        st = outcome.stats if outcome is not None else None
        if st is not None and st.draft_tokens:
            speed += f", drafts {st.accepted_tokens}/{st.draft_tokens} accepted"
        elif st and st.completion_tokens and not st.draft_limit and self._speculating():
            speed += ", no drafts: batches are not exact here"
        self.status.set(state="", speed=speed)
        self.render_lag_s = time.perf_counter() - message.generated_at
        if self.cid is not None:
            try:
                self.conversation = self.service.get(self.cid)
            except StarlingError as exc:  # deleted by another process meanwhile
                self.notify(str(exc), severity="warning")
                await self.open_conversation(None)
                return
        self.update_context()
        await self.refresh_sidebar()

    async def _restore_unsent(self, text: str, error: str) -> None:
        """The message was not saved: back into the box, with the reason."""
        self.generating = False
        self.prompt_input.cursor_blink = True
        self.status.set(state="")
        views = [v for v in self.chat.query(MessageView) if v.role == "user"]
        if views and views[-1].message_id is None:
            await views[-1].remove()
        self.prompt_input.text = text
        self.prompt_input.focus()
        gone = self.cid is not None and not self._exists(self.cid)
        if gone:
            # Deleted by another process: the next send starts a new conversation.
            await self.open_conversation(None)
            await self.refresh_sidebar()
            error = "this conversation was deleted elsewhere; send again to start a new one"
        self.notify(f"Your message was not saved ({error}); it is back in the box.",
                    severity="error", timeout=10)  # fmt: skip

    def _exists(self, conversation_id: int) -> bool:
        try:
            self.service.get(conversation_id)
        except StarlingError:
            return False
        return True

    @work(thread=True, exclusive=True, group="reply")
    def run_reply(
        self, prepare: Callable[[], Conversation], pacer: RenderPacer, draft: str | None = None
    ) -> None:
        """Commit what `prepare` does (the user message, a truncation), then the reply."""
        batcher = ChunkBatcher(self.post_message, pacer)
        committed: list[int] = []  # the user message `prepare` commits, if it ends with one
        hooks = ReplyHooks(
            lambda start: self.post_message(ReplyStarted(start, *committed[:1])), batcher.feed
        )
        cid = self.cid
        with contextlib.ExitStack() as held:
            try:
                # One writer per conversation across processes, from the commit to the reply.
                held.enter_context(self.service.writing(cid))
                conv = prepare()
                if conv.messages and conv.messages[-1].role == "user":
                    committed.append(conv.messages[-1].id)
            except Exception as exc:  # nothing was committed: the typed text goes back
                self.post_message(ReplyDone(None, str(exc) or type(exc).__name__, unsent=draft))
                return
            try:
                outcome = self.service.reply(conv.id, hooks=hooks, overrides=self.reply_overrides)
            except Exception as exc:  # shown in the conversation, never a crash of the app
                batcher.flush()
                self.post_message(ReplyDone(None, str(exc) or type(exc).__name__))
                return
        batcher.flush()
        self.post_message(ReplyDone(outcome, outcome.error))
