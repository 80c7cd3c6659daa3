"""The OpenAI-compatible API's requests and errors: bodies checked field by field into typed
values, and error objects shaped as OpenAI's (`{"error": {"message", "type", "param", "code"}}`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from starling_local.chat.settings import ConversationSettings
from starling_local.chat.template import Message, Mode

#: Bodies larger than this are refused (413) before they are parsed.
MAX_BODY_BYTES = 4 << 20
MAX_STOPS = 8


class APIError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad("the body must be a JSON object")
    return data


# --- fields --------------------------------------------------------------------------------------


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(f"'{key}' must be a number", key)
    if not low <= value <= high:
        raise bad(f"'{key}' must be between {low:g} and {high:g}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int, high: int = 2**31 - 1) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{key}' must be an integer", key)
    if not low <= value <= high:
        raise bad(f"'{key}' must be between {low} and {high}", key)
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise bad(f"'{key}' must be true or false", key)
    return value


def _stops(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"at most {MAX_STOPS} stop strings", "stop")
    return [s for s in stops if s]


def _token_ids(value: Any, key: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise bad(f"'{key}' must be a list of token ids", key)
    return list(value)


# --- requests ------------------------------------------------------------------------------------


@dataclass
class Generation:
    """What both endpoints share: sampling, stops, streaming."""

    model: str
    settings: ConversationSettings
    max_tokens: int | None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _generation(body: dict[str, Any], base: ConversationSettings) -> Generation:
    model = body.get("model", "")
    if not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise bad("only n=1 is supported (one reply per request)", "n")
    sampling: dict[str, Any] = {}
    for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0)):
        value = _number(body, key, low, high)
        if value is not None:
            sampling[key] = value
    top_k = _integer(body, "top_k", -1)
    if top_k is not None:
        sampling["top_k"] = max(top_k, 0)
    seed = _integer(body, "seed", -(2**63), 2**64 - 1)
    if seed is not None:
        sampling["seed"] = seed
    penalty = _number(body, "repetition_penalty", 0.0, 10.0)
    if penalty is not None:
        sampling["repeat_penalty"] = penalty
    if _flag(body, "ignore_eos"):  # vLLM's field: decode past the end of the turn (benchmarks)
        sampling["ignore_eos"] = True
    max_tokens = _integer(body, "max_completion_tokens", 1) or _integer(body, "max_tokens", 1)
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = _flag(options, "include_usage") if stream else False
    settings = base.with_sampling(**sampling) if sampling else base
    return Generation(model, settings, max_tokens, _stops(body), stream, include_usage)


def _content(value: Any, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad(
                    f"messages[{index}]: only text content parts are supported (Starling reads "
                    "text only)",
                    f"messages[{index}].content",
                )
            if not isinstance(part.get("text"), str):
                raise bad(f"messages[{index}]: a text part needs a string 'text'")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{index}]: 'content' must be a string or a list of text parts")


@dataclass
class ChatRequest:
    generation: Generation
    messages: list[Message]


def parse_chat(body: dict[str, Any], base: ConversationSettings) -> ChatRequest:
    """A `/v1/chat/completions` body; system messages become the system prompt (placed by the
    system policy), the rest the turns, the last of which must be the user's."""
    if body.get("tools") or body.get("functions") or body.get("tool_choice") not in (None, "none"):
        raise bad(
            "Starling has no tool or function calling; send the request without tools", "tools"
        )
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", "messages")
    system: list[str] = []
    messages: list[Message] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        text = _content(m.get("content"), i)
        if role in ("system", "developer"):
            system.append(text.strip())
        elif role in ("user", "assistant"):
            messages.append(Message(role, text))
        else:
            raise bad(f"messages[{i}]: role must be system, user or assistant, not {role!r}")
    if not messages or messages[-1].role != "user":
        raise bad("the last message must be the user's", "messages")
    if not messages[-1].content.strip():
        raise bad("the last message is empty", "messages")
    generation = _generation(body, base)
    settings = generation.settings
    if system:
        settings = replace(settings, system="\n\n".join(s for s in system if s))
    mode = body.get("mode")
    if mode is not None:
        if mode not in ("chat", "code"):
            raise bad("'mode' must be chat or code", "mode")
        settings = replace(settings, mode=Mode(mode))
    generation.settings = settings
    return ChatRequest(generation, messages)


@dataclass
class CompletionRequest:
    generation: Generation
    prompt_text: str | None
    prompt_ids: list[int] | None
    stop_token_ids: list[int]
    return_token_ids: bool


def parse_completion(body: dict[str, Any], base: ConversationSettings) -> CompletionRequest:
    """A `/v1/completions` body: `prompt` as text or as a list of token ids (as vLLM takes it)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list | str):
        prompt = prompt[0]  # a batch of one
    text: str | None = None
    ids: list[int] | None = None
    if isinstance(prompt, str):
        if not prompt:
            raise bad("'prompt' is empty", "prompt")
        text = prompt
    elif isinstance(prompt, list) and prompt:
        ids = _token_ids(prompt, "prompt")
    else:
        raise bad("'prompt' must be a non-empty string or list of token ids", "prompt")
    stop_ids = _token_ids(body.get("stop_token_ids") or [], "stop_token_ids")
    return CompletionRequest(
        _generation(body, base), text, ids, stop_ids, _flag(body, "return_token_ids")
    )
