"""The prompt of the next reply as the user may inspect it: exact text, size, what fits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from starling_local.chat.context import FittedPrompt, fit_prompt
from starling_local.chat.settings import ConversationSettings
from starling_local.chat.template import Message, render_segments, segments_to_text
from starling_local.engine.interface import EngineLike
from starling_local.errors import UsageError


@dataclass(frozen=True)
class PromptPreview:
    """The exact prompt the next reply would get."""

    text: str
    tokens: int
    n_ctx: int
    dropped_messages: int


def fit_messages(
    engine: EngineLike, messages: Sequence[Message], settings: ConversationSettings
) -> FittedPrompt:
    """The token-exact prompt for `messages`, trimmed to the engine's context window. A
    conversation that ends with a reply gets that reply continued."""
    if not messages or messages[-1].role not in ("user", "assistant"):
        raise UsageError("a reply needs a conversation that ends with a user message")
    last = messages[-1]
    if last.role == "assistant" and not last.content.strip() and not last.tokens:
        # (An empty user message is a turn like any other: the API accepts it, as OpenAI's
        # does; the app and `ask` refuse to send one before it gets here.)
        raise UsageError("there is no reply to continue: the last reply is empty")
    return fit_prompt(
        messages,
        engine.tokenize_text,
        n_ctx=engine.n_ctx,
        reserve=settings.sampling.max_tokens,
        system=settings.system,
        style=settings.style,
        continue_last=messages[-1].role == "assistant",
    )


def preview_prompt(
    engine: EngineLike,
    messages: Sequence[Message],
    settings: ConversationSettings,
    pending: str = "…",
) -> PromptPreview:
    """The prompt of the next reply (with `pending` as the next message when the conversation
    does not end with one of the user's), as text and size, after fitting."""
    messages = list(messages)
    if not messages or messages[-1].role != "user":
        messages.append(Message("user", pending))
    fitted = fit_messages(engine, messages, settings)
    kept = messages[fitted.dropped_messages :]
    text = segments_to_text(
        render_segments(
            kept, mode=settings.mode, system=settings.system, policy=settings.policy, exact=False
        )
    )
    return PromptPreview(text, len(fitted.tokens), engine.n_ctx, fitted.dropped_messages)


def prompt_size(
    engine: EngineLike, messages: Sequence[Message], settings: ConversationSettings
) -> int:
    """Tokens `messages` take as the next prompt renders them (0 for none)."""
    if not messages:
        return 0
    segments = render_segments(
        messages,
        mode=settings.mode,
        system=settings.system,
        policy=settings.policy,
        add_generation_prompt=messages[-1].role == "user",
    )
    return sum(1 if isinstance(s, int) else len(engine.tokenize_text(s)) for s in segments)
