"""`ConversationService`: the one conversation workflow that every front end calls.

It is the conversations (`Conversations`: the store's side) and the replies (`ReplyRunner`: the
engine's side) together. A front end (the CLI, the TUI, the server) parses input, calls it, and
shows what comes back: it never renders a prompt, writes a message or touches a state file
itself. A reply to a saved conversation is recorded as it streams (at least once a second), and
its KV state file is saved before `reply()` returns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from starling_local.chat.attachments import with_files
from starling_local.chat.conversation import to_messages
from starling_local.chat.conversations import Conversations
from starling_local.chat.generation import ReplyHooks, ReplyOutcome, ReplyStart
from starling_local.chat.prompts import PromptPreview, preview_prompt, prompt_size
from starling_local.chat.runner import (
    NoModelError,
    Recording,
    ReplyRunner,
    ServiceClosedError,
    Turn,
)
from starling_local.chat.settings import ConversationSettings, settings_of
from starling_local.chat.template import Message
from starling_local.engine.interface import EngineLike
from starling_local.engine.types import SamplingParams
from starling_local.errors import UsageError
from starling_local.store.conversations import ConversationStore

__all__ = [
    "ConversationService",
    "NoModelError",
    "ReplyHooks",
    "ReplyOutcome",
    "ReplyStart",
    "ServiceClosedError",
    "Turn",
]


class ConversationService(Conversations):
    """Conversations, replies and their KV state, over one store and one engine."""

    def __init__(
        self,
        store: ConversationStore | None,
        engine: EngineLike | None = None,
        *,
        model_name: str = "",
        owns_store: bool = True,
        owns_engine: bool = True,
        kv_root: Path | None = None,
    ) -> None:
        super().__init__(store, owns_store=owns_store, kv_root=kv_root)
        self.runner = ReplyRunner(engine, model_name, kv_root, owns_engine=owns_engine)

    # --- the engine ---------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.runner.model_name

    @property
    def engine(self) -> EngineLike | None:
        return self.runner.engine

    def attach_engine(self, engine: EngineLike, model_name: str = "") -> bool:
        """Take ownership of a loaded engine; False (the caller closes it) if already closed."""
        return self.runner.attach(engine, model_name)

    def swap_engine(self, engine: EngineLike, model_name: str) -> bool:
        """Switch engines once the running reply is done (see `ReplyRunner.swap`)."""
        return self.runner.swap(engine, model_name)

    def unload_engine(self) -> bool:
        """Free the engine after the running reply (see `ReplyRunner.unload`)."""
        return self.runner.unload()

    def close(self) -> None:
        """Stop a running reply, wait until it is recorded and its state saved, then free the
        engine (and the store, when owned). Safe to call twice and from any thread."""
        self.runner.close()
        self.close_store()

    # --- prompts ------------------------------------------------------------------------------

    def preview(
        self,
        conversation_id: int | None,
        settings: ConversationSettings,
        pending: str = "…",
    ) -> PromptPreview:
        """The exact prompt of the next reply (with `pending` as the next message when the
        conversation does not end with one of the user's)."""
        conv = self.store.get(conversation_id) if conversation_id else None
        messages = to_messages(conv) if conv else []
        return preview_prompt(self.runner.require_engine(), messages, settings, pending)

    def context_usage(
        self, conversation_id: int | None, settings: ConversationSettings
    ) -> tuple[int, int]:
        """(tokens the conversation takes as the next prompt renders, the context size)."""
        engine = self.runner.require_engine()
        conv = self.store.get(conversation_id) if conversation_id else None
        return prompt_size(engine, to_messages(conv) if conv else [], settings), engine.n_ctx

    def file_block(self, path: Path) -> tuple[str, int]:
        """A text file as the code block a message would hold, and its size in tokens (refused
        when it does not fit the context window)."""
        engine = self.runner.require_engine()
        block = with_files(
            "", [path], count_tokens=lambda b: len(engine.tokenize_text(b)), n_ctx=engine.n_ctx
        )
        return block, len(engine.tokenize_text(block))

    # --- replies ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the reply being generated, and one still waiting for its turn."""
        self.runner.stop()

    @property
    def replying(self) -> bool:
        return self.runner.replying

    @contextmanager
    def turn(self, cancel: threading.Event | None = None) -> Iterator[Turn]:
        """Hold the engine across several steps (find a conversation, write to it, reply):
        pass the turn to `reply(turn=...)`."""
        with self.runner.turn(cancel) as turn:
            yield turn

    def reply(
        self,
        conversation_id: int,
        *,
        hooks: ReplyHooks | None = None,
        overrides: dict[str, Any] | None = None,
        cancel: threading.Event | None = None,
        stop: Sequence[str] = (),
        turn: Turn | None = None,
    ) -> ReplyOutcome:
        """Generate the reply to a saved conversation that ends with a user message, recording
        it as it streams; its KV state is saved before this returns. A conversation that ends
        with a reply (stopped, cut at its length) gets that reply continued in place.
        `overrides` change sampling fields for this reply only (benchmarks, a request's
        grammar or logprobs). In a `turn` already held, `cancel` is the turn's."""
        if turn is not None:
            return self._reply_in(turn, conversation_id, hooks, overrides, stop)
        with self.runner.turn(cancel) as held:
            return self._reply_in(held, conversation_id, hooks, overrides, stop)

    def _reply_in(
        self,
        turn: Turn,
        conversation_id: int,
        hooks: ReplyHooks | None,
        overrides: dict[str, Any] | None,
        stop: Sequence[str],
    ) -> ReplyOutcome:
        conv = self.store.get(conversation_id)
        settings = settings_of(conv)
        if overrides:
            settings = settings.with_sampling(**overrides)
        last = conv.messages[-1] if conv.messages else None
        extend = last if last is not None and last.role == "assistant" else None
        if extend is not None and not extend.content.strip():
            extend = None  # a reply cut before any text: `to_messages` leaves it out
        prompt = self.runner.fit(to_messages(conv), settings)
        recording = Recording(self.store, conv.id, extend)
        return self.runner.run(
            turn, prompt, settings.sampling, hooks, recording=recording, stop=stop
        )

    def continue_reply(
        self,
        conversation_id: int,
        *,
        hooks: ReplyHooks | None = None,
        cancel: threading.Event | None = None,
    ) -> ReplyOutcome:
        """Continue the conversation's last reply in place (one that was stopped, cancelled or
        cut at its length): the reply is left open in the prompt and grows."""
        conv = self.store.get(conversation_id)
        if not conv.messages or conv.messages[-1].role != "assistant":
            raise UsageError("there is no reply to continue: the last message is not a reply")
        if not conv.messages[-1].content.strip():
            raise UsageError("there is no reply to continue: the last reply is empty")
        return self.reply(conversation_id, hooks=hooks, cancel=cancel)

    def answer(
        self,
        messages: Sequence[Message],
        settings: ConversationSettings,
        *,
        hooks: ReplyHooks | None = None,
        cancel: threading.Event | None = None,
        stop: Sequence[str] = (),
    ) -> ReplyOutcome:
        """A reply to `messages` that is not saved anywhere (`ask --no-save`, the server)."""
        return self.runner.answer(messages, settings, hooks=hooks, cancel=cancel, stop=stop)

    def complete(
        self,
        tokens: Sequence[int],
        sampling: SamplingParams,
        *,
        hooks: ReplyHooks | None = None,
        cancel: threading.Event | None = None,
        stop: Sequence[str] = (),
        stop_ids: Sequence[int] = (),
    ) -> ReplyOutcome:
        """A raw completion of `tokens` (no template: the caller rendered them)."""
        return self.runner.complete(
            tokens, sampling, hooks=hooks, cancel=cancel, stop=stop, stop_ids=stop_ids
        )
