"""Keeping the prompt inside the context window by dropping the oldest whole turns."""

from __future__ import annotations

import pytest

from starling_local.chat.context import ContextOverflowError, fit_prompt
from starling_local.chat.template import Message, render_tokens
from starling_local.engine.runtime import Engine


def _conversation(turns: int, words: int = 40) -> list[Message]:
    messages = []
    for i in range(turns):
        messages.append(Message("user", f"question {i} " + "word " * words))
        messages.append(Message("assistant", f"answer {i} " + "word " * words))
    messages.append(Message("user", "the current question"))
    return messages


def test_everything_fits_nothing_dropped(vocab: Engine) -> None:
    messages = _conversation(3)
    fitted = fit_prompt(messages, vocab.tokenize_text, n_ctx=4096, reserve=256, system="sys")
    assert fitted.dropped_messages == 0
    assert fitted.tokens == render_tokens(messages, vocab.tokenize_text, system="sys")


def test_oldest_whole_turns_dropped_system_and_current_kept(vocab: Engine) -> None:
    messages = _conversation(10)
    full = render_tokens(messages, vocab.tokenize_text, system="Be kind.")
    n_ctx = len(full) // 2
    fitted = fit_prompt(messages, vocab.tokenize_text, n_ctx=n_ctx, reserve=64, system="Be kind.")
    assert fitted.dropped_messages > 0
    assert fitted.dropped_messages % 2 == 0  # whole turns: user + assistant
    assert len(fitted.tokens) <= n_ctx - 64
    kept = messages[fitted.dropped_messages :]
    assert kept[0].role == "user"
    assert fitted.tokens == render_tokens(kept, vocab.tokenize_text, system="Be kind.")
    # Dropping one turn fewer would not have fitted.
    one_more = messages[fitted.dropped_messages - 2 :]
    assert len(render_tokens(one_more, vocab.tokenize_text, system="Be kind.")) > n_ctx - 64


def test_current_message_too_long_is_a_clear_error(vocab: Engine) -> None:
    messages = [Message("user", "word " * 500)]
    with pytest.raises(ContextOverflowError, match="too long"):
        fit_prompt(messages, vocab.tokenize_text, n_ctx=128, reserve=32)


def test_huge_max_tokens_does_not_empty_the_history(vocab: Engine) -> None:
    messages = _conversation(2, words=5)
    fitted = fit_prompt(messages, vocab.tokenize_text, n_ctx=1024, reserve=100_000)
    assert fitted.dropped_messages == 0
