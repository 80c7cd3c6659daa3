"""Conversations that resume: KV caches saved per conversation and loaded in a new engine."""

from __future__ import annotations

from pathlib import Path

from starling_local.chat.kv_cache import ConversationCache, forget
from starling_local.chat.session import start_reply
from starling_local.chat.template import Message
from starling_local.engine.runtime import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def _conversation(engine: Engine) -> list[Message]:
    history = [Message("user", "Tell me a long story about " + "llamas and alpacas " * 40)]
    r = start_reply(engine, history, params=GREEDY)
    r.stream.consume()
    return [*history, Message("assistant", r.stream.text, tuple(r.stream.token_ids))]


def test_resume_in_a_new_engine_evaluates_only_the_new_turn(tiny_q4: Path, tmp_path: Path) -> None:
    first = Engine(tiny_q4, n_ctx=2048)
    history = _conversation(first)
    cache = ConversationCache(first, root=tmp_path)
    assert cache.save(1) > 0
    messages = [*history, Message("user", "And then?")]
    live = start_reply(first, messages, params=GREEDY)
    live_text = live.stream.consume()
    first.close()

    second = Engine(tiny_q4, n_ctx=2048)
    restored: list[int] = []
    later = ConversationCache(second, root=tmp_path)
    r = start_reply(
        second, messages, params=GREEDY, resume=lambda t: restored.append(later.restore(1, t))
    )
    assert r.stream.consume() == live_text  # the restored cache is the live one, bit for bit
    assert restored[0] > 300
    assert r.stream.stats.prompt_evaluated == live.stream.stats.prompt_evaluated
    assert r.stream.stats.prompt_evaluated == r.stream.stats.prompt_tokens - restored[0]
    assert r.stream.stats.prompt_evaluated < 30  # "And then?" and its template, not the story
    second.close()


def test_bad_or_foreign_state_files_fall_back_to_full_evaluation(
    tiny_q4: Path, tmp_path: Path
) -> None:
    engine = Engine(tiny_q4, n_ctx=512)
    cache = ConversationCache(engine, root=tmp_path)
    path = cache.path_for(5)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage" * 100)
    prompt = start_reply(engine, [Message("user", "hi")], params=GREEDY).prompt.tokens
    assert cache.restore(5, prompt) == 0
    r = start_reply(engine, [Message("user", "hi")], params=GREEDY)
    r.stream.consume()
    assert r.stream.stats.completion_tokens == 8
    engine.close()


def test_cap_and_forget(tiny_q4: Path, tmp_path: Path) -> None:
    engine = Engine(tiny_q4, n_ctx=1024)
    _conversation(engine)
    cache = ConversationCache(engine, root=tmp_path)
    size = cache.save(1)
    cache.cap = int(size * 2.5)  # room for two
    for cid in (2, 3, 4):
        cache.save(cid)
    left = sorted(p.name for p in tmp_path.glob("*/*.kv"))
    assert left == ["conversation-3.kv", "conversation-4.kv"]  # least recently used went first
    forget(4, root=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*/*.kv")) == ["conversation-3.kv"]
    engine.close()
