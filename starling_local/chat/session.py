"""One reply to a conversation: template, context budget and engine together.

The CLI and the TUI both go through `start_reply`, so a conversation renders to the same tokens
whichever of them continues it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starling_local.chat.context import FittedPrompt, fit_prompt
from starling_local.chat.template import DEFAULT_STYLE, Message, PromptStyle
from starling_local.engine.interface import EngineLike
from starling_local.engine.types import EngineStream, SamplingParams
from starling_local.errors import UsageError


@dataclass
class Reply:
    """A streaming reply and the prompt it answers."""

    stream: EngineStream
    prompt: FittedPrompt


def build_prompt(
    engine: EngineLike,
    messages: Sequence[Message],
    *,
    system: str = "",
    style: PromptStyle = DEFAULT_STYLE,
    max_tokens: int = 1024,
) -> FittedPrompt:
    """The token-exact prompt for `messages`, trimmed to the engine's context window. A
    conversation that ends with a reply gets that reply continued."""
    if not messages or messages[-1].role not in ("user", "assistant"):
        raise UsageError("a reply needs a conversation that ends with a user message")
    if not messages[-1].content.strip() and not messages[-1].tokens:
        raise UsageError("the message is empty")
    return fit_prompt(
        messages,
        engine.tokenize_text,
        n_ctx=engine.n_ctx,
        reserve=max_tokens,
        system=system,
        style=style,
        continue_last=messages[-1].role == "assistant",
    )


def start_reply(
    engine: EngineLike,
    messages: Sequence[Message],
    *,
    system: str = "",
    style: PromptStyle = DEFAULT_STYLE,
    params: SamplingParams | None = None,
    cancel: threading.Event | None = None,
    resume: Callable[[list[int]], object] | None = None,
) -> Reply:
    """Render, fit and start generating; iterate `reply.stream` for the text.

    `resume(prompt_tokens)` runs before generation: it may restore a saved KV cache so that the
    history need not be evaluated again (see `chat.kv_cache`).
    """
    params = params or SamplingParams()
    prompt = build_prompt(
        engine, messages, system=system, style=style, max_tokens=params.max_tokens
    )
    if resume is not None:
        resume(prompt.tokens)
    return Reply(engine.generate(prompt.tokens, params, cancel), prompt)
