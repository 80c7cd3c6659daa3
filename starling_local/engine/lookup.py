"""Prompt-lookup drafting: guess the next tokens by copying what followed the same tokens
earlier in the conversation, and decide how many guesses are worth verifying.

The drafter only proposes; the engine verifies every drafted token against the model's own
choice (see `runtime.Engine`), so a bad guess costs time, never correctness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: The shortest match (in tokens) a draft is copied from.
MIN_MATCH = 2
#: How far back a match is extended to measure its length.
MAX_MATCH = 16
#: The most drafted tokens one verification batch holds.
MAX_DRAFT = 15
#: Earlier occurrences of a key remembered (most recent first).
_CANDIDATES = 4


@dataclass(frozen=True)
class Draft:
    """Tokens that followed an earlier occurrence of the conversation's last `match` tokens."""

    tokens: tuple[int, ...]
    match: int


class LookupDrafter:
    """An index of the token history (prompt, then reply) by bigram, for `draft()`."""

    def __init__(self, history: Sequence[int]) -> None:
        self._history: list[int] = []
        self._index: dict[tuple[int, int], list[int]] = {}
        for token in history:
            self.append(token)

    def append(self, token: int) -> None:
        """Add the next token of the history."""
        h = self._history
        h.append(token)
        n = len(h)
        if n >= 3:
            # The bigram ending just before the new token is followed by it (position n-1).
            positions = self._index.setdefault((h[n - 3], h[n - 2]), [])
            positions.insert(0, n - 1)
            del positions[_CANDIDATES:]

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.append(token)

    def draft(self, limit: int) -> Draft | None:
        """Up to `limit` tokens that followed the longest earlier match of the history's end."""
        h = self._history
        n = len(h)
        if limit <= 0 or n < MIN_MATCH + 1:
            return None
        best_start, best_match = -1, 0
        for start in self._index.get((h[n - 2], h[n - 1]), ()):
            match = MIN_MATCH
            while (
                match < MAX_MATCH
                and start - match - 1 >= 0
                and h[start - match - 1] == h[n - match - 1]
            ):
                match += 1
            if match > best_match:
                best_start, best_match = start, match
        if best_start < 0:
            return None
        return Draft(tuple(h[best_start : best_start + limit]), best_match)


#: Match lengths grouped for acceptance: 2, 3-4, 5-7, 8 and more tokens.
_BUCKET_STARTS = (2, 3, 5, 8)
#: The chance a drafted token is right before any is verified, by bucket. On SmolLM2's own
#: replies to code-edit and quote prompts: 2-token matches ~60%, 8+ tokens ~98%.
_PRIORS = (0.45, 0.6, 0.75, 0.9)


@dataclass
class DraftPolicy:
    """How many drafted tokens to verify, from the batch-cost curve and the acceptance seen.

    With per-token acceptance `p`, a batch of the pending token and `k` drafts yields
    `1 + p + ... + p^k` tokens on average and costs `cost(k + 1)` times one token: draft the
    `k` that maximizes their ratio, and nothing unless it beats plain decoding.
    """

    cost: Sequence[float]
    """`cost[n]`: a batch of n tokens relative to one token (`cost[1]` = 1)."""
    most: int = MAX_DRAFT
    """The most drafted tokens one batch may hold (the machine's largest exact batch, less
    the pending token)."""
    margin: float = 1.03
    explore_every: int = 8
    """When drafting does not look worth it, still verify one or two drafted tokens at every
    this many chances (estimates must be able to recover after a run of bad luck), or less
    often where a batch of two costs more than 1.25 tokens (see `_explore_interval`)."""
    _skipped: int = 0
    _tested: list[float] = field(default_factory=lambda: [0.0] * len(_BUCKET_STARTS))
    _accepted: list[float] = field(default_factory=lambda: [0.0] * len(_BUCKET_STARTS))

    @staticmethod
    def _bucket(match: int) -> int:
        return max(i for i, start in enumerate(_BUCKET_STARTS) if match >= start or i == 0)

    def acceptance(self, match: int) -> float:
        """The expected chance that a token drafted from a match of `match` tokens is right."""
        b = self._bucket(match)
        weight = 3.0
        return (self._accepted[b] + weight * _PRIORS[b]) / (self._tested[b] + weight)

    def length(self, match: int, available: int) -> int:
        """How many of `available` drafted tokens are worth verifying (0: decode plainly)."""
        p = min(self.acceptance(match), 0.98)
        best_k, gain = best_draft(p, self.cost, available)
        if gain < self.margin:
            best_k = 0
        if best_k == 0 and match > MIN_MATCH and available > 0:
            self._skipped += 1
            if self._skipped >= self._explore_interval():
                self._skipped = 0
                return min(available, 1 if match < 8 else 2)
        return best_k

    def _explore_interval(self) -> int:
        """A probe of one drafted token costs `cost[2] - 1` tokens when it fails: on a GPU
        (~0.05) probe every `explore_every` chances, on a small CPU (0.5-0.75) 2-3x as rarely."""
        extra = self.cost[2] - 1 if len(self.cost) > 2 else 0.0
        return round(self.explore_every * max(1.0, extra / 0.25))

    def new_reply(self) -> None:
        """A new reply starts: what earlier replies showed counts half as much."""
        self._tested = [t * 0.5 for t in self._tested]
        self._accepted = [a * 0.5 for a in self._accepted]

    def record(self, match: int, drafted: int, accepted: int) -> None:
        """`accepted` of `drafted` tokens were right (the first wrong one ended the check)."""
        b = self._bucket(match)
        # Older evidence fades, so a conversation that stops repeating itself stops drafting.
        self._tested[b] = self._tested[b] * 0.95 + min(drafted, accepted + 1)
        self._accepted[b] = self._accepted[b] * 0.95 + accepted


def best_draft(p: float, cost: Sequence[float], available: int = MAX_DRAFT) -> tuple[int, float]:
    """The draft length k (<= `available`) with the best expected speedup when each drafted
    token is right with chance `p`, and that speedup: a batch of the pending token and k drafts
    yields `1 + p + ... + p^k` tokens and costs `cost[k + 1]` single-token decodes."""
    best_k, best_gain = 0, 1.0
    expected = 1.0
    for k in range(1, min(available, MAX_DRAFT, len(cost) - 2) + 1):
        expected += p**k
        gain = expected / cost[k + 1]
        if gain > best_gain:
            best_k, best_gain = k, gain
    return best_k, best_gain
