"""The main screen: sidebar, conversation, message box, status line.

Widgets post messages and worker threads post messages; this screen handles them and is the one
place that talks to the store. Generation and model loading run in thread workers that never
touch a widget.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace
from typing import Any

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Markdown

from starling_local.acquire.library import display_name
from starling_local.chat.conversation import (
    ReplyRecorder,
    params_dict,
    params_of,
    style_of,
    to_messages,
)
from starling_local.chat.session import build_prompt, start_reply
from starling_local.chat.template import (
    Message,
    Mode,
    PromptStyle,
    render_segments,
    segments_to_text,
    segments_to_tokens,
)
from starling_local.engine.runtime import SamplingParams
from starling_local.errors import StarlingError
from starling_local.store.models import Conversation
from starling_local.tui.messages import (
    ModelFailed,
    ModelLoaded,
    ModelLoading,
    ReplyChunk,
    ReplyDone,
    ReplyStarted,
)
from starling_local.tui.screens.dialogs import (
    ConfirmScreen,
    PromptScreen,
    SettingsScreen,
    TextScreen,
)
from starling_local.tui.widgets.chat_view import ChatView, MessageView
from starling_local.tui.widgets.prompt_input import PromptInput
from starling_local.tui.widgets.sidebar import Sidebar
from starling_local.tui.widgets.status import StatusBar

#: The streaming reply is shown at most this often (seconds).
UI_UPDATE_S = 1 / 10


def ui_interval(tail_chars: int) -> float:
    """Seconds between screen updates of a streaming reply whose last paragraph is
    `tail_chars` long: 1/10 s, growing with the paragraph so rendering stays a small cost."""
    return min(1.0, max(UI_UPDATE_S, tail_chars / 30_000))


CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)
NO_MODEL_HELP = """\
**No model yet.** In a terminal, run:

```
starling pull                            # Starling-LM-7B-alpha, Q4_K_M (4.4 GB)
starling pull starling-lm-7b-beta        # or the beta
```

then start `starling` again (or `starling chat --model PATH.gguf` for a file you already have).
"""


class ChatScreen(Screen[None]):
    # Keys the message box (a TextArea) does not use for editing, so they work while typing.
    BINDINGS = [
        Binding("ctrl+n", "new", "New", id="new"),
        Binding("escape", "stop", "Stop", id="stop"),
        Binding("ctrl+g", "regenerate", "Regenerate", id="regenerate"),
        Binding("ctrl+l", "edit_last", "Edit last", id="edit"),
        Binding("ctrl+r", "rename", "Rename", id="rename"),
        Binding("f8", "delete", "Delete", id="delete"),
        Binding("f6", "copy_reply", "Copy reply", id="copy"),
        Binding("f7", "copy_code", "Copy code", id="copy_code", show=False),
        Binding("ctrl+t", "toggle_mode", "Chat/Code", id="mode"),
        Binding("f2", "system_prompt", "System", id="system"),
        Binding("f3", "settings", "Sampling", id="settings"),
        Binding("f4", "show_prompt", "Prompt", id="prompt"),
        Binding("ctrl+s", "export", "Export", id="export", show=False),
        Binding("ctrl+f", "search", "Search", id="search", show=False),
    ]

    def __init__(self, conversation_id: int | None = None) -> None:
        super().__init__()
        self.initial_id = conversation_id
        self.conversation: Conversation | None = None
        self.draft: dict[str, Any] = {"mode": "chat", "system": "", "params": {}}
        self.engine: Any = None
        self.model_error: str | None = None
        self.generating = False
        self.cancel = threading.Event()
        self.recorder: ReplyRecorder | None = None
        self.reply_view: MessageView | None = None
        self.md_stream: Any = None
        self.dropped = 0
        self.kv: Any = None
        self._status_at = 0.0
        self.render_lag_s: float | None = None
        """Last token generated -> whole reply on screen and saved, for the last reply."""

    # --- layout ------------------------------------------------------------------------------

    def compose(self):  # type: ignore[no-untyped-def]
        with Horizontal():
            yield Sidebar(id="sidebar")
            with Vertical(id="main"):
                yield ChatView(id="chat")
                yield PromptInput(id="input")
        yield StatusBar()
        yield Footer()

    @property
    def store(self) -> Any:
        return self.app.store  # type: ignore[attr-defined]

    @property
    def chat(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    async def on_mount(self) -> None:
        self.status.set(model="loading model…", state="")
        await self.refresh_sidebar()
        conv = None
        if self.initial_id is not None:
            conv = self.store.get(self.initial_id)
        await self.open_conversation(conv)
        self.query_one(PromptInput).focus()
        self.load_model()

    # --- model -------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="model")
    def load_model(self) -> None:
        from starling_local.cli.common import resolve_model
        from starling_local.engine.runtime import Engine

        try:
            path = resolve_model(self.app.model_spec)  # type: ignore[attr-defined]
            engine = Engine(
                path,
                n_ctx=self.app.n_ctx,  # type: ignore[attr-defined]
                on_progress=self._loading_progress,
            )
        except StarlingError as exc:
            self.post_message(ModelFailed(str(exc)))
            return
        self.post_message(ModelLoaded(engine))

    def _loading_progress(self, fraction: float) -> None:
        self.post_message(ModelLoading(fraction))

    def on_model_loading(self, message: ModelLoading) -> None:
        self.status.set(model=f"loading model {message.fraction:.0%}")

    async def on_model_loaded(self, message: ModelLoaded) -> None:
        from starling_local.chat.kv_cache import ConversationCache

        self.engine = message.engine
        self.kv = ConversationCache(self.engine)
        self.app.engine = message.engine  # type: ignore[attr-defined]
        self.status.set(model=self.engine.path.name, backend=self.engine.backend)
        self.update_context()

    async def on_model_failed(self, message: ModelFailed) -> None:
        self.model_error = message.error
        self.status.set(model="no model", state="")
        if "no model yet" in message.error:
            await self.chat.add("notice", NO_MODEL_HELP)
        else:
            await self.chat.add("notice", f"**The model could not be loaded:** {message.error}")

    # --- conversations -----------------------------------------------------------------------

    async def refresh_sidebar(self, search: str = "") -> None:
        if search.strip():
            rows = [(c.id, c.title, snip) for c, snip in self.store.search(search)]
        else:
            rows = [
                (c.id, c.title, c.updated[:16].replace("T", " "))
                for c in self.store.conversations(200)
            ]
        selected = self.conversation.id if self.conversation else None
        await self.query_one(Sidebar).show(rows, selected)

    async def open_conversation(self, conv: Conversation | None) -> None:
        self.conversation = self.store.get(conv.id) if conv else None
        shown = []
        if self.conversation:
            for m in self.conversation.messages:
                note = ""
                if m.incomplete:
                    note = "stopped" if m.stop_reason == "cancelled" else "incomplete"
                shown.append((m.role, m.content, note))
        await self.chat.show(shown)
        self.status.set(mode=self.current_mode, speed="")
        self.update_context()

    @property
    def current_mode(self) -> str:
        return self.conversation.mode if self.conversation else str(self.draft["mode"])

    @on(Sidebar.Selected)
    async def select_conversation(self, event: Sidebar.Selected) -> None:
        if self.generating:
            self.notify("A reply is still streaming: press Escape to stop it first.")
            return
        if self.conversation and self.conversation.id == event.conversation_id:
            return
        await self.open_conversation(self.store.get(event.conversation_id))

    @on(Sidebar.SearchChanged)
    async def search_changed(self, event: Sidebar.SearchChanged) -> None:
        await self.refresh_sidebar(event.text)

    # --- sending and streaming ---------------------------------------------------------------

    @on(PromptInput.Submitted)
    async def send(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if not text.strip():
            return
        if self.generating:
            self.notify("Still replying: wait, or press Escape to stop.")
            return
        if self.engine is None:
            self.notify(self.model_error or "The model is still loading.", severity="warning")
            return
        if self.conversation is None:
            self.conversation = self.store.create(
                mode=self.draft["mode"],
                system=self.draft["system"],
                model=display_name(self.engine.path),
                params=self.draft["params"],
            )
        self.store.add_message(self.conversation.id, "user", text)  # committed first
        self.query_one(PromptInput).clear()
        await self.chat.add("user", text)
        await self.start_reply()
        await self.refresh_sidebar()

    async def start_reply(self) -> None:
        assert self.conversation is not None
        conv = self.store.get(self.conversation.id)
        self.conversation = conv
        self.generating = True
        self.cancel = threading.Event()
        self.reply_view = await self.chat.add("assistant", "")
        self.md_stream = Markdown.get_stream(self.reply_view.markdown)
        self.recorder = ReplyRecorder(self.store, conv.id)
        self.status.set(state="replying… (Esc stops)", speed="")
        self.generate(conv.id, to_messages(conv), conv.system, style_of(conv), params_of(conv))

    @work(thread=True, exclusive=True, group="generate")
    def generate(
        self,
        conversation_id: int,
        messages: list[Message],
        system: str,
        style: PromptStyle,
        params: SamplingParams,
    ) -> None:
        kv = self.kv

        def resume(tokens: list[int]) -> None:
            if kv is not None:
                kv.restore(conversation_id, tokens)

        try:
            reply = start_reply(
                self.engine,
                messages,
                system=system,
                style=style,
                params=params,
                cancel=self.cancel,
                resume=resume,
            )
        except StarlingError as exc:
            self.post_message(ReplyDone(None, str(exc)))
            return
        self.post_message(ReplyStarted(reply))
        start = time.perf_counter()
        last_post = start
        pending: list[str] = []
        tail = 0  # characters since the last paragraph break: what the UI re-renders each time
        try:
            for chunk in reply.stream:
                pending.append(chunk)
                _head, brk, rest = chunk.rpartition("\n\n")
                tail = len(rest) if brk else tail + len(chunk)
                now = time.perf_counter()
                # At most one UI update per frame, and fewer while the last paragraph grows long
                # (Markdown re-renders that paragraph each time): a message per token would
                # make the UI thread compete with generation on fast models.
                if now - last_post >= ui_interval(tail):
                    count = reply.stream.stats.completion_tokens
                    self.post_message(ReplyChunk("".join(pending), count, count / (now - start)))
                    pending.clear()
                    last_post = now
            if pending:
                count = reply.stream.stats.completion_tokens
                elapsed = time.perf_counter() - start
                self.post_message(ReplyChunk("".join(pending), count, count / elapsed))
        except Exception as exc:  # the reply so far is kept; say what happened
            self.post_message(ReplyDone(reply.stream, f"generation failed: {exc}"))
            return
        self.post_message(ReplyDone(reply.stream))
        if kv is not None:
            # Reopening this conversation later (even in a new process) starts from here.
            kv.save(conversation_id)

    async def on_reply_started(self, message: ReplyStarted) -> None:
        self.dropped = message.reply.prompt.dropped_messages
        if self.dropped and self.reply_view is not None:
            self.reply_view.set_note(f"{self.dropped} oldest messages left out of the prompt")
            self.notify(
                f"The conversation is longer than the {self.engine.n_ctx}-token context: "
                f"the {self.dropped} oldest messages were left out of the prompt (not deleted)."
            )

    async def on_reply_chunk(self, message: ReplyChunk) -> None:
        if self.recorder is not None:
            self.recorder.feed(message.text)
        if self.md_stream is not None:
            await self.md_stream.write(message.text)
        now = time.monotonic()
        if now - self._status_at >= 0.5:  # a status update re-lays-out the screen: twice a second
            self._status_at = now
            self.status.set(speed=f"{message.tokens_per_s:.1f} tok/s")

    async def on_reply_done(self, message: ReplyDone) -> None:
        if self.md_stream is not None:
            await self.md_stream.stop()
            self.md_stream = None
        stream = message.stream
        if self.recorder is not None:
            if stream is not None:
                self.recorder.finish(stream)
            else:
                self.store.update_message(
                    self.recorder.message_id, "", incomplete=True, stop_reason="error"
                )
        view = self.reply_view
        if view is not None:
            if stream is None:
                await view.markdown.update(f"*{message.error}*")
                view.set_note("error")
            else:
                note = {"cancelled": "stopped", "length": "max tokens reached"}.get(
                    stream.stats.stop_reason, ""
                )
                if self.dropped:
                    note = ", ".join(filter(None, [note, f"{self.dropped} oldest left out"]))
                view.set_note(note)
        if message.error and stream is not None:
            self.notify(message.error, severity="error")
        self.generating = False
        self.recorder = None
        self.reply_view = None
        speed = ""
        if stream is not None and stream.stats.decode_tokens_per_s:
            speed = f"{stream.stats.decode_tokens_per_s:.1f} tok/s"
        self.status.set(state="", speed=speed)
        self.render_lag_s = time.perf_counter() - message.generated_at
        if self.conversation is not None:
            self.conversation = self.store.get(self.conversation.id)
        self.update_context()
        await self.refresh_sidebar()

    def update_context(self) -> None:
        """Tokens the conversation takes in the context window, as the next prompt renders."""
        if self.engine is None:
            return
        messages = to_messages(self.conversation) if self.conversation else []
        if not messages:
            self.status.set(context=f"0/{self.engine.n_ctx} tokens")
            return
        style = style_of(self.conversation) if self.conversation else PromptStyle()
        system = self.conversation.system if self.conversation else ""
        segments = render_segments(
            messages,
            mode=style.mode,
            system=system,
            policy=style.policy,
            add_generation_prompt=messages[-1].role == "user",
        )
        used = len(segments_to_tokens(segments, self.engine.tokenize_text))
        over = " (oldest turns leave the prompt)" if used > self.engine.n_ctx else ""
        self.status.set(context=f"{used}/{self.engine.n_ctx} tokens{over}")

    # --- actions -----------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.generating:
            self.cancel.set()

    async def action_new(self) -> None:
        if self.generating:
            self.notify("Stop the reply first (Escape).")
            return
        self.draft = {"mode": self.current_mode, "system": "", "params": {}}
        await self.open_conversation(None)
        await self.refresh_sidebar()
        self.query_one(PromptInput).focus()

    async def action_regenerate(self) -> None:
        if self.generating or self.conversation is None or self.engine is None:
            return
        conv = self.store.get(self.conversation.id)
        last = conv.messages[-1] if conv.messages else None
        if last is None:
            return
        if last.role == "assistant":
            self.store.truncate(conv.id, last.id)
        await self.open_conversation(conv)
        await self.start_reply()

    async def action_edit_last(self) -> None:
        if self.generating or self.conversation is None:
            return
        users = [m for m in self.store.get(self.conversation.id).messages if m.role == "user"]
        if not users:
            return
        last = users[-1]

        async def resend(text: str | None) -> None:
            if text is None or not text.strip() or self.conversation is None:
                return
            self.store.truncate(self.conversation.id, last.id)
            self.store.add_message(self.conversation.id, "user", text)
            await self.open_conversation(self.conversation)
            if self.engine is not None:
                await self.start_reply()

        self.app.push_screen(TextScreen("Edit your last message", last.content, True), resend)

    def action_rename(self) -> None:
        if self.conversation is None:
            self.notify("Send a message first: new conversations are named after it.")
            return
        conv = self.conversation

        async def done(title: str | None) -> None:
            if title and title.strip():
                self.conversation = self.store.rename(conv.id, title)
                await self.refresh_sidebar()

        self.app.push_screen(TextScreen("Rename conversation", conv.title), done)

    def action_delete(self) -> None:
        if self.conversation is None or self.generating:
            return
        conv = self.conversation

        async def done(yes: bool | None) -> None:
            if yes:
                from starling_local.chat.kv_cache import forget

                self.store.delete(conv.id)
                forget(conv.id)
                self.conversation = None
                await self.open_conversation(self.store.latest())
                await self.refresh_sidebar()

        self.app.push_screen(ConfirmScreen(f"Delete “{conv.title or 'untitled'}”?"), done)

    def _last_reply(self) -> str:
        if self.conversation is None:
            return ""
        replies = [
            m for m in self.store.get(self.conversation.id).messages if m.role == "assistant"
        ]
        return replies[-1].content if replies else ""

    def action_copy_reply(self) -> None:
        text = self._last_reply()
        if text:
            self.app.copy_to_clipboard(text)
            self.notify("Copied the last reply.")

    def action_copy_code(self) -> None:
        blocks = CODE_BLOCK.findall(self._last_reply())
        if blocks:
            self.app.copy_to_clipboard(blocks[-1])
            self.notify("Copied the last code block.")
        else:
            self.notify("The last reply has no code block.")

    def action_toggle_mode(self) -> None:
        mode = "code" if self.current_mode == "chat" else "chat"
        if self.conversation is not None:
            self.conversation = self.store.update(self.conversation.id, mode=mode)
        else:
            self.draft["mode"] = mode
        self.status.set(mode=mode)
        self.update_context()

    def action_system_prompt(self) -> None:
        current = self.conversation.system if self.conversation else self.draft["system"]

        def done(text: str | None) -> None:
            if text is None:
                return
            if self.conversation is not None:
                self.conversation = self.store.update(self.conversation.id, system=text.strip())
            else:
                self.draft["system"] = text.strip()
            self.update_context()

        self.app.push_screen(TextScreen("System prompt", current, True), done)

    def action_settings(self) -> None:
        params = (
            params_of(self.conversation)
            if self.conversation
            else SamplingParams(
                **{k: v for k, v in self.draft["params"].items() if k != "system_policy"}
            )
        )

        def done(values: dict[str, Any] | None) -> None:
            if values is None:
                return
            new = replace(params, **values)
            style = style_of(self.conversation) if self.conversation else PromptStyle()
            data = params_dict(new, style)
            if self.conversation is not None:
                self.conversation = self.store.update(self.conversation.id, params=data)
            else:
                self.draft["params"] = data
            self.notify("Sampling settings saved.")

        values = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": params.seed,
        }
        self.app.push_screen(SettingsScreen(values), done)

    def action_show_prompt(self) -> None:
        if self.engine is None:
            self.notify("The model is not loaded.")
            return
        messages = to_messages(self.conversation) if self.conversation else []
        style = (
            style_of(self.conversation)
            if self.conversation
            else PromptStyle(Mode(self.draft["mode"]))
        )
        system = self.conversation.system if self.conversation else self.draft["system"]
        pending = (
            [*messages, Message("user", "…")]
            if not messages or messages[-1].role != "user"
            else messages
        )
        fitted = build_prompt(self.engine, pending, system=system, style=style)
        kept = pending[fitted.dropped_messages :]
        text = segments_to_text(
            render_segments(kept, mode=style.mode, system=system, policy=style.policy, exact=False)
        )
        self.app.push_screen(
            PromptScreen(text, len(fitted.tokens), self.engine.n_ctx, fitted.dropped_messages)
        )

    def action_export(self) -> None:
        if self.conversation is None:
            return
        import json

        from starling_local.paths import ensure, get_paths

        folder = ensure(get_paths().data / "exports")
        cid = self.conversation.id
        (folder / f"conversation-{cid}.md").write_text(self.store.export_markdown(cid))
        (folder / f"conversation-{cid}.json").write_text(
            json.dumps(self.store.export_json(cid), indent=2, ensure_ascii=False)
        )
        self.notify(f"Exported to {folder}/conversation-{cid}.md and .json")

    def action_search(self) -> None:
        self.query_one("#search").focus()
