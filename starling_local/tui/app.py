"""`StarlingApp`: the Textual application. It owns the conversation service (and through it the
store and the engine) and closes it when it exits; the chat screen does the rest."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable
from typing import Any

from textual.app import App, SystemCommand
from textual.screen import Screen

from starling_local.chat.engines import EngineSpec
from starling_local.chat.service import ConversationService
from starling_local.config import preferences, save_preferences
from starling_local.engine.interface import EngineLike
from starling_local.store.conversations import ConversationStore
from starling_local.tui.screens.chat import ChatScreen

#: Makes the engine a spec asks for, telling load progress: (engine, the name it is saved as).
Opener = Callable[[EngineSpec, Callable[[float], None] | None], tuple[EngineLike, str]]

SWITCH_INTERVAL_S = 0.0005

#: (title, help, ChatScreen action) for the command palette.
COMMANDS = (
    ("New conversation", "Start a new conversation", "new"),
    ("Stop", "Stop the reply being generated", "stop"),
    ("Regenerate", "Generate the last reply again", "regenerate"),
    ("Continue reply", "Extend a stopped or cut reply in place (F9)", "continue_reply"),
    ("Edit last message", "Edit your last message and resend it", "edit_last"),
    ("Rename conversation", "Give the conversation a new title", "rename"),
    ("Delete conversation", "Delete the conversation (asks first)", "delete"),
    ("Copy last reply", "Copy the last reply to the clipboard", "copy_reply"),
    ("Copy code block", "Copy the last code block of the last reply", "copy_code"),
    ("Toggle chat/code mode", "Switch between GPT4 Correct and Code personas", "toggle_mode"),
    ("System prompt", "Set the conversation's system prompt", "system_prompt"),
    ("Sampling settings", "Temperature, top-p, max tokens, seed", "settings"),
    ("Show prompt", "The exact rendered prompt and its token count", "show_prompt"),
    ("Export conversation", "Write it as Markdown and JSON", "export"),
    ("Search conversations", "Full-text search of titles and messages", "search"),
    ("Models", "Download, use, make default or delete models", "models"),
    (
        "Speculative decoding on/off",
        "Verify drafts copied from the conversation: the same reply, faster where it repeats",
        "toggle_speculate",
    ),
    ("Attach a file", "Put a text file into your message as a code block", "attach_file"),
    (
        "Import conversations",
        "A starling-local export, a ChatGPT conversations.json or a message list",
        "import",
    ),
    (
        "Select messages",
        "Pick a message (Up/Down): c copies it, 1-9 a code block, b branches, d deletes the pair",
        "select_messages",
    ),
)


class StarlingApp(App[None]):
    CSS_PATH = "starling.tcss"
    TITLE = "starling-local"

    def __init__(
        self,
        *,
        model: str | None = None,
        conversation_id: int | None = None,
        store: ConversationStore | None = None,
        n_ctx: int | None = None,
        engine: EngineSpec | None = None,
        opener: Opener | None = None,
    ) -> None:
        """`opener` makes the engine from the spec (default: `chat.engines.open_engine`; the
        fast tests pass a scripted engine's)."""
        super().__init__()
        self.engine_spec = engine or EngineSpec(model=model, n_ctx=n_ctx)
        self._open_engine = opener
        self.conversation_id = conversation_id
        self.service = ConversationService(store or ConversationStore(), owns_store=store is None)

    def on_mount(self) -> None:
        # SIGTERM (a service manager, `kill`) and SIGHUP (the terminal closed) quit as Ctrl+Q
        # does: the streaming reply is stopped and saved with its KV state, then llama.cpp is
        # freed (`on_unmount`). Without this the process died at once, losing up to a second
        # of shown text.
        import asyncio
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.exit)
        saved = preferences().theme
        if saved is not None and saved in self.available_themes:
            self.theme = saved
        self._theme_restored = True

    def watch_theme(self, theme: str) -> None:
        # Chosen in the command palette ("Change theme"): kept for the next start.
        if getattr(self, "_theme_restored", False) and preferences().theme != theme:
            save_preferences(theme=theme)

    def on_load(self) -> None:
        # The generation thread needs the GIL briefly after every token (between llama.cpp
        # calls, which release it). With the default 5 ms switch interval, a busy UI thread
        # (Markdown rendering) would hold it long enough to cap decoding near 200 tokens/s.
        sys.setswitchinterval(SWITCH_INTERVAL_S)

    def load_engine(
        self, on_progress: Callable[[float], None], model: str | None = None
    ) -> tuple[str, str, int]:
        """Load the model (in a worker thread) and hand it to the service, replacing the one
        loaded before; (name, backend, context size). An engine loaded after the app began to
        quit is closed at once."""
        from dataclasses import replace

        from starling_local.chat.engines import open_engine
        from starling_local.engine.types import EngineClosedError

        opener = self._open_engine or open_engine

        spec = replace(self.engine_spec, model=model, remote=None) if model else self.engine_spec
        saved = preferences().speculate
        if spec.speculate is None and saved is not None:  # a flag given wins
            spec = replace(spec, speculate=saved)
        engine, name = opener(spec, on_progress)
        swapped = (
            self.service.swap_engine(engine, name)
            if self.service.engine is not None
            else self.service.attach_engine(engine, name)
        )
        if not swapped:
            engine.close()
            raise EngineClosedError("the app is quitting")
        return engine.path.name, engine.backend, engine.n_ctx

    def switch_model(self, model: str) -> None:
        """Use another model from now on (loaded in the background; the open conversation
        carries on)."""
        chat = self.screen_stack[0]
        if isinstance(chat, ChatScreen):
            chat.status.set(model=f"loading {model}…")
            chat.load_model(model)

    def model_downloaded(self, model: str) -> None:
        if self.service.engine is None:
            self.switch_model(model)  # the first model: use it at once

    def get_default_screen(self) -> Screen[Any]:
        return ChatScreen(self.conversation_id)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if isinstance(screen, ChatScreen):
            for title, help_text, action in COMMANDS:
                yield SystemCommand(title, help_text, getattr(screen, f"action_{action}"))

    def on_unmount(self) -> None:
        # Stops a streaming reply, waits until it is saved (marked stopped), then frees llama.cpp.
        self.service.close()


def run_app(engine: EngineSpec, conversation_id: int | None = None) -> None:
    StarlingApp(engine=engine, conversation_id=conversation_id).run()
