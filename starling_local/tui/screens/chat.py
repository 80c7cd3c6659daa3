"""The main screen: sidebar, conversation, message box, status line.

Layout and event handling only. Everything that reads the model or writes the store is a call
to the conversation service made in a thread worker, which posts a message when it returns.
"""

from __future__ import annotations

from typing import Any

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Footer

from starling_local.chat.service import ConversationService
from starling_local.chat.settings import ConversationSettings, settings_of
from starling_local.errors import StarlingError
from starling_local.store.models import Conversation
from starling_local.tui.messages import (
    ModelFailed,
    ModelLoaded,
    ModelLoading,
)
from starling_local.tui.screens.models import DEFAULT_DOWNLOAD, ModelsScreen, download_offer
from starling_local.tui.screens.replies import ReplyStreaming
from starling_local.tui.widgets.chat_view import NO_MODEL_HELP, NOTES, ChatView, MessageView
from starling_local.tui.widgets.prompt_input import PromptInput
from starling_local.tui.widgets.sidebar import Sidebar
from starling_local.tui.widgets.status import StatusBar


class ChatScreen(ReplyStreaming):
    # Keys the message box (a TextArea) does not use for editing, so they work while typing.
    BINDINGS = [
        Binding("ctrl+n", "new", "New", id="new"),
        Binding("escape", "stop", "Stop", id="stop"),
        Binding("ctrl+g", "regenerate", "Regenerate", id="regenerate"),
        Binding("f9", "continue_reply", "Continue", id="continue", show=False),
        Binding("ctrl+l", "edit_last", "Edit last", id="edit"),
        Binding("ctrl+r", "rename", "Rename", id="rename"),
        Binding("f8", "delete", "Delete", id="delete"),
        # priority: the message box (a TextArea) binds F6 and F7 itself (select line, all)
        Binding("f6", "copy_reply", "Copy reply", id="copy", priority=True),
        Binding("f7", "copy_code", "Copy code", id="copy_code", show=False, priority=True),
        Binding("ctrl+t", "toggle_mode", "Chat/Code", id="mode"),
        Binding("f2", "system_prompt", "System", id="system"),
        Binding("f3", "settings", "Sampling", id="settings"),
        Binding("f4", "show_prompt", "Prompt", id="prompt"),
        Binding("ctrl+s", "export", "Export", id="export", show=False),
        Binding("ctrl+f", "search", "Search", id="search", show=False),
        Binding("ctrl+up", "select_messages", "Messages", id="messages", show=False),
        Binding("ctrl+o", "attach_file", "Attach file", id="attach"),
        Binding("f5", "models", "Models", id="models"),
    ]

    def __init__(self, conversation_id: int | None = None) -> None:
        super().__init__()
        self.initial_id = conversation_id
        self.conversation: Conversation | None = None
        self.settings = ConversationSettings()
        """The open conversation's settings (or a new one's): sent with every message."""
        self.model_ready = False
        self.model_error: str | None = None
        self.generating = False
        self.reply_view: MessageView | None = None
        self.md_stream: Any = None
        self.reshow = False
        self._status_at = 0.0
        self._context_base = (0, 0)
        self.reply_overrides: dict[str, Any] = {}
        """Sampling changes for every reply, never saved (benchmarks)."""
        self.render_lag_s: float | None = None
        """Last token generated -> whole reply on screen, for the last reply."""

    def compose(self):  # type: ignore[no-untyped-def]
        with Horizontal():
            yield Sidebar(id="sidebar")
            with Vertical(id="main"):
                yield ChatView(id="chat")
                yield PromptInput(id="input")
        yield StatusBar()
        yield Footer()

    @property
    def service(self) -> ConversationService:
        return self.app.service  # type: ignore[attr-defined,no-any-return]

    @property
    def chat(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def prompt_input(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def cid(self) -> int | None:
        return self.conversation.id if self.conversation else None

    async def on_mount(self) -> None:
        self.status.set(model="loading model…", state="")
        await self.refresh_sidebar()
        initial = self.service.get(self.initial_id) if self.initial_id is not None else None
        await self.open_conversation(initial)
        self.query_one(PromptInput).focus()
        self.load_model()

    # --- workers: every service call runs here, off the UI thread ------------------------------

    @work(thread=True, exclusive=True, group="model")
    def load_model(self, model: str | None = None) -> None:
        """Load the model (`model`, or the one the app was started with) and make it the one
        replies run on; a running reply finishes on the old one first."""
        try:
            name, backend, n_ctx = self.app.load_engine(  # type: ignore[attr-defined]
                lambda fraction: self.post_message(ModelLoading(fraction)), model
            )
        except StarlingError as exc:
            self.post_message(ModelFailed(str(exc)))
            return
        self.post_message(ModelLoaded(name, backend, n_ctx))

    # --- model ---------------------------------------------------------------------------------

    def action_models(self) -> None:
        self.app.push_screen(ModelsScreen())

    def on_model_loading(self, message: ModelLoading) -> None:
        self.status.set(model=f"loading model {message.fraction:.0%}")

    def on_model_loaded(self, message: ModelLoaded) -> None:
        self.model_ready = True
        self.model_error = None
        for button in self.query("#get-default"):
            button.remove()
        self.status.set(model=message.name, backend=message.backend)
        self.update_context()

    async def on_model_failed(self, message: ModelFailed) -> None:
        self.model_error = message.error
        self.status.set(model="no model", state="")
        no_model = "no model yet" in message.error
        text = NO_MODEL_HELP if no_model else f"**The model could not be loaded:** {message.error}"
        await self.chat.add("notice", text)
        if no_model:  # the download, one click away
            await self.chat.mount(Button(download_offer(), id="get-default", variant="primary"))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "get-default":
            self.app.push_screen(ModelsScreen(download=DEFAULT_DOWNLOAD))

    # --- conversations -------------------------------------------------------------------------

    async def refresh_sidebar(self, search: str = "") -> None:
        store = self.service.store
        if search.strip():
            rows = [(c.id, c.title, snip) for c, snip in store.search(search)]
        else:
            rows = [
                (c.id, ("↳ " if c.parent_id else "") + c.title, c.updated[:16].replace("T", " "))
                for c in branches_under_parents(store.conversations(200))
            ]
        await self.query_one(Sidebar).show(rows, self.cid)

    async def open_conversation(self, conv: Conversation | None, hide: int | None = None) -> None:
        """Show a conversation (without message `hide`: a reply that is about to stream)."""
        self.conversation = self.service.get(conv.id) if conv else None
        if self.conversation is not None:
            self.settings = settings_of(self.conversation)
        shown = [
            (
                m.role,
                m.content,
                NOTES.get(m.stop_reason or "", "incomplete") if m.incomplete else "",
                m.id,
            )
            for m in (self.conversation.messages if self.conversation else [])
            if m.id != hide
        ]
        await self.chat.show(shown)
        self.status.set(mode=self.settings.mode.value, speed="")
        self.update_context()

    @on(Sidebar.Selected)
    async def select_conversation(self, event: Sidebar.Selected) -> None:
        if self.generating:
            self.notify("A reply is still streaming: press Escape to stop it first.")
        elif event.conversation_id != self.cid:
            await self.open_conversation(self.service.get(event.conversation_id))

    @on(Sidebar.SearchChanged)
    async def search_changed(self, event: Sidebar.SearchChanged) -> None:
        await self.refresh_sidebar(event.text)

    # --- replies -------------------------------------------------------------------------------

    @on(PromptInput.Submitted)
    async def send(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if not text.strip() or not self.can_reply():
            return
        self.query_one(PromptInput).clear()
        await self.chat.add("user", text)
        cid, settings = self.cid, self.settings
        self.start_reply(lambda: self.service.send(cid, text, settings), draft=text)


def branches_under_parents(conversations: list[Conversation]) -> list[Conversation]:
    """Newest first, each branch right under the conversation it was branched from."""
    present = {c.id for c in conversations}
    children: dict[int, list[Conversation]] = {}
    for c in conversations:
        if c.parent_id in present:
            children.setdefault(c.parent_id, []).append(c)
    out: list[Conversation] = []

    def visit(c: Conversation) -> None:
        out.append(c)
        for child in children.get(c.id, []):
            visit(child)

    for c in conversations:
        if c.parent_id not in present:
            visit(c)
    return out
