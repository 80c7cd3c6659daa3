"""Multi-turn cost: a scripted 10-turn conversation, prompt tokens evaluated and TTFT per turn."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from starling_local.chat.service import ConversationService
from starling_local.chat.settings import ConversationSettings
from starling_local.engine.runtime import Engine
from starling_local.engine.types import SamplingParams
from starling_local.store.conversations import ConversationStore

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
    """A saved conversation, turn by turn as the app runs it (each reply recorded and its KV
    state file saved): each turn's prompt is the whole conversation, and only the new part
    should be evaluated."""
    engine.clear_cache()
    sampling = SamplingParams(temperature=0.0, max_tokens=reply_tokens, ignore_eos=True)
    results = []
    previous = 0
    with tempfile.TemporaryDirectory() as tmp:
        store = ConversationStore(Path(tmp) / "history.db")
        service = ConversationService(store, engine, owns_engine=False, kv_root=Path(tmp) / "kv")
        try:
            cid: int | None = None
            for i in range(turns):
                cid = service.send(cid, user_message(i), ConversationSettings(sampling=sampling)).id
                s = service.reply(cid).stats
                results.append(
                    TurnResult(
                        i + 1,
                        s.prompt_tokens,
                        s.prompt_evaluated,
                        s.prompt_tokens - previous,
                        s.ttft_s,
                    )
                )
                previous = s.prompt_tokens + s.completion_tokens
        finally:
            service.close()
    return results
