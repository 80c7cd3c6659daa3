"""One reply run on the engine: the stream, stop strings, and the record of it in the store.

The conversation service prepares the prompt and the KV cache and calls `run_reply`; this
module knows nothing of conversations beyond the id it is told to record under.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from starling_local.chat.conversation import ReplyRecorder
from starling_local.chat.stops import StopMatcher
from starling_local.engine.grammar import Grammar, validate
from starling_local.engine.interface import EngineLike
from starling_local.engine.logprobs import TokenLogprob
from starling_local.engine.types import EngineStream, GenerationStats, ReplyDecoder, SamplingParams
from starling_local.errors import StarlingError


@dataclass(frozen=True)
class ReplyStart:
    """Told to the front end when generation begins."""

    conversation_id: int | None
    message_id: int | None
    prompt_tokens: int
    dropped_messages: int
    """The oldest messages left out of the prompt to fit the context (never deleted)."""
    n_ctx: int


@dataclass
class ReplyOutcome:
    """A finished (or stopped) reply."""

    conversation_id: int | None
    message_id: int | None
    text: str
    token_ids: list[int]
    stats: GenerationStats
    dropped_messages: int
    n_ctx: int
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Per reply token, when the sampling asked for them."""
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    continued: bool = False
    """The reply continues the conversation's last message (`text` is what was added)."""
    warnings: list[str] = field(default_factory=list)
    """What went wrong without failing the reply (its KV state could not be saved...)."""

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens that came from the KV cache instead of being evaluated."""
        return self.stats.prompt_tokens - self.stats.prompt_evaluated


@dataclass
class ReplyHooks:
    """What a front end is told while a reply runs (called in the replying thread)."""

    on_start: Callable[[ReplyStart], object] = lambda start: None
    on_text: Callable[[str, EngineStream], object] = lambda text, stream: None


def run_reply(
    engine: EngineLike,
    prompt: Sequence[int],
    sampling: SamplingParams,
    *,
    cancel: threading.Event,
    hooks: ReplyHooks,
    record: Callable[[], ReplyRecorder] | None = None,
    conversation_id: int | None = None,
    dropped_messages: int = 0,
    stop: Sequence[str] = (),
    stop_ids: Sequence[int] = (),
    raw: bool = False,
    continued: bool = False,
) -> ReplyOutcome:
    """Generate from `prompt` to the end, telling `hooks` and the recorder `record` makes as
    it goes. A stop string ends the reply (stop reason `stop`) and is never shown or kept.
    The reply's row is made only once generation is accepted (the prompt fits...), so a
    refused reply leaves no empty incomplete message behind."""
    stream = engine.generate(prompt, sampling, cancel, stop_ids=stop_ids, raw=raw)
    matcher = StopMatcher(stop)
    recorder = record() if record is not None else None
    message_id = recorder.message_id if recorder else None
    hooks.on_start(
        ReplyStart(conversation_id, message_id, len(prompt), dropped_messages, engine.n_ctx)
    )

    def show(text: str) -> None:
        if text:
            if recorder is not None:
                recorder.feed(text)
            hooks.on_text(text, stream)

    error: str | None = None
    try:
        for chunk in stream:
            show(matcher.feed(chunk))
            if matcher.stopped:
                cancel.set()  # the engine stops at its next token
        show(matcher.flush())
    except StarlingError as exc:
        error = str(exc)
        stream.stats.stop_reason = "cancelled"
    except BaseException:
        # The front end failed (a closed pipe, Ctrl-C): keep what was generated, stopped.
        stream.stats.stop_reason = "cancelled"
        if recorder is not None:
            recorder.finish(stream, text=matcher.text)
        raise
    if matcher.stopped:
        stream.stats.stop_reason = "stop"
    if error is None and sampling.grammar is not None and stream.stats.stop_reason == "end_of_turn":
        # A remote engine may not honour the grammar as llama.cpp does: check what came back.
        error = _off_format(sampling.grammar, matcher.text)
    if recorder is not None:
        recorder.finish(stream, error, text=matcher.text, exact=not matcher.stopped)
    ids = list(stream.token_ids)
    if matcher.stopped:  # the ids of the text kept, not of the stop string after it
        ids = ids[: _ids_within(engine, ids, len(matcher.text), raw)]
    return ReplyOutcome(
        conversation_id,
        message_id,
        matcher.text,
        ids,
        stream.stats,
        dropped_messages,
        engine.n_ctx,
        error,
        list(stream.logprobs)[: len(ids)],
        list(stream.prompt_logprobs),
        continued,
    )


def _ids_within(engine: EngineLike, ids: Sequence[int], chars: int, raw: bool) -> int:
    """How many of `ids` make up no more than the first `chars` characters of their text."""
    decoder = ReplyDecoder(engine.token_bytes, raw)
    length = 0
    for n, token in enumerate(ids):
        length += len(decoder.push(token))
        if length > chars:
            return n
    return len(ids)


def _off_format(grammar: Grammar, text: str) -> str | None:
    """Why a finished grammar-constrained reply is not what the grammar promised (None: it is)."""
    if grammar.schema is not None:
        problem = validate(grammar.schema, text)
        return f"the reply {problem}" if problem else None
    if grammar.kind == "json_object":
        try:
            document = json.loads(text)
        except ValueError:
            return "the reply is not JSON"
        return None if isinstance(document, dict) else "the reply is not a JSON object"
    return None
