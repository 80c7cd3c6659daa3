"""The OpenAI-compatible API's requests and errors: bodies checked field by field into typed
values, and error objects shaped as OpenAI's (`{"error": {"message", "type", "param", "code"}}`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from starling_local.chat.settings import ConversationSettings
from starling_local.chat.template import Message, Mode
from starling_local.chat.tools import Function, ToolCall, calls_text, result_text
from starling_local.engine.grammar import (
    Grammar,
    GrammarError,
    gbnf_grammar,
    json_object_grammar,
    schema_grammar,
)
from starling_local.engine.logprobs import MAX_TOP

#: Bodies larger than this are refused (413) before they are parsed.
MAX_BODY_BYTES = 4 << 20
MAX_STOPS = 8
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 300


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


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


#: JSON nested deeper than this is refused (no request needs more than a dozen levels).
MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(raw: bytes) -> dict[str, Any]:
    """A JSON object body. Lone UTF-16 surrogates (`"\\ud800"` escapes, which no UTF-8 text
    can hold) become U+FFFD, the one rule for text that cannot be encoded; nesting past
    `MAX_DEPTH` is refused."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise invalid(f"the body nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object")
    cleaned: dict[str, Any] = _clean(data)
    return cleaned


def _text(value: str) -> str:
    return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value


def _clean(data: Any) -> Any:
    """`data` with every string (keys too) through `_text`, checked for depth, without
    recursion (a deep document must not exhaust the stack)."""
    root: list[Any] = [data]
    stack: list[tuple[Any, Any, int]] = [(root, 0, 0)]
    while stack:
        parent, key, depth = stack.pop()
        value = parent[key]
        if isinstance(value, str):
            parent[key] = _text(value)
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise invalid(f"the body nests deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                fixed = {_text(k): v for k, v in value.items()}
                parent[key] = fixed
                stack.extend((fixed, k, depth + 1) for k in fixed)
            else:
                stack.extend((value, i, depth + 1) for i in range(len(value)))
    return root[0]


# --- fields --------------------------------------------------------------------------------------


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"'{key}' must be a number", key)
    if not low <= value <= high:
        raise invalid(f"'{key}' must be between {low:g} and {high:g}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int, high: int = 2**31 - 1) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{key}' must be an integer", key)
    if not low <= value <= high:
        raise invalid(f"'{key}' must be between {low} and {high}", key)
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:  # null means "not set", for every optional field
        return False
    if not isinstance(value, bool):
        raise invalid(f"'{key}' must be true or false", key)
    return value


def _stops(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise invalid(f"at most {MAX_STOPS} stop strings", "stop")
    return [s for s in stops if s]


def _token_ids(value: Any, key: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise invalid(f"'{key}' must be a list of token ids", key)
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

    @property
    def logprobs(self) -> int | None:
        return self.settings.sampling.logprobs


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise invalid("'logit_bias' must map token ids to numbers", "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise invalid(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} tokens", "logit_bias")
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise invalid(f"'logit_bias': {key!r} is not a token id", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise invalid("'logit_bias' values must be numbers from -100 to 100", "logit_bias")
        out.append((int(key), float(bias)))
    return tuple(out)


def _generation(
    body: dict[str, Any], base: ConversationSettings, *, min_tokens: int = 1
) -> Generation:
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise invalid("'model' must be a string", "model")
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise invalid("only n=1 is supported (one reply per request)", "n")
    best_of = _integer(body, "best_of", 1)
    if best_of is not None and best_of != 1:
        raise invalid("only best_of=1 is supported (one candidate per request)", "best_of")
    if body.get("suffix"):
        raise invalid("'suffix' is not supported: Starling has no fill-in-the-middle", "suffix")
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
    last_n = _integer(body, "repeat_last_n", -1, 1 << 20)  # llama-server's field too
    if last_n is not None:
        sampling["repeat_last_n"] = last_n
    for key in ("frequency_penalty", "presence_penalty"):
        value = _number(body, key, -2.0, 2.0)
        if value is not None:
            sampling[key] = value
    bias = _logit_bias(body)
    if bias:
        sampling["logit_bias"] = bias
    if _flag(body, "ignore_eos"):  # vLLM's field: decode past the end of the turn (benchmarks)
        sampling["ignore_eos"] = True
    max_tokens = _integer(body, "max_completion_tokens", min_tokens)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", min_tokens)
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
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
                raise invalid(
                    f"messages[{index}]: only text content parts are supported (Starling reads "
                    "text only)",
                    f"messages[{index}].content",
                )
            if not isinstance(part.get("text"), str):
                raise invalid(f"messages[{index}]: a text part needs a string 'text'")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"messages[{index}]: 'content' must be a string or a list of text parts")


@dataclass
class ChatRequest:
    generation: Generation
    messages: list[Message]
    tools: list[Function] = field(default_factory=list)
    user: str | None = None
    """OpenAI's `user`: with `--save`, conversations are matched within one client's."""
    tool_choice: str = "auto"
    """"auto", "none", "required", or "function:NAME"."""

    @property
    def wants_call(self) -> bool:
        return self.tool_choice == "required" or self.tool_choice.startswith("function:")

    def called_functions(self) -> list[Function]:
        """The functions a demanded call may be to."""
        if self.tool_choice.startswith("function:"):
            name = self.tool_choice.removeprefix("function:")
            return [f for f in self.tools if f.name == name]
        return self.tools


def _tools(body: dict[str, Any]) -> list[Function]:
    raw = body.get("tools")
    if raw is None and body.get("functions") is not None:  # the legacy `functions` field
        raw = [{"type": "function", "function": f} for f in body["functions"] or []]
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid("'tools' must be a list", "tools")
    if len(raw) > MAX_TOOLS:
        raise invalid(f"at most {MAX_TOOLS} tools", "tools")
    out = []
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise invalid(f"tools[{i}]: only function tools are supported", "tools")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise invalid(f"tools[{i}].function needs a 'name'", "tools")
        parameters = fn.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise invalid(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise invalid(f"tools[{i}].function.description must be a string", "tools")
        out.append(Function(fn["name"], description, parameters))
    return out


def _tool_choice(body: dict[str, Any], tools: list[Function]) -> str:
    choice = body.get("tool_choice")
    if choice is None and body.get("function_call") is not None:  # legacy
        legacy = body["function_call"]
        choice = {"type": "function", "function": legacy} if isinstance(legacy, dict) else legacy
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise invalid("'tool_choice' is 'required' but no tools are given", "tool_choice")
        return str(choice)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise invalid(
            "'tool_choice' must be 'auto', 'none', 'required' or "
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if name not in {f.name for f in tools}:
        raise invalid(f"'tool_choice' names {name!r}, which is not among the tools", "tool_choice")
    return f"function:{name}"


def _structured_outputs(body: dict[str, Any]) -> Grammar | None:
    """vLLM's `structured_outputs` field (`json`: a schema, `json_object`), as remote
    starling-local engines send it."""
    spec = body.get("structured_outputs")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise invalid("'structured_outputs' must be an object", "structured_outputs")
    try:
        if isinstance(spec.get("grammar"), str):
            return gbnf_grammar(spec["grammar"])
        if isinstance(spec.get("json"), dict):
            return schema_grammar(spec["json"])
        if spec.get("json_object") is True:
            return json_object_grammar()
    except GrammarError as exc:
        raise invalid(str(exc), "structured_outputs", "unsupported_schema") from None
    raise invalid(
        "'structured_outputs' takes 'grammar' (GBNF), 'json' (a schema) or 'json_object' here",
        "structured_outputs",
    )


def _ollama_format(body: dict[str, Any]) -> Grammar | None:
    """Ollama's `format` (`"json"` or a schema), which Open WebUI sends on /v1 too."""
    fmt = body.get("format")
    try:
        if fmt == "json":
            return json_object_grammar()
        if isinstance(fmt, dict):
            return schema_grammar(fmt)
    except GrammarError as exc:
        raise invalid(str(exc), "format", "unsupported_schema") from None
    if fmt not in (None, ""):
        raise invalid("'format' must be \"json\" or a JSON schema object", "format")
    return None


def _guided_json(body: dict[str, Any]) -> Grammar | None:
    """vLLM's older `guided_json` (a schema, or its JSON text)."""
    spec = body.get("guided_json")
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            raise invalid("'guided_json' is not valid JSON", "guided_json") from None
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise invalid("'guided_json' must be a JSON schema object", "guided_json")
    try:
        return schema_grammar(spec)
    except GrammarError as exc:
        raise invalid(str(exc), "guided_json", "unsupported_schema") from None


def _response_format(body: dict[str, Any]) -> Grammar | None:
    """`response_format` (or vLLM's `structured_outputs` / `guided_json`, or Ollama's
    `format`) as a grammar (None: plain text)."""
    fmt = body.get("response_format")
    if fmt is None:
        return _structured_outputs(body) or _guided_json(body) or _ollama_format(body)
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return json_object_grammar()
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise invalid(
                    "'response_format.json_schema' needs a 'schema' object",
                    "response_format",
                )
            return schema_grammar(spec["schema"])
    except GrammarError as exc:
        raise invalid(str(exc), "response_format", "unsupported_schema") from None
    raise invalid(
        "'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format"
    )


def _tool_calls(value: Any, index: int) -> list[ToolCall]:
    if not isinstance(value, list):
        raise invalid(f"messages[{index}].tool_calls must be a list", "messages")
    calls = []
    for call in value:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"messages[{index}]: a tool call needs function.name", "messages")
        arguments = fn.get("arguments") or "{}"
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls.append(ToolCall(str(call.get("id") or ""), fn["name"], arguments))
    return calls


def _messages(raw: Any) -> tuple[list[str], list[Message]]:
    if not isinstance(raw, list) or not raw:
        raise invalid("'messages' must be a non-empty list", "messages")
    system: list[str] = []
    messages: list[Message] = []
    names: dict[str, str] = {}  # tool call id -> function name
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        calls = _tool_calls(m["tool_calls"], i) if m.get("tool_calls") else []
        if m.get("content") is None and (calls or role in ("assistant", "tool", "function")):
            text = ""
        else:
            text = _content(m.get("content"), i)
        if role in ("system", "developer"):
            system.append(text.strip())
        elif role == "user":
            messages.append(Message("user", text))
        elif role == "assistant":
            names.update({c.id: c.name for c in calls if c.id})
            messages.append(Message("assistant", calls_text(text, calls) if calls else text))
        elif role in ("tool", "function"):
            call_id = m.get("tool_call_id")
            call_id = call_id if isinstance(call_id, str) else None
            name = m.get("name") if isinstance(m.get("name"), str) else None
            name = name or (names.get(call_id) if call_id else None)
            messages.append(Message("user", result_text(text, name, call_id)))
        else:
            raise invalid(
                f"messages[{i}]: role must be system, developer, user, assistant or tool, "
                f"not {role!r}"
            )
    if not messages:
        raise invalid("the messages hold no user message", "messages")
    # An empty user message is a turn like any other (OpenAI accepts it); an empty last
    # assistant message would be a reply to continue with nothing in it.
    if messages[-1].role == "assistant" and not messages[-1].content.strip():
        raise invalid("the last message is an empty reply: nothing to continue", "messages")
    return system, messages


def parse_chat(body: dict[str, Any], base: ConversationSettings) -> ChatRequest:
    """A `/v1/chat/completions` body; system messages become the system prompt (placed by the
    system policy), the rest the turns. A history that ends with the assistant's message is a
    reply to continue."""
    system, messages = _messages(body.get("messages"))
    tools = _tools(body)
    choice = _tool_choice(body, tools)
    _flag(body, "parallel_tool_calls")  # accepted; one call is returned
    generation = _generation(body, base)
    settings = generation.settings
    if system:
        settings = replace(settings, system="\n\n".join(s for s in system if s))
    mode = body.get("mode")
    if mode is not None:
        if mode not in ("chat", "code"):
            raise invalid("'mode' must be chat or code", "mode")
        settings = replace(settings, mode=Mode(mode))
    grammar = _response_format(body)
    if _flag(body, "logprobs"):
        top = _integer(body, "top_logprobs", 0, MAX_TOP)
        settings = settings.with_sampling(logprobs=top or 0)
    elif body.get("top_logprobs") is not None:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if grammar is not None:
        settings = settings.with_sampling(grammar=grammar)
    generation.settings = settings
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("'user' must be a string", "user")
    return ChatRequest(generation, messages, tools, user or None, choice)


@dataclass
class CompletionRequest:
    generation: Generation
    prompt_text: str | None
    prompt_ids: list[int] | None
    stop_token_ids: list[int]
    return_token_ids: bool
    echo: bool = False
    tokens_as_ids: bool = False
    """vLLM's `return_tokens_as_token_ids`: logprobs name tokens as "token_id:N"."""


def parse_completion(body: dict[str, Any], base: ConversationSettings) -> CompletionRequest:
    """A `/v1/completions` body: `prompt` as text or as a list of token ids (as vLLM takes it)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list | str):
        prompt = prompt[0]  # a batch of one
    text: str | None = None
    ids: list[int] | None = None
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("'prompt' is empty", "prompt")
        text = prompt
    elif isinstance(prompt, list) and prompt:
        ids = _token_ids(prompt, "prompt")
    else:
        raise invalid("'prompt' must be a non-empty string or list of token ids", "prompt")
    stop_ids = _token_ids(body.get("stop_token_ids") or [], "stop_token_ids")
    echo = _flag(body, "echo")
    generation = _generation(body, base, min_tokens=0 if echo else 1)
    logprobs = _integer(body, "logprobs", 0, MAX_TOP)
    settings = generation.settings
    if logprobs is not None:
        settings = settings.with_sampling(logprobs=logprobs)
        if echo:
            settings = settings.with_sampling(prompt_logprobs=logprobs)
    grammar = _response_format(body)
    if grammar is not None:
        settings = settings.with_sampling(grammar=grammar)
    generation.settings = settings
    return CompletionRequest(
        generation,
        text,
        ids,
        stop_ids,
        _flag(body, "return_token_ids"),
        echo,
        _flag(body, "return_tokens_as_token_ids"),
    )
