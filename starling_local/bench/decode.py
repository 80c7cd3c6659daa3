"""Decode speed: llama.cpp's own loop (the ceiling) against starling-local's streaming path."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starling_local.chat.prompts import fit_messages
from starling_local.chat.service import ConversationService, ReplyHooks
from starling_local.chat.settings import ConversationSettings
from starling_local.chat.template import Message
from starling_local.engine.compute import on_compute_thread
from starling_local.engine.runtime import Engine
from starling_local.engine.types import SamplingParams

PROMPT = "Write a long story about a llama who learns to program, with many chapters."


@dataclass
class DecodeResult:
    raw_tokens_per_s: float
    starling_tokens_per_s: float
    tokens: int
    ratio: float
    """Median over rounds of (starling / raw) measured back to back: robust to machine drift."""


def raw_decode(engine: Engine, prompt: list[int], n: int) -> float:
    """Tokens/s of a bare `llama_decode` + greedy-sampler loop on the engine's own context (on
    the compute thread, where the engine's own decodes run too)."""
    import llama_cpp

    def loop(ctx: Any) -> float:
        arr = (llama_cpp.llama_token * len(prompt))(*prompt)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(prompt))) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        sampler = llama_cpp.llama_sampler_init_greedy()
        one = (llama_cpp.llama_token * 1)()
        try:
            start = time.perf_counter()
            for _ in range(n):
                one[0] = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
                llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1))
            elapsed = time.perf_counter() - start
        finally:
            llama_cpp.llama_sampler_free(sampler)
        return n / elapsed

    with engine.raw_context() as ctx:
        return on_compute_thread(loop, ctx)


def starling_decode(engine: Engine, n: int, consume: Callable[[str], None] | None = None) -> float:
    """Decode tokens/s of the path `starling ask --no-save` takes (the conversation service,
    text chunks out)."""
    settings = ConversationSettings(
        sampling=SamplingParams(temperature=0.0, max_tokens=n + 1, ignore_eos=True)
    )
    engine.clear_cache()  # start from an empty cache, like the raw loop
    service = ConversationService(None, engine, owns_engine=False)
    hooks = ReplyHooks(on_text=lambda text, stream: consume(text)) if consume else None
    outcome = service.answer([Message("user", PROMPT)], settings, hooks=hooks)
    return outcome.stats.decode_tokens_per_s


def compare_decode(engine: Engine, n: int = 128, rounds: int = 5) -> DecodeResult:
    """Best of `rounds` for each, alternating the two so that machine noise hits both alike;
    the ratio is the median of the per-round ratios."""
    prompt = fit_messages(engine, [Message("user", PROMPT)], ConversationSettings()).tokens
    raw: list[float] = []
    ours: list[float] = []
    for _ in range(rounds):
        raw.append(raw_decode(engine, prompt, n))
        ours.append(starling_decode(engine, n, consume=lambda chunk: None))
    ratios = sorted(o / r for o, r in zip(ours, raw, strict=True))
    return DecodeResult(max(raw), max(ours), n, ratios[len(ratios) // 2])
