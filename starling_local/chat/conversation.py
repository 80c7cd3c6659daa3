"""Saved conversations meet the template: store rows -> prompt messages, and a streaming reply
recorded into the store as it arrives."""

from __future__ import annotations

import time
from dataclasses import asdict, fields
from typing import Any

from starling_local.chat.template import Message, Mode, PromptStyle, SystemPolicy
from starling_local.engine.runtime import EngineStream, SamplingParams
from starling_local.store.conversations import ConversationStore
from starling_local.store.models import Conversation

#: How often a streaming reply is committed (the issue asks for at least once a second).
COMMIT_INTERVAL_S = 1.0


def to_messages(conversation: Conversation) -> list[Message]:
    """The conversation's turns as prompt messages (a reply cut off before any text is skipped)."""
    out = []
    for m in conversation.messages:
        if m.role == "assistant" and not m.content.strip():
            continue
        out.append(Message(m.role, m.content, m.tokens))  # type: ignore[arg-type]
    return out


def style_of(conversation: Conversation) -> PromptStyle:
    policy = conversation.params.get("system_policy", SystemPolicy.NATIVE.value)
    return PromptStyle(Mode(conversation.mode), SystemPolicy(policy))


def params_of(conversation: Conversation) -> SamplingParams:
    known = {f.name for f in fields(SamplingParams)}
    return SamplingParams(**{k: v for k, v in conversation.params.items() if k in known})


def params_dict(params: SamplingParams, style: PromptStyle) -> dict[str, Any]:
    data = asdict(params)
    data.pop("stop_at_end_of_turn", None)
    data["system_policy"] = style.policy.value
    return data


class ReplyRecorder:
    """Keeps a streaming reply in the store: a row before the first token, the text at least
    every `interval` seconds, and the end with its stop reason and token ids. If the process
    dies, the row stays marked incomplete with the text of the last commit."""

    def __init__(
        self, store: ConversationStore, conversation_id: int, interval: float = COMMIT_INTERVAL_S
    ) -> None:
        self.store = store
        self.conversation_id = conversation_id
        self.interval = interval
        self.message_id = store.add_message(conversation_id, "assistant", "", incomplete=True).id
        self.text = ""
        self._last = time.monotonic()

    def feed(self, chunk: str) -> None:
        self.text += chunk
        if time.monotonic() - self._last >= self.interval:
            self.store.update_message(self.message_id, self.text, incomplete=True)
            self._last = time.monotonic()

    def finish(self, stream: EngineStream) -> None:
        s = stream.stats
        stats = {
            "prompt_tokens": s.prompt_tokens,
            "prompt_evaluated": s.prompt_evaluated,
            "completion_tokens": s.completion_tokens,
            "ttft_s": round(s.ttft_s, 6),
            "decode_tokens_per_s": round(s.decode_tokens_per_s, 3),
        }
        self.store.update_message(
            self.message_id,
            stream.text,
            incomplete=s.stop_reason == "cancelled",
            stop_reason=s.stop_reason,
            tokens=tuple(stream.token_ids),
            stats=stats,
        )
