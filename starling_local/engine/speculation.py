"""Speculative decoding: the draft/verify loop, and the cost policy that decides how many
drafted tokens a step verifies.

Drafts are copied from the conversation itself (`lookup.LookupDrafter`); a step verifies them
in the same batch as the pending token, in batches no larger than the machine computes exactly
as single tokens (`batch_cost`, measured once per machine and model, then cached). Each token is
still the model's own choice, sampled as plain decoding samples it.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace
from typing import Any

from starling_local.engine import batch_cost
from starling_local.engine.batch_cost import BatchCost
from starling_local.engine.logprobs import TokenLogprob, token_logprob
from starling_local.engine.lookup import MAX_DRAFT, DraftPolicy, LookupDrafter
from starling_local.engine.types import GenerationStats
from starling_local.paths import get_paths


class Speculation:
    """One engine's batch-cost curve and the drafting policy made from it (the engine owns
    it and calls it with its context held)."""

    def __init__(self, adapter: Any, model_key: str, key: tuple[object, ...]) -> None:
        self._adapter = adapter
        self._key = batch_cost.cache_key(model_key, key)
        self._cost: BatchCost | None = None
        self._policy: DraftPolicy | None = None

    def policy(self, llm: Any) -> DraftPolicy:
        """The drafting policy, from this machine's batch-cost curve for this model."""
        if self._policy is None:
            cost = self.cost(llm)
            self._policy = DraftPolicy(cost.relative(), most=cost.exact - 1)
        return self._policy

    def cost(self, llm: Any, fresh: bool = False) -> BatchCost:
        """The curve: measured on first use (or now, if `fresh`), then read from the cache."""
        if fresh:
            self._cost, self._policy = None, None
        if self._cost is not None:
            return self._cost
        path = get_paths().cache / "batch-cost.json"
        cost = None if fresh else batch_cost.load_cached(path, self._key)
        if cost is None:
            cached = self._adapter.cached_tokens(llm)
            cost = batch_cost.measure(llm, self._adapter)
            if cached:  # measuring emptied the cache
                self._adapter.clear_cache(llm)
            batch_cost.save_cached(path, self._key, cost)
        self._cost = cost
        return cost

    def use_cost(self, llm: Any, cost: BatchCost) -> None:
        """Draft as if decoding cost `cost`; the acceptance seen so far is forgotten. The
        largest exact batch is never more than the measured one."""
        measured = self.cost(llm)
        self._cost = replace(cost, exact=min(cost.exact, measured.exact))
        self._policy = None


def decode_tokens(
    adapter: Any,
    llm: Any,
    sampler: Any,
    prompt: list[int],
    budget: int,
    policy: DraftPolicy | None,
    stats: GenerationStats,
    logprobs: int | None = None,
) -> Generator[tuple[int, TokenLogprob | None], None, None]:
    """The model's tokens after `prompt` (all but its last token already evaluated).

    With a `policy`, each step may verify drafted tokens (copied from earlier in the
    conversation) in the same batch as the pending token: the model's own choice is sampled
    at every position, drafts are kept while they equal it, and the first differing choice
    ends the step. Every token is thus sampled exactly as plain decoding samples it (same
    sampler, one draw per token), and the rejected tail leaves the KV cache. With
    `logprobs`, each token comes with its log-probability (else None)."""
    drafter = LookupDrafter(prompt) if policy is not None else None
    if policy is not None:
        policy.new_reply()
    pending = prompt[-1]
    emitted = 0
    limit = min(MAX_DRAFT, adapter.max_batch(llm) - 1, policy.most if policy else 0)
    stats.draft_limit = limit
    while True:
        drafted: tuple[int, ...] = ()
        match = 0
        room = min(limit, budget - emitted - 1)
        if drafter is not None and policy is not None and room > 0:
            draft = drafter.draft(room)
            if draft is not None:
                match = draft.match
                drafted = draft.tokens[: policy.length(match, len(draft.tokens))]
        n_past = adapter.n_cached(llm)
        adapter.decode(llm, [pending, *drafted], outputs=1 + len(drafted))
        out: list[int] = []
        scores: list[TokenLogprob | None] = []
        for i in range(len(drafted) + 1):
            token = adapter.sample(llm, sampler, i)
            out.append(token)
            scores.append(
                None
                if logprobs is None
                else token_logprob(adapter.logits_row(llm, i), token, logprobs)
            )
            if i == len(drafted) or token != drafted[i]:
                break
        accepted = len(out) - 1
        if drafted:
            adapter.truncate_cache(llm, n_past + 1 + accepted)
            stats.draft_tokens += len(drafted)
            stats.accepted_tokens += accepted
            assert policy is not None
            policy.record(match, len(drafted), accepted)
        if drafter is not None:
            drafter.extend(out)
        emitted += len(out)
        yield from zip(out, scores, strict=True)
        pending = out[-1]
