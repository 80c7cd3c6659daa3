"""Pacing a streaming reply for the screen.

Text is gathered in the generating thread and posted to the screen in chunks. How often is set
by what drawing costs: each redraw of a growing reply lays out and repaints the screen (tens of
milliseconds of the UI thread's CPU late in a long reply, even with what scrolled away folded:
widgets/fold.py), and when llama.cpp keeps every core busy, that time is taken from generation
(`starling bench --tui-tokens` and `scripts/fold_cost.py` measure both). So the UI thread
measures its own CPU time per redraw, and redraws are spaced to keep it under a share of the
time: a small share when generation uses every core, ten a second when there is a core to
spare (a GPU, a remote engine, more cores than llama.cpp threads).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from starling_local.engine.types import EngineStream
from starling_local.tui.messages import ReplyChunk

#: The fastest redraw rate of a streaming reply (seconds between redraws).
MIN_INTERVAL_S = 1 / 10
#: The slowest: a reply never waits longer than this to show its new text.
MAX_INTERVAL_S = 2.0
#: Share of one core the screen may spend redrawing while generation uses every core.
BUSY_BUDGET = 0.015
#: ... and while a core is free for it.
FREE_BUDGET = 0.5


def cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def render_budget(generation_threads: int) -> float:
    """Share of a core the screen may spend redrawing while `generation_threads` CPU threads
    generate (0: the work is on a GPU or another machine)."""
    return FREE_BUDGET if generation_threads < cpus_available() else BUSY_BUDGET


class RenderPacer:
    """Seconds between redraws, from the UI thread's CPU time per redraw (`drawn`, called on
    the UI thread) and the budget; read by the generating thread (`interval`)."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self._cost: float | None = None  # UI CPU seconds per redraw, smoothed
        self._cpu_at: float | None = None
        self.redraws = 0

    def drawn(self) -> None:
        """Called on the UI thread as each chunk arrives: the CPU time it used since the last
        chunk is what the last redraw (and anything else it did meanwhile) cost."""
        now = time.thread_time()
        if self._cpu_at is not None:
            spent = now - self._cpu_at
            self._cost = spent if self._cost is None else 0.7 * self._cost + 0.3 * spent
        self._cpu_at = now
        self.redraws += 1

    @property
    def interval(self) -> float:
        if self._cost is None:
            return MIN_INTERVAL_S
        return min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, self._cost / self.budget))


class ChunkBatcher:
    """Collects reply text in the generating thread and posts `ReplyChunk`s as the pacer
    allows (a message per token would redraw per token)."""

    def __init__(
        self, post: Callable[[ReplyChunk], object], pacer: RenderPacer | None = None
    ) -> None:
        self._post = post
        self.pacer = pacer or RenderPacer(FREE_BUDGET)
        self._pending: list[str] = []
        self._start = time.perf_counter()
        self._last = self._start
        self._tokens = 0

    def feed(self, chunk: str, stream: EngineStream) -> None:
        self._pending.append(chunk)
        self._tokens = stream.stats.completion_tokens
        if time.perf_counter() - self._last >= self.pacer.interval:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        now = time.perf_counter()
        rate = self._tokens / max(now - self._start, 1e-9)
        self._post(ReplyChunk("".join(self._pending), self._tokens, rate))
        self._pending.clear()
        self._last = now
