"""OpenAI's Responses API (`POST /v1/responses`), stateless: `input` (text, or a list of
messages, `function_call` and `function_call_output` items), `instructions`,
`max_output_tokens`, `temperature`, `top_p`, `text.format`, function `tools` and
`tool_choice`, streamed or not.

A request is translated into a `/v1/chat/completions` body and parsed by the same rules, so it
renders token for token as a chat does; the reply is written as a `response` object, or as the
documented stream of events (`response.created` ... `response.output_text.delta` ...
`response.completed`). Nothing is stored: `previous_response_id` and `store: true` are 400s.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from starling_local.chat.service import ReplyOutcome
from starling_local.chat.tools import parse_call, parse_partial_call
from starling_local.server.protocol import invalid


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as a chat completions body."""
    if body.get("previous_response_id") is not None:
        raise invalid(
            "'previous_response_id' is not supported: this server keeps no responses; send the "
            "whole conversation in 'input'",
            "previous_response_id",
        )
    if body.get("store") is True:
        raise invalid("'store' must be false or left out: this server keeps no responses", "store")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise invalid("'instructions' must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    messages += _input_messages(body.get("input"))
    out: dict[str, Any] = {"model": body.get("model") or "", "messages": messages}
    for key in ("temperature", "top_p", "stream", "user"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    fmt = _text_format(body.get("text"))
    if fmt is not None:
        out["response_format"] = fmt
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        out["tool_choice"] = _tool_choice(body["tool_choice"])
    return out


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text", "text") or not isinstance(
                part.get("text"), str
            ):
                raise invalid(f"{where}: only text content is supported (Starling reads text)")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"{where}: 'content' must be a string or a list of text parts")


def _input_messages(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise invalid("'input' must be a string or a non-empty list of items", "input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise invalid(f"input[{i}] must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid(f"input[{i}]: role must be user, assistant, system or developer")
            messages.append({"role": role, "content": _text(item.get("content"), f"input[{i}]")})
        elif kind == "function_call":
            call = {
                "id": str(item.get("call_id") or item.get("id") or f"call_{i}"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"input[{i}].output")
            messages.append(
                {"role": "tool", "tool_call_id": str(item.get("call_id") or ""), "content": text}
            )
        elif kind == "reasoning":
            continue  # another model's reasoning summary: Starling does not reason in items
        else:
            raise invalid(f"input[{i}]: items of type {kind!r} are not supported", "input")
    return messages


def _text_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        return {
            "type": "json_schema",
            "json_schema": {"name": fmt.get("name") or "output", "schema": fmt["schema"]},
        }
    raise invalid(
        "'text.format' must be {type: text}, {type: json_object} or "
        "{type: json_schema, schema: {...}}",
        "text",
    )


def _tools(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise invalid("'tools' must be a list", "tools")
    out = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise invalid(f"tools[{i}]: only function tools are supported, not {kind!r}", "tools")
        function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


# --- replies -------------------------------------------------------------------------------------


class ResponseWriter:
    """The `response` object of one reply, and the stream of events that builds it."""

    def __init__(self, model: str, body: dict[str, Any], tool_call: bool) -> None:
        self.id = "resp_" + secrets.token_hex(12)
        self.message_id = "msg_" + secrets.token_hex(12)
        self.created = int(time.time())
        self.model = model
        self.body = body
        self.tool_call = tool_call
        self.sequence = 0
        self.text = ""

    def _response(self, status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
            "instructions": self.body.get("instructions"),
            "max_output_tokens": self.body.get("max_output_tokens"),
            "temperature": self.body.get("temperature"),
            "top_p": self.body.get("top_p"),
            "tools": self.body.get("tools") or [],
            "tool_choice": self.body.get("tool_choice") or "auto",
            "text": self.body.get("text") or {"format": {"type": "text"}},
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "store": False,
            "error": None,
            "incomplete_details": None,
            "metadata": self.body.get("metadata") or {},
            **extra,
        }

    def _message(self, status: str, text: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": []}
        return {
            "id": self.message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [part] if status == "completed" or text else [],
        }

    def _call(self, outcome: ReplyOutcome) -> dict[str, Any]:
        cut = outcome.stats.stop_reason == "length"
        call = parse_partial_call(outcome.text) if cut else parse_call(outcome.text)
        return {
            "id": "fc_" + secrets.token_hex(12),
            "type": "function_call",
            "status": "incomplete" if cut else "completed",
            "call_id": call.id,
            "name": call.name,
            "arguments": call.arguments,
        }

    def whole(self, outcome: ReplyOutcome) -> dict[str, Any]:
        output = [
            self._call(outcome) if self.tool_call else self._message("completed", outcome.text)
        ]
        return self._finished(outcome, output)

    def _finished(self, outcome: ReplyOutcome, output: list[dict[str, Any]]) -> dict[str, Any]:
        s = outcome.stats
        cut = s.stop_reason == "length"
        usage = {
            "input_tokens": s.prompt_tokens,
            "input_tokens_details": {"cached_tokens": outcome.cached_tokens},
            "output_tokens": s.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": s.prompt_tokens + s.completion_tokens,
        }
        extra: dict[str, Any] = {"usage": usage}
        if cut:
            extra["incomplete_details"] = {"reason": "max_output_tokens"}
        response = self._response("incomplete" if cut else "completed", output, **extra)
        return response

    # --- the stream ----------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def first(self) -> list[str]:
        events = [
            self._event("response.created", response=self._response("in_progress", [])),
            self._event("response.in_progress", response=self._response("in_progress", [])),
        ]
        if not self.tool_call:
            events += [
                self._event(
                    "response.output_item.added",
                    output_index=0,
                    item=self._message("in_progress", ""),
                ),
                self._event(
                    "response.content_part.added",
                    item_id=self.message_id,
                    output_index=0,
                    content_index=0,
                    part={"type": "output_text", "text": "", "annotations": []},
                ),
            ]
        return events

    def piece(self, text: str) -> str | None:
        if self.tool_call or not text:
            return None  # a demanded call is sent whole, parsed, at the end
        self.text += text
        return self._event(
            "response.output_text.delta",
            item_id=self.message_id,
            output_index=0,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def last(self, outcome: ReplyOutcome) -> list[str]:
        if self.tool_call:
            item = self._call(outcome)
            events = [
                self._event(
                    "response.output_item.added",
                    output_index=0,
                    item={**item, "arguments": "", "status": "in_progress"},
                ),
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=0,
                    delta=item["arguments"],
                ),
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=0,
                    arguments=item["arguments"],
                ),
                self._event("response.output_item.done", output_index=0, item=item),
            ]
        else:
            item = self._message("completed", self.text)
            part = item["content"][0]
            events = [
                self._event(
                    "response.output_text.done",
                    item_id=self.message_id,
                    output_index=0,
                    content_index=0,
                    text=self.text,
                    logprobs=[],
                ),
                self._event(
                    "response.content_part.done",
                    item_id=self.message_id,
                    output_index=0,
                    content_index=0,
                    part=part,
                ),
                self._event("response.output_item.done", output_index=0, item=item),
            ]
        # `response.completed` also when the budget cut the reply (its status says
        # "incomplete"): the openai SDK's stream helper and the Agents SDK wait for that event.
        response = self._finished(outcome, [item])
        return [*events, self._event("response.completed", response=response)]

    def error(self, message: str) -> str:
        return self._event("error", code="server_error", message=message, param=None)
