"""Response bodies, one formatter per endpoint: `/v1/chat/completions` (messages, tool calls,
`logprobs.content`) and `/v1/completions` (text, the legacy `logprobs` shape, `echo`).

Each formatter gives the whole body of a reply, or its stream: the first chunks, one chunk per
piece of text, and the last chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starling_local.chat.service import ReplyOutcome
from starling_local.chat.tools import parse_call, parse_partial_call
from starling_local.engine.logprobs import TokenLogprob
from starling_local.server.run import Piece

#: A cancelled reply is never answered as finished (see `app._check_finished`).
FINISH = {"end_of_turn": "stop", "stop": "stop", "length": "length"}
#: Says which build answered (OpenAI's `system_fingerprint`).
FINGERPRINT = "fp_starling_local"
TokenBytes = Callable[[int], bytes]


def usage(outcome: ReplyOutcome) -> dict[str, Any]:
    s = outcome.stats
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
    }


def _extension(outcome: ReplyOutcome) -> dict[str, Any]:
    """starling-local's own figures: how many of the oldest messages were left out of the
    prompt to fit the context window (0: none)."""
    return {"dropped_messages": outcome.dropped_messages}


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


@dataclass
class ChatFormatter:
    """`chat.completion` and `chat.completion.chunk` bodies."""

    head: dict[str, Any]
    token_bytes: TokenBytes
    tool_call: bool = False
    """The reply is a grammar-constrained function call: answered as `tool_calls`."""
    include_usage: bool = False
    logprobs: bool = False

    def _entry(self, lp: TokenLogprob) -> dict[str, Any]:
        def one(token: int, logprob: float) -> dict[str, Any]:
            data = self.token_bytes(token)
            return {"token": _text(data), "logprob": logprob, "bytes": list(data)}

        return {
            **one(lp.token, lp.logprob),
            "top_logprobs": [one(t, p) for t, p in lp.top],
        }

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {"content": [self._entry(lp) for lp in entries], "refusal": None}

    def _finish(self, outcome: ReplyOutcome) -> str:
        cut = outcome.stats.stop_reason == "length"
        return "tool_calls" if self.tool_call and not cut else FINISH[outcome.stats.stop_reason]

    def _calls(self, outcome: ReplyOutcome) -> list[dict[str, Any]]:
        cut = outcome.stats.stop_reason == "length"  # the budget ran out mid-call: as far as it got
        call = parse_partial_call(outcome.text) if cut else parse_call(outcome.text)
        function = {"name": call.name, "arguments": call.arguments}
        return [{"id": call.id, "type": "function", "function": function}]

    def whole(self, outcome: ReplyOutcome) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": outcome.text, "refusal": None}
        if self.tool_call:
            message |= {"content": None, "tool_calls": self._calls(outcome)}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": self._logprobs(outcome.logprobs),
            "finish_reason": self._finish(outcome),
        }
        return {
            **self.head,
            "object": "chat.completion",
            "system_fingerprint": FINGERPRINT,
            "choices": [choice],
            "usage": usage(outcome),
            "starling": _extension(outcome),
        }

    def _chunk(
        self,
        delta: dict[str, Any],
        finish: str | None = None,
        entries: Sequence[TokenLogprob] = (),
    ) -> dict[str, Any]:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": self._logprobs(entries) if entries else None,
            "finish_reason": finish,
        }
        extra = {"usage": None} if self.include_usage else {}
        return {
            **self.head,
            "object": "chat.completion.chunk",
            "system_fingerprint": FINGERPRINT,
            "choices": [choice],
            **extra,
        }

    def first(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": None if self.tool_call else ""})]

    def piece(self, piece: Piece) -> dict[str, Any] | None:
        if self.tool_call:
            return None  # the call is sent whole once it is complete and parsed
        return self._chunk({"content": piece.text}, entries=piece.logprobs)

    def last(self, outcome: ReplyOutcome) -> list[dict[str, Any]]:
        out = []
        if self.tool_call:
            calls = [{"index": 0, **c} for c in self._calls(outcome)]
            out.append(self._chunk({"tool_calls": calls}))
        out.append({**self._chunk({}, self._finish(outcome)), "starling": _extension(outcome)})
        if self.include_usage:
            out.append(
                {
                    **self.head,
                    "object": "chat.completion.chunk",
                    "system_fingerprint": FINGERPRINT,
                    "choices": [],
                    "usage": usage(outcome),
                }
            )
        return out


@dataclass
class CompletionFormatter:
    """`text_completion` bodies (whole and streamed)."""

    head: dict[str, Any]
    token_bytes: TokenBytes
    prompt_ids: list[int]
    token_ids: bool = False
    include_usage: bool = False
    logprobs: bool = False
    echo: str | None = None
    """The prompt text, when the reply repeats it (`echo`)."""
    tokens_as_ids: bool = False
    _offset: int = 0

    def _name(self, token: int) -> str:
        return f"token_id:{token}" if self.tokens_as_ids else _text(self.token_bytes(token))

    def _legacy(self, ids: Sequence[int], entries: Sequence[TokenLogprob | None]) -> dict[str, Any]:
        """OpenAI's legacy shape: tokens, their logprobs, the top ones, character offsets."""
        tokens, offsets, logprobs, tops = [], [], [], []
        for token, lp in zip(ids, entries, strict=False):
            text = _text(self.token_bytes(token))
            tokens.append(self._name(token))
            offsets.append(self._offset)
            self._offset += len(text)
            logprobs.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else {self._name(t): p for t, p in lp.top} or None)
        return {
            "tokens": tokens,
            "token_logprobs": logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _echoed(self, outcome: ReplyOutcome) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        self._offset = 0
        if self.echo is None:
            return self._legacy(outcome.token_ids, outcome.logprobs)
        prompt = self._legacy(self.prompt_ids, outcome.prompt_logprobs)
        reply = self._legacy(outcome.token_ids, outcome.logprobs)
        return {k: prompt[k] + reply[k] for k in prompt}

    def whole(self, outcome: ReplyOutcome) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "text": (self.echo or "") + outcome.text,
            "logprobs": self._echoed(outcome),
            "finish_reason": FINISH[outcome.stats.stop_reason],
        }
        if self.token_ids:
            choice |= {"token_ids": outcome.token_ids, "prompt_token_ids": self.prompt_ids}
        return {
            **self.head,
            "object": "text_completion",
            "system_fingerprint": FINGERPRINT,
            "choices": [choice],
            "usage": usage(outcome),
        }

    def _chunk(
        self, text: str, finish: str | None, logprobs: dict[str, Any] | None, ids: list[int]
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        if self.token_ids:
            choice["token_ids"] = ids
        extra = {"usage": None} if self.include_usage else {}
        return {
            **self.head,
            "object": "text_completion",
            "system_fingerprint": FINGERPRINT,
            "choices": [choice],
            **extra,
        }

    def first(self) -> list[dict[str, Any]]:
        # A stream repeats the prompt first; its logprobs come only in a whole reply.
        return [self._chunk(self.echo, None, None, [])] if self.echo else []

    def piece(self, piece: Piece) -> dict[str, Any] | None:
        logprobs = self._legacy(piece.ids, piece.logprobs) if self.logprobs else None
        return self._chunk(piece.text, None, logprobs, piece.ids)

    def last(self, outcome: ReplyOutcome) -> list[dict[str, Any]]:
        out = [self._chunk("", FINISH[outcome.stats.stop_reason], None, [])]
        if self.include_usage:
            out.append(
                {
                    **self.head,
                    "object": "text_completion",
                    "choices": [],
                    "usage": usage(outcome),
                }
            )
        return out


Formatter = ChatFormatter | CompletionFormatter
