"""Branching: from "branch from here" to the first token of the branch's first reply (the live
cache holding the parent, or after a restart from the saved state), vs the next reply in the
parent, and vs the same branch with no KV state at all (everything evaluated)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from starling_local.chat.generation import ReplyHooks
from starling_local.chat.service import ConversationService
from starling_local.chat.settings import ConversationSettings
from starling_local.engine.runtime import Engine
from starling_local.store.conversations import ConversationStore

#: Each reply: greedy, a few tokens (the figure is the time to the first one).
REPLY = {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True}
#: The turns that build the parent conversation.
TURN = {"temperature": 0.0, "max_tokens": 64, "ignore_eos": True}


def _first_token(service: ConversationService, conversation_id: int, text: str) -> dict[str, Any]:
    """Send `text` and reply: seconds from the call to the first token, and what was evaluated."""
    first: list[float] = []
    hooks = ReplyHooks(on_text=lambda _text, _stream: first.append(time.perf_counter()))
    start = time.perf_counter()
    service.send(conversation_id, text)
    outcome = service.reply(conversation_id, hooks=hooks, overrides=REPLY)
    return {
        "ttft_s": first[0] - start,
        "prompt_tokens": outcome.stats.prompt_tokens,
        "prompt_evaluated": outcome.stats.prompt_evaluated,
    }


def branch_figures(model: Path, target_tokens: int = 2000) -> dict[str, Any]:
    """A parent of about `target_tokens`, branched after its last reply but one."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        engine = Engine(model, n_ctx=4096)
        service = ConversationService(ConversationStore(root / "b.db"), engine, kv_root=root / "kv")
        try:
            parent = service.create(ConversationSettings())
            i = 0
            while True:
                service.send(parent.id, f"Chapter {i}: tell me more about the llama. " * 3)
                turn = service.reply(parent.id, overrides=TURN)
                i += 1
                if turn.stats.prompt_tokens + turn.stats.completion_tokens >= target_tokens:
                    break
            messages = len(service.get(parent.id).messages)
            at = messages - 2  # up to the last reply but one: the user takes another road there
            # The parent's next reply (its KV cache is live), then the branch (the live cache
            # still holds the parent, whose history up to the branch point it shares).
            parent_next = _first_token(service, parent.id, "And what happened next?")
            start = time.perf_counter()
            branch = service.fork(parent.id, at=at)
            fork_s = time.perf_counter() - start
            branch_first = _first_token(service, branch.id, "Tell it from the alpaca's side.")
            branch_first["ttft_s"] += fork_s
            # Again, after a restart (nothing in the live cache): from the saved state file.
            saved = service.fork(parent.id, at=at)
            engine.clear_cache()
            from_state = _first_token(service, saved.id, "Tell it from the alpaca's side.")
            # And once more with the branch's state files gone too: everything evaluated.
            cold = service.fork(parent.id, at=at)
            for state in (root / "kv").glob(f"*/conversation-{cold.id}.kv"):
                state.unlink()
            engine.clear_cache()
            cold_first = _first_token(service, cold.id, "Tell it from the alpaca's side.")
        finally:
            service.close()
            engine.close()
    return {
        "parent_tokens": parent_next["prompt_tokens"],
        "branch_at_message": at,
        "fork_s": fork_s,
        "parent_next": parent_next,
        "branch_first": branch_first,
        "branch_from_saved_state": from_state,
        "branch_without_kv": cold_first,
    }
