"""Constrained output: a GBNF grammar for llama.cpp's grammar sampler, made from a JSON schema by
llama-cpp-python's own converter (or its JSON grammar for "any JSON object").

The converter ignores the schema keywords it cannot express, which would give a reply that does
not validate. A schema is therefore checked first, keyword by keyword, and a keyword outside
what the converter honours is refused by name: never a silently unconstrained reply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from starling_local.errors import StarlingError

GrammarKind = Literal["json_object", "json_schema", "gbnf"]

#: Keywords the converter turns into grammar rules.
CONSTRAINING = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "pattern",
        "minLength",
        "maxLength",
        "format",
    }
)
#: Keywords that describe and never constrain: safe to ignore.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "$defs",
        "definitions",
        "deprecated",
        "readOnly",
        "writeOnly",
        "strict",
    }
)
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4"})
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
MAX_SCHEMA_BYTES = 64 << 10


class GrammarError(StarlingError):
    """A schema or grammar that cannot constrain a reply (the message names why)."""


@dataclass(frozen=True)
class Grammar:
    """What constrains a reply: GBNF text for llama.cpp, and the schema it came from (sent to
    vLLM as a schema, and used to check the reply)."""

    gbnf: str
    kind: GrammarKind
    schema: dict[str, Any] | None = None


def json_object_grammar() -> Grammar:
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return Grammar(_leading_space(JSON_GBNF), "json_object")


def schema_grammar(schema: Any) -> Grammar:
    """A grammar whose every sentence validates against the JSON schema `schema`."""
    check_schema(schema)
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except (AssertionError, KeyError, ValueError, TypeError, RecursionError) as exc:
        raise GrammarError(f"the schema cannot be turned into a grammar: {exc}") from None
    return Grammar(_leading_space(_strict_strings(gbnf)), "json_schema", schema)


def _strict_strings(gbnf: str) -> str:
    # The converter vendored in llama-cpp-python lets a string hold raw control characters
    # (`char ::= [^"\\] | ...`), which JSON forbids: a reply with a raw carriage return would
    # not parse. The same rule without them, as llama.cpp's newer converter writes it.
    return gbnf.replace(r'char ::= [^"\\] ', r'char ::= [^"\\\x7F\x00-\x1F] ')


def gbnf_grammar(text: str) -> Grammar:
    """A grammar given as GBNF text (vLLM's `structured_outputs.grammar`, as one starling-local
    sends another the grammar it made from a schema). llama.cpp parses it when the reply
    starts: `Engine.check_grammar` says beforehand whether it will."""
    if not re.search(r"^\s*root\s*::=", text, re.M):
        raise GrammarError("a GBNF grammar needs a 'root ::= ...' rule")
    if len(text) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the grammar is over {MAX_SCHEMA_BYTES} bytes")
    return Grammar(text, "gbnf")


def _leading_space(gbnf: str) -> str:
    # Starling writes the space after `Assistant:` itself: its first token is " {", which a
    # grammar starting at "{" would forbid. The JSON starts after an optional space.
    body = re.sub(r"^root(\s*)::=", r"json-root\1::=", gbnf, count=1, flags=re.M)
    return f'root ::= " "? json-root\n{body}'


def check_schema(schema: Any, where: str = "schema", depth: int = 0) -> None:
    """Refuse (GrammarError, naming the keyword and where it is) what the converter would
    silently ignore."""
    if depth == 0 and len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the schema is over {MAX_SCHEMA_BYTES} bytes")
    if depth > 32:
        raise GrammarError(f"{where}: the schema nests deeper than 32 levels")
    if isinstance(schema, bool):
        if schema:
            return
        raise GrammarError(f"{where}: the schema 'false' accepts nothing")
    if not isinstance(schema, dict):
        raise GrammarError(f"{where}: a schema must be an object")
    for key, value in schema.items():
        if key in ANNOTATIONS and key not in ("$defs", "definitions"):
            continue
        if key not in CONSTRAINING and key not in ("$defs", "definitions"):
            raise GrammarError(
                f"{where}: the schema keyword {key!r} is not supported by the grammar "
                "converter (supported: " + ", ".join(sorted(CONSTRAINING)) + ")"
            )
        here = f"{where}.{key}"
        if key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise GrammarError(f"{here} must be an object")
            for name, sub in value.items():
                check_schema(sub, f"{here}.{name}", depth + 1)
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                raise GrammarError(f"{here} must be a non-empty list")
            for i, sub in enumerate(value):
                check_schema(sub, f"{here}[{i}]", depth + 1)
        elif key == "items":
            subs = value if isinstance(value, list) else [value]
            for i, sub in enumerate(subs):
                check_schema(sub, f"{here}[{i}]" if isinstance(value, list) else here, depth + 1)
        elif key == "additionalProperties" and not isinstance(value, bool):
            check_schema(value, here, depth + 1)
        elif key == "type":
            types = value if isinstance(value, list) else [value]
            unknown = [t for t in types if t not in TYPES]
            if unknown:
                raise GrammarError(f"{here}: unknown type {unknown[0]!r}")
        elif key == "format" and value not in FORMATS:
            raise GrammarError(
                f"{here}: the string format {value!r} is not supported by the grammar converter "
                "(supported: " + ", ".join(sorted(FORMATS)) + ")"
            )
        elif key == "$ref" and not (isinstance(value, str) and value.startswith("#/")):
            raise GrammarError(f"{here}: only local references ('#/...') are supported")
        elif key == "required" and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise GrammarError(f"{here} must be a list of property names")
        elif key in ("minItems", "maxItems", "minLength", "maxLength") and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise GrammarError(f"{here} must be a non-negative integer")
        elif key == "enum" and (not isinstance(value, list) or not value):
            raise GrammarError(f"{here} must be a non-empty list")


def validate(schema: dict[str, Any], text: str) -> str | None:
    """Why `text` is not a JSON document valid against `schema` (None: it is)."""
    import jsonschema

    try:
        document = json.loads(text)
    except ValueError as exc:
        return f"not JSON: {exc}"
    try:
        jsonschema.validate(document, schema)
    except jsonschema.ValidationError as exc:
        return f"does not match the schema: {exc.message}"
    except jsonschema.SchemaError as exc:
        return f"the schema is invalid: {exc.message}"
    return None
