"""Resume: TTFT of a reply in a live 2,000-token conversation, after reopening it in a new
process with its saved KV cache, and after reopening it without (full re-evaluation)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from starling_local.chat.kv_cache import ConversationCache
from starling_local.chat.session import start_reply
from starling_local.chat.template import Message
from starling_local.engine.runtime import Engine
from starling_local.engine.types import SamplingParams

CONVERSATION_ID = 1
REPLY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

_TURN_IN_NEW_PROCESS = """
import json, sys, time
from pathlib import Path
from starling_local.chat.kv_cache import ConversationCache
from starling_local.chat.session import start_reply
from starling_local.chat.template import Message
from starling_local.engine.runtime import Engine
from starling_local.engine.types import SamplingParams
model, history_file, root, use_cache = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
history = [Message(m["role"], m["content"], tuple(m["tokens"]) if m["tokens"] else None)
           for m in json.loads(Path(history_file).read_text())]
engine = Engine(model, n_ctx=4096)
cache = ConversationCache(engine, root=Path(root))
messages = [*history, Message("user", "And what happened next?")]
start = time.perf_counter()
resume = (lambda tokens: cache.restore(1, tokens)) if use_cache else None
reply = start_reply(engine, messages, params=SamplingParams(temperature=0.0, max_tokens=4,
                    ignore_eos=True), resume=resume)
next(iter(reply.stream))
ttft = time.perf_counter() - start
reply.stream.consume()
print(json.dumps({"ttft_s": ttft, "prompt_tokens": reply.stream.stats.prompt_tokens,
                  "prompt_evaluated": reply.stream.stats.prompt_evaluated}))
"""


def build_history(engine: Engine, target_tokens: int) -> list[Message]:
    """A conversation of about `target_tokens`, grown turn by turn as a user would."""
    history: list[Message] = []
    i = 0
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    while True:
        history.append(
            Message(
                "user",
                f"Chapter {i}: tell me more about the llama who "
                f"learned to program, and about its friends. " * 3,
            )
        )
        reply = start_reply(engine, history, params=params)
        reply.stream.consume()
        history.append(Message("assistant", reply.stream.text, tuple(reply.stream.token_ids)))
        i += 1
        if reply.stream.stats.prompt_tokens + reply.stream.stats.completion_tokens >= target_tokens:
            return history


def ttft_live(engine: Engine, history: list[Message], resume: Any = None) -> dict[str, Any]:
    messages = [*history, Message("user", "And what happened next?")]
    start = time.perf_counter()
    reply = start_reply(engine, messages, params=REPLY, resume=resume)
    next(iter(reply.stream))
    ttft = time.perf_counter() - start
    reply.stream.consume()
    s = reply.stream.stats
    return {
        "ttft_s": ttft,
        "prompt_tokens": s.prompt_tokens,
        "prompt_evaluated": s.prompt_evaluated,
    }


def _in_new_process(model: Path, history_file: Path, root: Path, use_cache: bool) -> Any:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _TURN_IN_NEW_PROCESS,
            str(model),
            str(history_file),
            str(root),
            "1" if use_cache else "0",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def resume_figures(model: Path, target_tokens: int = 2000) -> dict[str, Any]:
    engine = Engine(model, n_ctx=4096)
    history = build_history(engine, target_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = ConversationCache(engine, root=root)
        state_bytes = cache.save(CONVERSATION_ID)
        snapshot = engine.snapshot()
        live = ttft_live(engine, history)
        # The same live turn as a saved conversation's turn runs it: with its state file on
        # disk. The file is read only if it covers more than the live cache (here: none of
        # it); before, every turn loaded the whole file ("forced").
        read: list[int] = []
        assert snapshot is not None
        engine.restore(snapshot)
        with _counting_reads(read):
            checked = ttft_live(engine, history, lambda t: cache.restore(CONVERSATION_ID, t))
        engine.restore(snapshot)
        path = cache.path_for(CONVERSATION_ID)
        forced = ttft_live(engine, history, lambda t: engine.load_state(path))
        engine.close()
        history_file = root / "history.json"
        history_file.write_text(
            json.dumps(
                [
                    {"role": m.role, "content": m.content, "tokens": list(m.tokens or [])}
                    for m in history
                ]
            )
        )
        reopened = _in_new_process(model, history_file, root, use_cache=True)
        full = _in_new_process(model, history_file, root, use_cache=False)
    return {
        "conversation_tokens": live["prompt_tokens"],
        "state_file_bytes": state_bytes,
        "live": live,
        "reopened_with_cache": reopened,
        "reopened_without_cache": full,
        "reopened_vs_live": reopened["ttft_s"] / live["ttft_s"],
        "full_vs_reopened": full["ttft_s"] / reopened["ttft_s"],
        "live_with_state_file": {
            **checked,
            "state_bytes_read": sum(read),
            "before_ttft_s": forced["ttft_s"],
            "before_state_bytes_read": state_bytes,
        },
    }


@contextlib.contextmanager
def _counting_reads(into: list[int]) -> Iterator[None]:
    """Count the payload bytes read from KV state files while the block runs."""
    from starling_local.engine import state_file

    real = state_file.read_state_file

    def counting(path: Path, **kw: str) -> tuple[list[int], bytearray]:
        tokens, payload = real(path, **kw)
        into.append(len(payload))
        return tokens, payload

    state_file.read_state_file = counting
    try:
        yield
    finally:
        state_file.read_state_file = real
