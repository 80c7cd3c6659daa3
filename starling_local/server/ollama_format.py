"""Ollama's API as starling-local reads and writes it (its `docs/api.md` and `api/types.go`).

Requests are translated into the OpenAI-shaped bodies the rest of the server already checks
(`protocol.parse_chat`), so both APIs share one set of rules; replies and models are written
as Ollama's objects: NDJSON chunks, a last object with `done_reason` and integer-nanosecond
durations, `/api/tags` and `/api/show` descriptions read from the GGUF.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from starling_local.chat.generation import ReplyOutcome
from starling_local.chat.tools import parse_call
from starling_local.gguf.info import GGUFInfo
from starling_local.server.protocol import APIError, invalid

#: The version of Ollama's API this follows (clients such as Copilot want a number).
OLLAMA_VERSION = "0.12.6"
#: Ollama's `done_reason` for ours.
DONE_REASON = {"end_of_turn": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
#: Starling's template as Ollama writes templates (Go's text/template), token-exact: no
#: newlines, no space after `Assistant:`, the system text right after BOS.
TEMPLATE = (
    "{{- if .System }}{{ .System }}<|end_of_turn|>{{ end }}"
    "{{- range .Messages }}"
    '{{- if eq .Role "user" }}GPT4 Correct User: {{ .Content }}<|end_of_turn|>'
    '{{- else if eq .Role "assistant" }}GPT4 Correct Assistant: {{ .Content }}<|end_of_turn|>'
    "{{- end }}{{- end }}GPT4 Correct Assistant:"
)
#: Ollama's options and the OpenAI-shaped fields they become.
OPTIONS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repetition_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "num_predict": "max_tokens",
    "stop": "stop",
}


def now() -> str:
    """RFC 3339 in UTC with a `Z`, as Ollama writes `created_at`."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat().replace("+00:00", "Z")


# --- requests ------------------------------------------------------------------------------------


def options_body(body: dict[str, Any]) -> dict[str, Any]:
    """`options` (and the top-level `format`) as OpenAI-shaped fields (`num_ctx` is the model
    slot's, see `num_ctx`). Options that do not apply here (`num_gpu`, `mirostat`...) are
    ignored, as Ollama ignores unknown ones."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise invalid("'options' must be an object", "options")
    out: dict[str, Any] = {}
    for key, target in OPTIONS.items():
        value = options.get(key)
        if value is None:
            continue
        if key == "num_predict":
            if isinstance(value, bool) or not isinstance(value, int):
                raise invalid("'options.num_predict' must be an integer", "options")
            if value < 0:  # -1: until the context is full
                continue
            value = max(1, value)
        if key == "top_k" and isinstance(value, int) and not isinstance(value, bool):
            value = max(0, value)
        if key == "repeat_penalty" and isinstance(value, int | float) and value <= 0:
            continue
        out[target] = value
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt}}
    elif fmt not in (None, ""):
        raise invalid("'format' must be \"json\" or a JSON schema object", "format")
    return out


#: The smallest `num_ctx` honoured (smaller ones are raised to it).
MIN_NUM_CTX = 256


def num_ctx(body: dict[str, Any]) -> int | None:
    """`options.num_ctx`: the context window the request wants (None: whatever is loaded)."""
    options = body.get("options")
    value = options.get("num_ctx") if isinstance(options, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise invalid("'options.num_ctx' must be a positive integer", "options")
    return max(MIN_NUM_CTX, value)


def refuse_unsupported(body: dict[str, Any], model: str) -> None:
    """What Starling cannot do, said as Ollama says it."""
    think = body.get("think")
    if think not in (None, False, "", "none"):
        raise invalid(f'"{model}" does not support thinking')
    if body.get("suffix"):
        raise invalid(f'"{model}" does not support insert (fill-in-the-middle)')
    if body.get("images"):
        raise invalid(f'"{model}" does not support images: Starling reads text only')


def chat_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    """An `/api/chat` body as a `/v1/chat/completions` one."""
    refuse_unsupported(body, model)
    raw = body.get("messages")
    if not isinstance(raw, list):
        raise invalid("'messages' must be a list", "messages")
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", "messages")
        if m.get("images"):
            raise invalid(f'"{model}" does not support images: Starling reads text only')
        message: dict[str, Any] = {"role": m.get("role"), "content": m.get("content") or ""}
        calls = m.get("tool_calls")
        if calls:
            message["tool_calls"] = _openai_calls(calls, i)
        if m.get("role") == "tool":
            name = m.get("tool_name") or m.get("name")
            if isinstance(name, str):
                message["name"] = name
            if isinstance(m.get("tool_call_id"), str):  # Open WebUI sends the call's id
                message["tool_call_id"] = m["tool_call_id"]
        messages.append(message)
    out: dict[str, Any] = {"model": model, "messages": messages, **options_body(body)}
    if body.get("tools"):
        out["tools"] = body["tools"]
    if body.get("logprobs"):
        out["logprobs"] = True
        if body.get("top_logprobs") is not None:
            out["top_logprobs"] = body["top_logprobs"]
    return out


def _openai_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise invalid(f"messages[{index}].tool_calls must be a list", "messages")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"messages[{index}].tool_calls[{k}] needs function.name", "messages")
        arguments = fn.get("arguments") or {}
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{index}_{k}"
        out.append({"id": call_id, "type": "function",
                    "function": {"name": fn["name"], "arguments": text}})  # fmt: skip
    return out


def generate_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`/api/generate`'s `system` and `prompt` as chat messages."""
    system = body.get("system")
    prompt = body.get("prompt")
    if system is not None and not isinstance(system, str):
        raise invalid("'system' must be a string", "system")
    if not isinstance(prompt, str):
        raise invalid("'prompt' must be a string", "prompt")
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]


# --- replies -------------------------------------------------------------------------------------


@dataclass
class Timings:
    """What Ollama's last object reports, measured (integer nanoseconds)."""

    started_ns: int
    load_ns: int = 0


def durations(outcome: ReplyOutcome, timings: Timings, ended_ns: int) -> dict[str, Any]:
    s = outcome.stats
    return {
        "total_duration": max(0, ended_ns - timings.started_ns),
        "load_duration": timings.load_ns,
        "prompt_eval_count": s.prompt_tokens,
        "prompt_eval_duration": int(s.ttft_s * 1e9),
        "eval_count": s.completion_tokens,
        "eval_duration": int(s.decode_s * 1e9),
    }


def tool_calls(outcome: ReplyOutcome) -> list[dict[str, Any]]:
    """A grammar-made call as Ollama writes one: arguments as a JSON object."""
    call = parse_call(outcome.text)
    try:
        arguments = json.loads(call.arguments)
    except ValueError:
        arguments = {}
    return [{"function": {"name": call.name, "arguments": arguments}}]


def done_reason(outcome: ReplyOutcome) -> str:
    if outcome.error:
        raise APIError(500, outcome.error, kind="server_error")
    return DONE_REASON[outcome.stats.stop_reason]


# --- models --------------------------------------------------------------------------------------


def ollama_name(name: str) -> str:
    """`starling-lm-7b-beta:Q5_K_M` stays; a name without a tag gets `:latest`."""
    return name if ":" in name else f"{name}:latest"


def parameter_size(n_params: int) -> str:
    if n_params >= 1_000_000_000:
        return f"{n_params / 1e9:.1f}B"
    return f"{n_params / 1e6:.0f}M"


def details(info: GGUFInfo) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": info.architecture,
        "families": [info.architecture],
        "parameter_size": parameter_size(info.n_params),
        "quantization_level": info.quant,
    }


def model_info(info: GGUFInfo) -> dict[str, Any]:
    arch = info.architecture
    out: dict[str, Any] = {
        "general.architecture": arch,
        "general.file_type": info.file_type,
        "general.parameter_count": info.n_params,
        f"{arch}.context_length": info.context_length,
        f"{arch}.embedding_length": info.embedding_length,
        f"{arch}.block_count": info.block_count,
        f"{arch}.vocab_size": info.vocab_size,
        "tokenizer.ggml.bos_token_id": info.bos_id,
        "tokenizer.ggml.eos_token_id": info.eos_id,
    }
    if info.name:
        out["general.name"] = info.name
    return {k: v for k, v in out.items() if v is not None}


def parameters(n_ctx: int) -> str:
    """Ollama's `parameters` text: Continue reads `num_ctx` and `stop` from it."""
    return (
        f'num_ctx                        {n_ctx}\nstop                           "<|end_of_turn|>"'
    )


def modelfile(name: str, path: str, n_ctx: int) -> str:
    lines = [
        "# Modelfile generated by starling-local",
        f"# To build a new Modelfile based on this, replace FROM with:\n# FROM {name}",
        "",
        f"FROM {path}",
        f'TEMPLATE """{TEMPLATE}"""',
        f"PARAMETER num_ctx {n_ctx}",
        'PARAMETER stop "<|end_of_turn|>"',
    ]
    return "\n".join(lines) + "\n"
