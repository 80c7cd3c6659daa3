"""Multi-turn cost: a scripted 10-turn conversation, prompt tokens evaluated and TTFT per turn."""

from __future__ import annotations

from dataclasses import dataclass

from starling_local.chat.session import start_reply
from starling_local.chat.template import Message
from starling_local.engine.runtime import Engine
from starling_local.engine.types import SamplingParams

TOPICS = [
    "rivers",
    "mountains",
    "llamas",
    "compilers",
    "bread",
    "tides",
    "violins",
    "comets",
    "gardens",
    "bridges",
    "glaciers",
    "maps",
]


@dataclass
class TurnResult:
    turn: int
    prompt_tokens: int
    prompt_evaluated: int
    new_tokens: int
    ttft_s: float


def user_message(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return f"Tell me three surprising facts about {topic}, then ask me a question about {topic}."


def multi_turn(engine: Engine, turns: int = 10, reply_tokens: int = 32) -> list[TurnResult]:
    """Each turn's prompt is the whole conversation; only the new part should be evaluated."""
    engine.clear_cache()
    params = SamplingParams(temperature=0.0, max_tokens=reply_tokens, ignore_eos=True)
    history: list[Message] = []
    results = []
    previous = 0
    for i in range(turns):
        history.append(Message("user", user_message(i)))
        reply = start_reply(engine, history, params=params)
        text = reply.stream.consume()
        s = reply.stream.stats
        results.append(
            TurnResult(
                i + 1, s.prompt_tokens, s.prompt_evaluated, s.prompt_tokens - previous, s.ttft_s
            )
        )
        previous = s.prompt_tokens + s.completion_tokens
        history.append(Message("assistant", text, tuple(reply.stream.token_ids)))
    return results
