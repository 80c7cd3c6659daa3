"""Pacing a streaming reply for the screen: text is gathered in the generating thread and
posted at most once a frame, less often while the last paragraph grows long."""

from __future__ import annotations

import time
from collections.abc import Callable

from starling_local.engine.runtime import EngineStream
from starling_local.tui.messages import ReplyChunk

#: The streaming reply is shown at most this often (seconds).
UI_UPDATE_S = 1 / 10


def ui_interval(tail_chars: int) -> float:
    """Seconds between screen updates of a streaming reply whose last paragraph is
    `tail_chars` long: 1/10 s, growing with the paragraph so rendering stays a small cost."""
    return min(1.0, max(UI_UPDATE_S, tail_chars / 30_000))


class ChunkBatcher:
    """Collects reply text and posts `ReplyChunk`s. A message per token would make the UI
    thread (Markdown re-renders the last paragraph each time) compete with generation."""

    def __init__(self, post: Callable[[ReplyChunk], object]) -> None:
        self._post = post
        self._pending: list[str] = []
        self._tail = 0  # characters since the last paragraph break
        self._start = time.perf_counter()
        self._last = self._start
        self._tokens = 0

    def feed(self, chunk: str, stream: EngineStream) -> None:
        self._pending.append(chunk)
        self._tokens = stream.stats.completion_tokens
        _head, brk, rest = chunk.rpartition("\n\n")
        self._tail = len(rest) if brk else self._tail + len(chunk)
        if time.perf_counter() - self._last >= ui_interval(self._tail):
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        now = time.perf_counter()
        rate = self._tokens / max(now - self._start, 1e-9)
        self._post(ReplyChunk("".join(self._pending), self._tokens, rate))
        self._pending.clear()
        self._last = now
