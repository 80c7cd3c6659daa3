"""Conversations that resume: KV caches saved per conversation and loaded in a new engine."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import llama_cpp
import pytest

from starling_local.chat.kv_cache import ConversationCache, forget
from starling_local.chat.service import ConversationService, ReplyOutcome
from starling_local.chat.settings import ConversationSettings
from starling_local.chat.template import Message
from starling_local.engine.runtime import Engine
from starling_local.engine.state_file import MAGIC
from starling_local.engine.types import SamplingParams
from starling_local.store.conversations import ConversationStore
from tests.prompting import generate

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
STORY = "Tell me a long story about " + "llamas and alpacas " * 40


def _service(model: Path, history: Path, kv: Path, n_ctx: int = 2048) -> ConversationService:
    """A service as the app makes one, with the store and state files of this test."""
    return ConversationService(ConversationStore(history), Engine(model, n_ctx=n_ctx), kv_root=kv)


def _told(service: ConversationService, cid: int | None, text: str) -> tuple[int, ReplyOutcome]:
    conv = service.send(cid, text, ConversationSettings(sampling=GREEDY))
    return conv.id, service.reply(conv.id)


def _conversation(engine: Engine) -> list[Message]:
    history = [Message("user", STORY)]
    r = generate(engine, history, params=GREEDY)
    r.stream.consume()
    return [*history, Message("assistant", r.stream.text, tuple(r.stream.token_ids))]


def test_a_conversation_resumed_by_a_new_process_evaluates_only_the_new_turn(
    tiny_q4: Path, tmp_path: Path
) -> None:
    """The service saves the conversation's KV state file before its reply returns; a new
    service (a new engine, as a new process has) loads it: only "And then?" and its template
    are evaluated, and the reply is the one a full evaluation of the history gives."""
    db, kv = tmp_path / "history.db", tmp_path / "kv"
    first = _service(tiny_q4, db, kv)
    cid, _ = _told(first, None, STORY)
    first.close()

    second = _service(tiny_q4, db, kv)
    _, resumed = _told(second, cid, "And then?")
    assert resumed.cached_tokens > 300  # the story came from the state file
    assert resumed.stats.prompt_evaluated < 30  # "And then?" and its template, not the story
    second.regenerate(cid)
    second.close()

    cold = _service(tiny_q4, db, tmp_path / "no-state-files")
    again = cold.reply(cid)
    assert again.stats.prompt_evaluated == again.stats.prompt_tokens  # all of it, this time
    assert again.text == resumed.text  # the restored cache is the evaluated one
    cold.close()


def _rewrite_header(path: Path, **changes: object) -> None:
    """Change header fields of a state file, keeping its payload (and checksum) as it is."""
    data = path.read_bytes()
    start = len(MAGIC) + 4
    (length,) = struct.unpack("<I", data[len(MAGIC) : start])
    header = {**json.loads(data[start : start + length]), **changes}
    raw = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(raw)) + raw + data[start + length :])


def _spoil(kind: str, path: Path, foreign: Path) -> None:
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    elif kind == "random":
        path.write_bytes(os.urandom(path.stat().st_size))
    elif kind == "one flipped byte":
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "another model":
        path.write_bytes(foreign.read_bytes())
    elif kind == "another llama-cpp-python":
        _rewrite_header(path, llama_cpp_python="0.3.1")
    elif kind == "another format":
        _rewrite_header(path, format=99)


BAD_FILES = [
    "truncated",
    "random",
    "one flipped byte",
    "another model",
    "another llama-cpp-python",
    "another format",
]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_state_files_are_deleted_and_the_history_evaluated(
    kind: str, tiny_q4: Path, eager_gguf: Path, tmp_path: Path
) -> None:
    """Each of these crashed (or would crash) llama.cpp if it read them: `GGML_ASSERT(nread <=
    state_size)` for a truncated file. The header check stops them first."""
    other = Engine(eager_gguf, n_ctx=1024)
    _conversation(other)
    foreign = ConversationCache(other, root=tmp_path / "other")
    foreign.save(5)
    other.close()

    engine = Engine(tiny_q4, n_ctx=1024)
    history = _conversation(engine)
    cache = ConversationCache(engine, root=tmp_path)
    assert cache.save(5) > 0
    messages = [*history, Message("user", "And then?")]
    engine.close()
    cold = Engine(tiny_q4, n_ctx=1024)  # what a full evaluation of the history gives
    expected = generate(cold, messages, params=GREEDY).stream.consume()
    cold.close()

    path = cache.path_for(5)
    _spoil(kind, path, foreign.path_for(5))
    fresh = Engine(tiny_q4, n_ctx=1024)
    later = ConversationCache(fresh, root=tmp_path)
    r = generate(fresh, messages, params=GREEDY)
    assert later.restore(5, r.prompt.tokens) == 0
    assert not path.exists()  # the bad file is gone
    assert r.stream.consume() == expected  # the reply still comes, the same one
    assert r.stream.stats.prompt_evaluated == r.stream.stats.prompt_tokens  # history evaluated
    fresh.close()


def test_the_header_records_what_made_the_file(tiny_q4: Path, tmp_path: Path) -> None:
    engine = Engine(tiny_q4, n_ctx=1024)
    _conversation(engine)
    cache = ConversationCache(engine, root=tmp_path)
    size = cache.save(1)
    data = cache.path_for(1).read_bytes()
    assert len(data) == size and data.startswith(MAGIC)
    (length,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    header = json.loads(data[len(MAGIC) + 4 : len(MAGIC) + 4 + length])
    assert header["model"] == engine.model_key
    assert header["llama_cpp_python"] == llama_cpp.__version__
    assert header["token_count"] > 300 and header["format"] == 1
    assert (
        len(data) == len(MAGIC) + 4 + length + 4 * header["token_count"] + header["payload_bytes"]
    )
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
