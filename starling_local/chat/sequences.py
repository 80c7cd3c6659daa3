"""Several conversations on one engine without re-evaluating each other's history.

The engine has one KV cache. When a prompt does not continue what the cache holds (another
client's conversation, another saved conversation), the cache would be overwritten. Before
that, a copy goes into RAM (least recently used first out, under a byte cap); a later prompt
that continues one of the copies gets it back, and only its new tokens are evaluated.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

from starling_local.chat.template import Message
from starling_local.config import environment
from starling_local.engine.interface import EngineLike
from starling_local.engine.types import KVSnapshot

#: A cache that would lose fewer tokens than this is not worth copying.
MIN_WORTH = 32


def cap_bytes() -> int:
    return environment().sequence_cache_bytes


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class SequenceCache:
    """KV snapshots of recent sequences, kept for prompts that continue them."""

    def __init__(self, cap: int | None = None) -> None:
        self.cap = cap if cap is not None else cap_bytes()
        self._entries: list[KVSnapshot] = []  # most recently used last
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def prepare(self, engine: EngineLike, prompt: Sequence[int]) -> int:
        """Make the engine's cache hold as much of `prompt` as any kept sequence does: keep the
        live cache first if `prompt` would overwrite a worthwhile part of it. Returns the tokens
        of `prompt` now cached. Call it with the engine to yourself (one reply at a time)."""
        live = engine.cached_prefix(prompt)
        held = engine.cached_tokens
        with self._lock:
            best = max(self._entries, key=lambda e: common_prefix(e.tokens, prompt), default=None)
            best_len = common_prefix(best.tokens, prompt) if best else 0
        if held - live >= MIN_WORTH:
            snapshot = engine.snapshot()
            if snapshot is not None:
                self.add(snapshot)
        if best is None or best_len <= live + 1:
            return live
        restored = engine.restore(best)
        with self._lock:
            if best in self._entries:
                self._entries.remove(best)  # it is the live cache now
        return min(restored, best_len)

    def add(self, snapshot: KVSnapshot) -> None:
        with self._lock:
            # A sequence this one continues is redundant.
            self._entries = [
                e for e in self._entries if common_prefix(e.tokens, snapshot.tokens) < len(e.tokens)
            ]
            self._entries.append(snapshot)
            total = sum(e.nbytes for e in self._entries)
            while total > self.cap and len(self._entries) > 1:
                total -= self._entries.pop(0).nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class RecentReplies:
    """The token ids of recent replies, by their text. Clients of the server send the whole
    conversation as text every turn; a reply re-tokenized from its text can differ from the ids
    it was generated as, which would cost the KV cache from that point on. Rendered as its own
    ids, the reply matches the cache, and only the new turn is evaluated."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, text: str, token_ids: Sequence[int]) -> None:
        key = text.strip()
        if not key or not token_ids:
            return
        with self._lock:
            self._ids[key] = tuple(token_ids)
            self._ids.move_to_end(key)
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)

    def exact(self, messages: Sequence[Message]) -> list[Message]:
        """`messages` with the ids of the replies it remembers attached."""
        out = []
        with self._lock:
            for m in messages:
                ids = self._ids.get(m.content.strip()) if m.role == "assistant" else None
                out.append(replace(m, tokens=ids) if ids and not m.tokens else m)
        return out
