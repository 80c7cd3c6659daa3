"""Keeping a conversation inside the model's context window.

When a conversation outgrows the window, the oldest whole turns leave the *prompt* (never the
store): a turn is a user message and the replies that follow it. The system prompt and the
current message always stay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from starling_local.chat.template import (
    BOS_ID,
    DEFAULT_STYLE,
    Message,
    PromptStyle,
    Tokenize,
    generation_prompt,
    message_segments,
    segments_to_tokens,
    system_segments,
)
from starling_local.errors import StarlingError

#: The fewest reply tokens a prompt must leave room for.
MIN_REPLY_TOKENS = 16


class ContextOverflowError(StarlingError):
    """The current message alone does not fit the context window."""


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt that fits, and what had to be left out of it."""

    tokens: list[int]
    dropped_messages: int
    """How many of the oldest messages are not in the prompt."""


def _turn_starts(messages: Sequence[Message]) -> list[int]:
    return [i for i, m in enumerate(messages) if m.role == "user"] or [0]


def fit_prompt(
    messages: Sequence[Message],
    tokenize: Tokenize,
    *,
    n_ctx: int,
    reserve: int,
    system: str = "",
    style: PromptStyle = DEFAULT_STYLE,
    continue_last: bool = False,
) -> FittedPrompt:
    """Render `messages` (the last one is the current message) into at most `n_ctx - reserve`
    tokens, dropping the oldest whole turns as needed. With `continue_last` the last message is
    a reply to continue: left open, with no generation prompt after it.

    `reserve` is the room wanted for the reply; it is capped at half the window so that a long
    max-tokens setting does not empty the history. A reserve of the whole window or more is no
    budget at all (the server's requests without `max_tokens`): every message that fits stays,
    and the reply may use what the window has left. Each message is tokenized once.
    """
    if not messages:
        raise ValueError("a prompt needs at least one message")
    if reserve >= n_ctx:
        reserve = MIN_REPLY_TOKENS
    reserve = max(MIN_REPLY_TOKENS, min(reserve, n_ctx // 2))
    head = [
        BOS_ID,
        *segments_to_tokens(system_segments(system, style.mode, style.policy), tokenize),
    ]
    tail = [] if continue_last else segments_to_tokens(generation_prompt(style.mode), tokenize)
    last = len(messages) - 1
    bodies = [
        segments_to_tokens(
            message_segments(m, style.mode, closed=not (continue_last and i == last)), tokenize
        )
        for i, m in enumerate(messages)
    ]

    fixed = len(head) + len(bodies[-1]) + len(tail)
    if fixed + MIN_REPLY_TOKENS > n_ctx:
        raise ContextOverflowError(
            f"the message is too long: the prompt needs {fixed} tokens and the context "
            f"window is {n_ctx} (shorten it, drop the system prompt, or raise --ctx)"
        )
    history = sum(len(b) for b in bodies[:-1])
    first = 0
    starts = [s for s in _turn_starts(messages) if s > 0] + [len(messages) - 1]
    for start in starts:
        if fixed + history <= n_ctx - reserve:
            break
        history -= sum(len(b) for b in bodies[first:start])
        first = start
    tokens = [*head]
    for body in bodies[first:]:
        tokens += body
    tokens += tail
    return FittedPrompt(tokens=tokens, dropped_messages=first)
