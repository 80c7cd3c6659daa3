"""Resume: TTFT of a reply in a live 2,000-token conversation, after reopening it in a new
process with its saved KV cache, and after reopening it without (full re-evaluation). Every
turn runs as the app runs it: a saved conversation, through the conversation service."""

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

from starling_local.chat.service import ConversationService, ReplyHooks
from starling_local.chat.settings import ConversationSettings
from starling_local.engine.runtime import Engine
from starling_local.engine.types import SamplingParams
from starling_local.store.conversations import ConversationStore

QUESTION = "And what happened next?"
#: The measured reply: a few tokens, for its time to the first one.
REPLY = {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True}

_TURN_IN_NEW_PROCESS = """
import json, sys
from pathlib import Path
from starling_local.bench.resume import open_service, timed_turn
service = open_service(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
print(json.dumps(timed_turn(service, int(sys.argv[4]))))
service.close()
"""


def open_service(
    model: Path, history: Path, kv: Path, engine: Engine | None = None
) -> ConversationService:
    """The service the app would open on this history file and state-file folder."""
    return ConversationService(
        ConversationStore(history),
        engine or Engine(model, n_ctx=4096),
        owns_engine=engine is None,
        kv_root=kv,
    )


def build_history(service: ConversationService, target_tokens: int) -> int:
    """A conversation of about `target_tokens`, grown turn by turn as a user would."""
    settings = ConversationSettings(
        sampling=SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    )
    cid: int | None = None
    i = 0
    while True:
        text = (
            f"Chapter {i}: tell me more about the llama who "
            f"learned to program, and about its friends. " * 3
        )
        cid = service.send(cid, text, settings).id
        s = service.reply(cid).stats
        i += 1
        if s.prompt_tokens + s.completion_tokens >= target_tokens:
            return cid


def timed_turn(service: ConversationService, cid: int) -> dict[str, Any]:
    """The time to the first token of one more turn; the turn is then deleted, leaving the
    conversation as it was."""
    question = service.send(cid, QUESTION).messages[-1]
    first: list[float] = []

    def on_text(text: str, stream: object) -> None:
        if not first:
            first.append(time.perf_counter())

    hooks = ReplyHooks(on_text=on_text)
    start = time.perf_counter()
    outcome = service.reply(cid, hooks=hooks, overrides=REPLY)
    service.delete_pair(cid, question.id)
    s = outcome.stats
    return {
        "ttft_s": first[0] - start,
        "prompt_tokens": s.prompt_tokens,
        "prompt_evaluated": s.prompt_evaluated,
    }


def _in_new_process(model: Path, history: Path, kv: Path, cid: int) -> Any:
    out = subprocess.run(
        [sys.executable, "-c", _TURN_IN_NEW_PROCESS, str(model), str(history), str(kv), str(cid)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def resume_figures(model: Path, target_tokens: int = 2000) -> dict[str, Any]:
    engine = Engine(model, n_ctx=4096)
    with tempfile.TemporaryDirectory() as tmp:
        history, kv = Path(tmp) / "history.db", Path(tmp) / "kv"
        service = open_service(model, history, kv, engine)
        cid = build_history(service, target_tokens)
        (path,) = kv.glob(f"*/conversation-{cid}.kv")
        pristine = path.read_bytes()  # each turn below saves the file again: put it back
        state_bytes = len(pristine)
        snapshot = engine.snapshot()
        assert snapshot is not None
        # The live turn, with its state file on disk: the file is read only if it covers more
        # than the live cache (here: none of it). Before, every turn loaded the whole file.
        read: list[int] = []
        with _counting_reads(read):
            live = timed_turn(service, cid)
        engine.restore(snapshot)
        path.write_bytes(pristine)
        start = time.perf_counter()
        engine.load_state(path)
        loading = time.perf_counter() - start
        forced = timed_turn(service, cid)
        service.close()
        engine.close()
        path.write_bytes(pristine)
        reopened = _in_new_process(model, history, kv, cid)
        full = _in_new_process(model, history, Path(tmp) / "no-state-files", cid)
    return {
        "conversation_tokens": live["prompt_tokens"],
        "state_file_bytes": state_bytes,
        "live": live,
        "reopened_with_cache": reopened,
        "reopened_without_cache": full,
        "reopened_vs_live": reopened["ttft_s"] / live["ttft_s"],
        "full_vs_reopened": full["ttft_s"] / reopened["ttft_s"],
        "live_with_state_file": {
            **live,
            "state_bytes_read": sum(read),
            "before_ttft_s": loading + forced["ttft_s"],
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
