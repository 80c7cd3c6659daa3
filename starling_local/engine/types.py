"""The engine's value types: what a reply is asked for (`SamplingParams`), what it cost
(`GenerationStats`), the stream it arrives as (`EngineStream`, `ReplyDecoder`), a KV cache copy
(`KVSnapshot`) and the engine's errors. Shared by the local and the remote engine."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from starling_local.engine.grammar import Grammar
from starling_local.engine.logprobs import TokenLogprob
from starling_local.errors import StarlingError

StopReason = Literal["end_of_turn", "stop", "length", "cancelled"]
"""`end_of_turn`: the model ended its turn (id 32000 or the file's eos); `stop`: a stop token id
or stop string the caller asked for; `length`: the token budget or the window ran out."""


@dataclass(frozen=True)
class KVSnapshot:
    """An engine's KV cache copied into memory (made and read by the same engine only)."""

    tokens: tuple[int, ...]
    payload: bytearray

    @property
    def nbytes(self) -> int:
        return len(self.payload)


class EngineError(StarlingError):
    """The model could not be loaded or run."""


class EngineClosedError(EngineError):
    """The engine was closed (the app is quitting, or the model was switched)."""


@dataclass
class SamplingParams:
    """How the next token is chosen. `temperature` 0 is greedy."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    """How many recent tokens the repeat, frequency and presence penalties look at (llama.cpp's
    default 64; 0: none; -1: the whole context window)."""
    max_tokens: int = 1024
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    """Decode past `<|end_of_turn|>` (as vLLM's field of that name): only for benchmarks that
    must decode exactly `max_tokens` tokens. Never saved with a conversation."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias added to its logit) pairs; -100 bans a token, 100 all but forces it."""
    grammar: Grammar | None = None
    """Constrain the reply to a grammar (a JSON schema, any JSON object, or GBNF)."""
    logprobs: int | None = None
    """Report each reply token's log-probability with this many alternatives (None: none)."""
    prompt_logprobs: int | None = None
    """Report each prompt token's log-probability too (evaluates the whole prompt)."""


@dataclass
class GenerationStats:
    """What one reply cost."""

    prompt_tokens: int
    prompt_evaluated: int
    """Prompt tokens actually run through the model (the rest came from the KV cache)."""
    completion_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: StopReason = "end_of_turn"
    draft_tokens: int = 0
    """Tokens proposed by speculative decoding (lookup in the conversation) and verified."""
    accepted_tokens: int = 0
    """Of those, the ones the model agreed with (each saved one decoding step)."""
    draft_limit: int = 0
    """The most drafted tokens one step could verify (0: speculation off, or no batch of
    two tokens computes its logits exactly as single tokens on this machine)."""

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first one (the first one's time is the TTFT)."""
        if self.completion_tokens < 2 or self.decode_s <= 0:
            return 0.0
        return (self.completion_tokens - 1) / self.decode_s

    def as_dict(self) -> dict[str, Any]:
        """The figures as saved with a reply and printed by `ask --json`."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_evaluated": self.prompt_evaluated,
            "completion_tokens": self.completion_tokens,
            "ttft_s": round(self.ttft_s, 6),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "stop_reason": self.stop_reason,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "draft_limit": self.draft_limit,
        }


@dataclass
class EngineStream:
    """An iterator of reply text chunks; `stats` and `text` are complete once it is exhausted."""

    _chunks: Iterator[str]
    stats: GenerationStats
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per token id, when asked for (`SamplingParams.logprobs`)."""
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    """One per prompt token (None for the first), when asked for."""

    @classmethod
    def starting(cls, tokens: Sequence[int], n_ctx: int) -> EngineStream:
        """A stream for the prompt `tokens`, refused when it does not fit the window."""
        if len(tokens) >= n_ctx:
            raise EngineError(f"the prompt is {len(tokens)} tokens; the context window is {n_ctx}")
        stats = GenerationStats(prompt_tokens=len(tokens), prompt_evaluated=len(tokens))
        return cls(iter(()), stats)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        chunk = next(self._chunks)
        self.text += chunk
        return chunk

    def consume(self) -> str:
        """Run to the end and return the whole reply."""
        for _ in self:
            pass
        return self.text


class ReplyDecoder:
    """Token ids -> reply text: only whole UTF-8 characters (a character may span several byte
    tokens), without the leading space the template's `Assistant:` leaves to the model (`raw`
    keeps it: raw completions, and a reply continued mid-text)."""

    def __init__(self, piece: Callable[[int], bytes], raw: bool = False) -> None:
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = raw

    def push(self, token: int) -> str:
        text: str = self._utf8.decode(self._piece(token))
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        return text

    def flush(self) -> str:
        text: str = self._utf8.decode(b"", final=True)
        return text if self._started else text.lstrip()
