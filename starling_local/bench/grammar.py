"""What a grammar costs: decode speed with a JSON-schema grammar against the same decoding
without one (llama.cpp's grammar sampler checks every candidate token against the grammar)."""

from __future__ import annotations

from typing import Any

from starling_local.chat.template import Message, render_tokens
from starling_local.engine.grammar import schema_grammar
from starling_local.engine.runtime import Engine
from starling_local.engine.types import SamplingParams

#: Open-ended, so that random weights decode as long with it as without: a list of strings.
SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string"}}},
    "required": ["items"],
}
PROMPT = "List everything a llama needs, as JSON."


def grammar_figures(engine: Engine, tokens: int = 128, rounds: int = 5) -> dict[str, Any]:
    """Decode tokens/s with and without the grammar, in alternating rounds (machine drift hits
    both alike); the ratio is the median of the per-round ratios."""
    prompt = render_tokens([Message("user", PROMPT)], engine.tokenize_text)
    grammar = schema_grammar(SCHEMA)
    plain = SamplingParams(temperature=0.0, max_tokens=tokens)
    constrained = SamplingParams(temperature=0.0, max_tokens=tokens, grammar=grammar)
    free: list[float] = []
    bound: list[float] = []
    lengths: list[int] = []
    for _ in range(rounds):
        for params, into in ((plain, free), (constrained, bound)):
            engine.clear_cache()
            stream = engine.generate(prompt, params)
            stream.consume()
            into.append(stream.stats.decode_tokens_per_s)
            if params is constrained:
                lengths.append(stream.stats.completion_tokens)
    ratios = sorted(b / f for b, f in zip(bound, free, strict=True) if f > 0)
    return {
        "schema": SCHEMA,
        "tokens": tokens,
        "constrained_tokens": min(lengths),
        "plain_tokens_per_s": max(free),
        "grammar_tokens_per_s": max(bound),
        "ratio": ratios[len(ratios) // 2] if ratios else 0.0,
    }
