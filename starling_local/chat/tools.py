"""Function calling for a model that was not trained for it, stated exactly.

Starling has no tool tokens and no tool turns. So:

- Tools offered without a demand for a call (`tool_choice` absent, "auto" or "none") are not
  shown to the model and the reply is ordinary text: under "auto" a model may always answer
  in text, and describing dozens of tools would fill most of the context window.
- When a call is demanded ("required", or one named function), the offered functions are
  described in the system prompt and a grammar makes the reply exactly one call,
  `{"name": ..., "arguments": {...}}`, its arguments valid against the function's schema.
- In the history, a reply that made calls is rendered as those calls in that same JSON form
  (one per line, after any text), and a tool result as a user turn
  `Result of NAME (call ID): CONTENT`, so call -> result -> answer reads as a conversation.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starling_local.engine.grammar import Grammar, check_schema, schema_grammar
from starling_local.errors import UsageError

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Function:
    """A function a client offers."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """One call the reply made: `arguments` is a JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def describe(functions: Sequence[Function]) -> str:
    """The functions as the system prompt states them, one line each."""
    lines = [
        "You can call functions. Reply with exactly one call as JSON: "
        '{"name": FUNCTION NAME, "arguments": {ARGUMENTS}}. The functions:'
    ]
    for f in functions:
        schema = json.dumps(f.parameters, separators=(",", ":"), ensure_ascii=False)
        about = f" {f.description.strip()}" if f.description.strip() else ""
        lines.append(f"- {f.name}:{about} Arguments: {schema}")
    return "\n".join(lines)


def call_grammar(functions: Sequence[Function]) -> Grammar:
    """A grammar for one call of one of `functions`, its arguments valid for it."""
    if not functions:
        raise UsageError("no function to call")
    choices = []
    defs: dict[str, Any] = {}
    for i, f in enumerate(functions):
        check_schema(f.parameters, f"tools[{f.name}].function.parameters")
        arguments = _hoist_definitions(f.parameters, f"fn{i}-", defs)
        choices.append(
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = choices[0] if len(choices) == 1 else {"anyOf": choices}
    if defs:
        schema = {**schema, "$defs": defs}
    return schema_grammar(schema)


def _hoist_definitions(parameters: dict[str, Any], prefix: str, defs: dict[str, Any]) -> Any:
    """`parameters` made to work one level down (as a call's `arguments`): its `$defs` (and
    `definitions`) move to the root under names of their own, each `$ref` follows them, and a
    `$ref` to its own root ("#", a recursive model) points at a copy kept in the root's `$defs`.
    Pydantic writes every nested model this way, so without it any model with a sub-model
    fails as a tool."""
    own = {k: v for k, v in parameters.items() if k not in ("$defs", "definitions")}
    local = {**parameters.get("definitions", {}), **parameters.get("$defs", {})}
    root_name = f"{prefix}root"

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items()}
            ref = node.get("$ref")
            if isinstance(ref, str):
                if ref == "#":
                    out["$ref"] = f"#/$defs/{root_name}"
                for base in ("#/$defs/", "#/definitions/"):
                    if ref.startswith(base):
                        out["$ref"] = f"#/$defs/{prefix}{ref[len(base) :]}"
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, schema in local.items():
        defs[f"{prefix}{name}"] = rewrite(schema)
    arguments = rewrite(own)
    if '"$ref": "#"' in json.dumps(parameters):
        defs[root_name] = arguments
        return {"$ref": f"#/$defs/{root_name}"}
    return arguments


def parse_call(text: str) -> ToolCall:
    """The call in a grammar-constrained reply."""
    try:
        data = json.loads(text)
        name, arguments = data["name"], data["arguments"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"the reply is not a function call: {exc}") from None
    return ToolCall(new_call_id(), str(name), json.dumps(arguments, ensure_ascii=False))


_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS = re.compile(r'"arguments"\s*:\s*')


def parse_partial_call(text: str) -> ToolCall:
    """A call the token budget cut short: the name if it was written, and the arguments as far
    as they got (as OpenAI answers a call cut at `max_tokens`)."""
    try:
        return parse_call(text)
    except UsageError:
        pass
    name = _NAME.search(text)
    arguments = _ARGUMENTS.search(text)
    return ToolCall(
        new_call_id(),
        json.loads(f'"{name.group(1)}"') if name else "",
        text[arguments.end() :] if arguments else "",
    )


def calls_text(content: str, calls: Sequence[ToolCall]) -> str:
    """A reply that made `calls`, as its turn renders it."""
    lines = [content.strip()] if content.strip() else []
    for call in calls:
        try:
            arguments: Any = json.loads(call.arguments)
        except ValueError:
            arguments = call.arguments
        lines.append(json.dumps({"name": call.name, "arguments": arguments}, ensure_ascii=False))
    return "\n".join(lines)


def result_text(content: str, name: str | None, call_id: str | None) -> str:
    """A tool's result, as the user turn that carries it."""
    who = name or "the function"
    ref = f" (call {call_id})" if call_id else ""
    return f"Result of {who}{ref}: {content.strip()}"
