"""The engine on the tiny model through the real llama.cpp."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from starling_local.chat.template import END_OF_TURN_ID, Message, render_tokens
from starling_local.engine.runtime import Engine
from starling_local.engine.types import SamplingParams
from starling_local.gguf.info import GGUFError
from tests.prompting import generate

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def test_stops_at_max_tokens(engine: Engine) -> None:
    reply = generate(engine, [Message("user", "Hello")], params=GREEDY)
    text = reply.stream.consume()
    stats = reply.stream.stats
    assert stats.stop_reason == "length"
    assert stats.completion_tokens == 24
    assert text and text == text.lstrip()
    assert stats.ttft_s > 0 and stats.decode_tokens_per_s > 0
    assert stats.prompt_tokens == 17


def test_greedy_is_deterministic_and_seeded_sampling_repeats(engine: Engine) -> None:
    a = generate(engine, [Message("user", "One")], params=GREEDY).stream.consume()
    b = generate(engine, [Message("user", "One")], params=GREEDY).stream.consume()
    assert a == b
    seeded = SamplingParams(temperature=1.0, max_tokens=16, seed=42)
    c = generate(engine, [Message("user", "Two")], params=seeded).stream.consume()
    d = generate(engine, [Message("user", "Two")], params=seeded).stream.consume()
    assert c == d


@pytest.mark.parametrize("fixture", ["eager_gguf", "eager_eos2_gguf"])
def test_stops_at_end_of_turn_whatever_the_files_eos(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(fixture)
    eng = Engine(path, n_ctx=512)
    try:
        reply = generate(
            eng, [Message("user", "Hello")], params=SamplingParams(temperature=0, max_tokens=200)
        )
        reply.stream.consume()
        stats = reply.stream.stats
        assert stats.stop_reason == "end_of_turn"
        assert 0 < stats.completion_tokens < 200
        assert END_OF_TURN_ID not in reply.stream.token_ids
        assert "<|end_of_turn|>" not in reply.stream.text
    finally:
        eng.close()


def test_eos2_file_is_compensated_at_load(eager_eos2_gguf: Path) -> None:
    eng = Engine(eager_eos2_gguf, n_ctx=256)
    try:
        assert eng.info.eos_id == 2
        assert eng.eos_token_id == END_OF_TURN_ID
    finally:
        eng.close()


def test_cancel_from_another_thread(engine: Engine) -> None:
    cancel = threading.Event()
    reply = generate(
        engine,
        [Message("user", "Tell me everything")],
        params=SamplingParams(temperature=0, max_tokens=500),
        cancel=cancel,
    )
    chunks = []
    for chunk in reply.stream:
        chunks.append(chunk)
        if len(chunks) == 3:
            threading.Thread(target=cancel.set).start()
            cancel.wait()
    assert reply.stream.stats.stop_reason == "cancelled"
    assert reply.stream.stats.completion_tokens < 10


def test_multibyte_characters_never_split(vocab: Engine, engine: Engine) -> None:
    text = "Llamas 🦙 say “héllo” — 日本語 ✓"
    tokens = vocab.tokenize_text(text)
    assert len(tokens) > len(text.split())  # byte-fallback tokens are involved
    decoder = engine.reply_decoder()
    pieces = [decoder.push(t) for t in tokens] + [decoder.flush()]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == text
    # Each piece is whole characters: no piece is a fragment of a multi-byte character.
    assert all(p.encode("utf-8").decode("utf-8") == p for p in pieces)


def test_kv_cache_reused_across_turns(engine: Engine) -> None:
    first = [Message("user", "Hello there, how are you?")]
    r1 = generate(engine, first, params=GREEDY)
    reply_text = r1.stream.consume()
    p1 = r1.prompt.tokens
    ids = tuple(r1.stream.token_ids)
    second = [*first, Message("assistant", reply_text, ids), Message("user", "And then?")]
    p2 = render_tokens(second, engine.tokenize_text)
    r2 = generate(engine, second, params=GREEDY)
    r2.stream.consume()
    assert r2.prompt.tokens == p2
    assert p2[: len(p1) + len(ids)] == p1 + list(ids)  # the reply re-enters as generated
    # Only what follows the reply is evaluated (plus the reply's last token, which was sampled
    # but never fed back): nothing of turn 1 again.
    assert r2.stream.stats.prompt_evaluated == len(p2) - len(p1) - len(ids) + 1
    # Without the ids, the text re-tokenizes canonically: still nothing of turn 1's prompt.
    plain = [*first, Message("assistant", reply_text), Message("user", "And then?")]
    r3 = generate(engine, plain, params=GREEDY)
    r3.stream.consume()
    assert r3.prompt.tokens == render_tokens(plain, engine.tokenize_text)


def test_context_overflow_drops_turns_and_says_so(tiny_q4: Path) -> None:
    eng = Engine(tiny_q4, n_ctx=256)
    try:
        history = []
        for i in range(12):
            history += [
                Message("user", f"question {i} " * 6),
                Message("assistant", f"answer {i} " * 6),
            ]
        history.append(Message("user", "now"))
        reply = generate(eng, history, params=SamplingParams(temperature=0, max_tokens=32))
        reply.stream.consume()
        assert reply.prompt.dropped_messages > 0
        assert len(reply.prompt.tokens) + reply.stream.stats.completion_tokens <= 256
    finally:
        eng.close()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a GGUF file"),
        (b"not a gguf at all", "not a GGUF file"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=message) as info:
        Engine(path)
    assert "\n" not in str(info.value)


def test_truncated_gguf_is_refused_before_llama_cpp(tiny_q4: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    data = tiny_q4.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="truncated GGUF"):
        Engine(cut)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:5000])
    with pytest.raises(GGUFError, match="damaged or truncated"):
        Engine(header_only)
