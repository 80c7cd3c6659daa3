"""The chat screen's commands: each one asks the conversation service for something in a
thread worker (never on the UI thread) and shows the answer when it comes back."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import work
from textual.screen import Screen

from starling_local.chat.settings import ConversationSettings
from starling_local.chat.template import Mode
from starling_local.config import save_preferences
from starling_local.errors import StarlingError
from starling_local.store.models import Conversation
from starling_local.tui.messages import ServiceDone, ServiceFailed
from starling_local.tui.screens.dialogs import (
    ConfirmScreen,
    FileScreen,
    PromptScreen,
    SettingsScreen,
    TextScreen,
)
from starling_local.tui.widgets.chat_view import MessageView
from starling_local.tui.widgets.prompt_input import PromptInput

if TYPE_CHECKING:
    from starling_local.chat.service import ConversationService
    from starling_local.tui.widgets.status import StatusBar

CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)


class ConversationCommands(Screen[None]):
    """Actions on the open conversation (the chat screen's keys and palette entries)."""

    conversation: Conversation | None
    settings: ConversationSettings
    generating: bool
    model_ready: bool
    model_error: str | None

    if TYPE_CHECKING:

        @property
        def service(self) -> ConversationService: ...
        @property
        def status(self) -> StatusBar: ...
        @property
        def cid(self) -> int | None: ...
        def can_reply(self) -> bool: ...
        def start_reply(
            self, prepare: Callable[[], Conversation], reshow: bool = False
        ) -> None: ...
        async def open_conversation(
            self, conv: Conversation | None, hide: int | None = None
        ) -> None: ...
        async def refresh_sidebar(self, search: str = "") -> None: ...

    @work(thread=True, group="service")
    def background(self, call: Callable[[], Any], then: Callable[[Any], Any] | None = None) -> None:
        try:
            result = call()
        except StarlingError as exc:
            self.post_message(ServiceFailed(str(exc)))
            return
        except Exception as exc:  # an OSError on export, a raw sqlite3 error: one line, no exit
            self.post_message(ServiceFailed(f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(ServiceDone(then, result))

    async def on_service_done(self, message: ServiceDone) -> None:
        if message.then is not None:
            result = message.then(message.result)
            if inspect.isawaitable(result):
                await result

    def on_service_failed(self, message: ServiceFailed) -> None:
        self.notify(message.error, severity="error")

    def update_context(self) -> None:
        """Show the tokens the conversation takes in the context window (worked out off the UI
        thread: it tokenizes the whole conversation)."""
        if not self.model_ready:
            return

        def show(usage: tuple[int, int]) -> None:
            used, n_ctx = usage
            over = " (oldest turns leave the prompt)" if used > n_ctx else ""
            self.status.set(context=f"{used}/{n_ctx} tokens{over}")

        cid, settings = self.cid, self.settings
        self.background(lambda: self.service.context_usage(cid, settings), show)

    # --- actions -------------------------------------------------------------------------------

    def action_stop(self) -> None:
        self.service.stop()

    async def action_new(self) -> None:
        if self.generating:
            self.notify("Stop the reply first (Escape).")
            return
        self.settings = ConversationSettings(mode=self.settings.mode)
        await self.open_conversation(None)
        await self.refresh_sidebar()
        self.query_one(PromptInput).focus()

    def action_regenerate(self) -> None:
        cid = self.cid
        if cid is not None and self.can_reply():
            self.start_reply(lambda: self.service.regenerate(cid), reshow=True)

    def action_continue_reply(self) -> None:
        """Extend the last reply in place, when it was stopped or cut at its length."""
        cid, conv = self.cid, self.conversation
        last = conv.messages[-1] if conv is not None and conv.messages else None
        if cid is None or last is None or last.role != "assistant" or not last.content.strip():
            self.notify("Nothing to continue: the last message is not a reply.")
            return
        if not last.incomplete and last.stop_reason not in ("cancelled", "length"):
            self.notify("The last reply is complete: Continue extends a stopped or cut reply.")
            return
        if self.can_reply():
            self.start_reply(lambda: self.service.get(cid), reshow=True)

    def action_edit_last(self) -> None:
        cid = self.cid
        users = (
            [m for m in self.conversation.messages if m.role == "user"] if self.conversation else []
        )
        if cid is None or not users or self.generating:
            return

        def resend(text: str | None) -> None:
            if text and text.strip() and self.can_reply():
                self.start_reply(lambda: self.service.edit_last(cid, text), reshow=True)

        self.app.push_screen(TextScreen("Edit your last message", users[-1].content, True), resend)

    def action_rename(self) -> None:
        if self.conversation is None:
            self.notify("Send a message first: new conversations are named after it.")
            return
        cid = self.conversation.id

        async def renamed(conv: Conversation) -> None:
            self.conversation = conv
            await self.refresh_sidebar()

        def done(title: str | None) -> None:
            if title and title.strip():
                self.background(lambda: self.service.rename(cid, title), renamed)

        self.app.push_screen(TextScreen("Rename conversation", self.conversation.title), done)

    def action_delete(self) -> None:
        if self.conversation is None or self.generating:
            return
        cid = self.conversation.id

        async def deleted(_: None) -> None:
            await self.open_conversation(self.service.latest())
            await self.refresh_sidebar()

        def done(yes: bool | None) -> None:
            if yes:
                self.background(lambda: self.service.delete(cid), deleted)

        title = self.conversation.title or "untitled"
        self.app.push_screen(ConfirmScreen(f"Delete “{title}”?"), done)

    def change_settings(self, settings: ConversationSettings, note: str = "") -> None:
        """New settings for the open conversation (saved off the UI thread) or the next one."""
        self.settings = settings
        self.status.set(mode=settings.mode.value)
        cid = self.cid
        if cid is not None:
            self.background(lambda: self.service.save_settings(cid, settings))
        if note:
            self.notify(note)
        self.update_context()

    def action_toggle_speculate(self) -> None:
        engine = self.service.engine
        if engine is None or not hasattr(engine, "speculate"):
            self.notify("Speculative decoding needs a local model", severity="warning")
            return
        enabled = not engine.speculate
        save_preferences(speculate=enabled)  # kept for the next start
        self.notify(f"Speculative decoding {'on' if enabled else 'off'}: reloading the model")
        app: Any = self.app
        app.engine_spec = replace(app.engine_spec, speculate=enabled)
        # It changes the attention kernels (see `Engine.speculate`): reload in the background.
        app.switch_model(str(engine.path))

    def action_toggle_mode(self) -> None:
        mode = Mode.CODE if self.settings.mode is Mode.CHAT else Mode.CHAT
        self.change_settings(replace(self.settings, mode=mode))

    def action_system_prompt(self) -> None:
        def done(text: str | None) -> None:
            if text is not None:
                self.change_settings(replace(self.settings, system=text.strip()))

        self.app.push_screen(TextScreen("System prompt", self.settings.system, True), done)

    def action_settings(self) -> None:
        s = self.settings.sampling
        values = {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "seed": s.seed,
        }

        def done(changes: dict[str, Any] | None) -> None:
            if changes is not None:
                self.change_settings(
                    self.settings.with_sampling(**changes), "Sampling settings saved."
                )

        self.app.push_screen(SettingsScreen(values), done)

    def action_show_prompt(self) -> None:
        if not self.model_ready:
            self.notify("The model is not loaded.")
            return
        cid, settings = self.cid, self.settings

        def show(p: Any) -> None:
            self.app.push_screen(PromptScreen(p.text, p.tokens, p.n_ctx, p.dropped_messages))

        self.background(lambda: self.service.preview(cid, settings), show)

    def action_export(self) -> None:
        cid = self.cid
        if cid is not None:
            from starling_local.paths import get_paths

            folder = get_paths().data / "exports"
            self.background(
                lambda: self.service.export(cid, folder),
                lambda paths: self.notify(f"Exported to {paths[0]} and {paths[1].name}"),
            )

    def last_reply(self) -> str:
        messages = self.conversation.messages if self.conversation else []
        return next((m.content for m in reversed(messages) if m.role == "assistant"), "")

    def action_copy_reply(self) -> None:
        if text := self.last_reply():
            self.app.copy_to_clipboard(text)
            self.notify("Copied the last reply.")

    def action_copy_code(self) -> None:
        blocks = CODE_BLOCK.findall(self.last_reply())
        if blocks:
            self.app.copy_to_clipboard(blocks[-1])
        self.notify(
            "Copied the last code block." if blocks else "The last reply has no code block."
        )

    def action_select_messages(self) -> None:
        views = list(self.query(MessageView))
        if views:
            views[-1].focus()
            views[-1].scroll_visible()

    async def on_message_view_action(self, event: MessageView.Action) -> None:
        view, action = event.view, event.action
        cid, message_id = self.cid, view.message_id
        # (a typed message's Markdown has hard breaks added; the copy is what was typed)
        text = view.content if view.role == "user" else view.markdown.source
        if action == "copy":
            self.app.copy_to_clipboard(text)
            self.notify("Copied the message.")
        elif action.startswith("code "):
            n = int(action.split()[1])
            blocks = CODE_BLOCK.findall(text)
            if n <= len(blocks):
                self.app.copy_to_clipboard(blocks[n - 1])
                self.notify(f"Copied code block {n}.")
            else:
                count = len(blocks)
                self.notify(f"The message has {count} code block{'' if count == 1 else 's'}.")
        elif cid is None or message_id is None or self.generating:
            self.notify("Wait for the reply to finish (or stop it) first.")
        elif action == "branch":
            ids = [m.id for m in self.conversation.messages] if self.conversation else []
            at = ids.index(message_id) + 1

            async def opened(branch: Conversation) -> None:
                await self.open_conversation(branch)
                await self.refresh_sidebar()
                self.notify(f"Branched at message {at}: “{branch.title}”.")

            self.background(lambda: self.service.fork(cid, at), opened)
        elif action == "delete":

            async def deleted(conv: Conversation) -> None:
                await self.open_conversation(conv)
                self.query_one(PromptInput).focus()

            self.background(lambda: self.service.delete_pair(cid, message_id), deleted)

    def action_attach_file(self) -> None:
        """Put a text file into the message box as a code block (its size shown first)."""
        if not self.model_ready:
            self.notify("Wait for the model: the file's size is counted in its tokens.")
            return

        def attach(result: tuple[str, int]) -> None:
            block, tokens = result
            box = self.query_one(PromptInput)
            box.text = "\n\n".join(part for part in (box.text.rstrip(), block) if part)
            box.focus()
            self.notify(f"Attached: {tokens} tokens.")

        def picked(path: Path | None) -> None:
            if path is not None:
                self.background(lambda: self.service.file_block(path), attach)

        self.app.push_screen(FileScreen("Attach a text file", Path.cwd()), picked)

    def action_import(self) -> None:
        async def imported(convs: list[Conversation]) -> None:
            await self.refresh_sidebar()
            self.notify(f"Imported {len(convs)} conversation(s).")

        def picked(path: Path | None) -> None:
            if path is not None:
                self.background(lambda: self.service.import_file(path), imported)

        title = "Import a starling-local export, a ChatGPT conversations.json or a message list"
        self.app.push_screen(FileScreen(title, Path.cwd()), picked)

    def action_search(self) -> None:
        self.query_one("#search").focus()
