"""Messages that workers and widgets post; the chat screen handles them on the UI thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from textual.message import Message

from starling_local.chat.service import ReplyOutcome, ReplyStart


class ModelLoading(Message):
    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction


class ModelLoaded(Message):
    def __init__(self, name: str, backend: str, n_ctx: int) -> None:
        super().__init__()
        self.name = name
        self.backend = backend
        self.n_ctx = n_ctx


class ModelFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class ReplyStarted(Message):
    def __init__(self, start: ReplyStart, user_message_id: int | None = None) -> None:
        super().__init__()
        self.start = start
        self.user_message_id = user_message_id
        """The id of the user message the reply answers, when it was just committed."""


class ReplyChunk(Message):
    def __init__(self, text: str, tokens: int, tokens_per_s: float) -> None:
        super().__init__()
        self.text = text
        self.tokens = tokens
        self.tokens_per_s = tokens_per_s


class ReplyDone(Message):
    """The reply is recorded and its KV state saved (or it failed before it began)."""

    def __init__(
        self, outcome: ReplyOutcome | None, error: str | None = None, unsent: str | None = None
    ) -> None:
        super().__init__()
        self.outcome = outcome
        self.error = error
        self.unsent = unsent
        """The message that could not be committed (a full disk, a conversation deleted
        elsewhere): it goes back into the message box, never lost."""
        self.generated_at = time.perf_counter()  # posted by the worker after the last token


class ServiceDone(Message):
    """A conversation-service call made in a worker thread returned `result`."""

    def __init__(self, then: Callable[[Any], Any] | None, result: Any) -> None:
        super().__init__()
        self.then = then
        self.result = result


class ServiceFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error
