"""Saved conversations meet the template: store rows -> prompt messages, and a streaming reply
recorded into the store as it arrives."""

from __future__ import annotations

import time

from starling_local.chat.template import Message
from starling_local.engine.types import EngineStream
from starling_local.store.conversations import ConversationStore
from starling_local.store.models import Conversation, StoredMessage

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


class ReplyRecorder:
    """Keeps a streaming reply in the store: a row before the first token, the text at least
    every `interval` seconds, and the end with its stop reason and token ids. If the process
    dies, the row stays marked incomplete with the text of the last commit.

    It writes from the thread that generates (never a UI thread). With `extend`, the reply
    continues that message in place: its text and ids grow."""

    def __init__(
        self,
        store: ConversationStore,
        conversation_id: int,
        interval: float = COMMIT_INTERVAL_S,
        *,
        extend: StoredMessage | None = None,
    ) -> None:
        self.store = store
        self.conversation_id = conversation_id
        self.interval = interval
        if extend is None:
            self.message_id = store.add_message(
                conversation_id, "assistant", "", incomplete=True
            ).id
            self._prefix = ""
            self._prefix_ids: tuple[int, ...] | None = ()
        else:
            self.message_id = extend.id
            self._prefix = extend.content.rstrip()
            self._prefix_ids = extend.tokens
        self.text = ""
        self._last = time.monotonic()

    def feed(self, chunk: str) -> None:
        self.text += chunk
        if time.monotonic() - self._last >= self.interval:
            self.store.update_message(self.message_id, self._prefix + self.text, incomplete=True)
            self._last = time.monotonic()

    def finish(
        self,
        stream: EngineStream,
        error: str | None = None,
        *,
        text: str | None = None,
        exact: bool = True,
    ) -> None:
        """The end: complete unless it was cancelled or failed (`error`). `text` is what was
        shown (without a stop string); `exact` says its token ids are the stream's."""
        s = stream.stats
        stopped = s.stop_reason == "cancelled" or error is not None
        tokens: tuple[int, ...] | None = tuple(stream.token_ids) if exact else None
        if tokens is not None and self._prefix_ids is not None:
            tokens = (*self._prefix_ids, *tokens)
        elif self._prefix:
            tokens = None  # the continued part's ids are not known: its text renders it
        self.store.update_message(
            self.message_id,
            self._prefix + (stream.text if text is None else text),
            incomplete=stopped,
            stop_reason="error" if error is not None else s.stop_reason,
            tokens=tokens,
            stats=s.as_dict(),
        )
