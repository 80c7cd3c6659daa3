"""Messages that workers and widgets post; the chat screen handles them (and persists)."""

from __future__ import annotations

import time
from typing import Any

from textual.message import Message


class ModelLoading(Message):
    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction


class ModelLoaded(Message):
    def __init__(self, engine: Any) -> None:
        super().__init__()
        self.engine = engine


class ModelFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class ReplyStarted(Message):
    def __init__(self, reply: Any) -> None:
        super().__init__()
        self.reply = reply


class ReplyChunk(Message):
    def __init__(self, text: str, tokens: int, tokens_per_s: float) -> None:
        super().__init__()
        self.text = text
        self.tokens = tokens
        self.tokens_per_s = tokens_per_s


class ReplyDone(Message):
    def __init__(self, stream: Any, error: str | None = None) -> None:
        super().__init__()
        self.stream = stream
        self.error = error
        self.generated_at = time.perf_counter()  # posted by the worker after the last token
