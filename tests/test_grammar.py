"""Grammars from JSON schemas: what the converter can express, what is refused by name, and
the engine's grammar-checked sampling against llama-cpp-python's own grammar sampling."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Literal

import jsonschema
import pydantic
import pytest

from starling_local.chat.template import Message, render_tokens
from starling_local.engine.grammar import GrammarError, check_schema, schema_grammar, validate
from starling_local.engine.runtime import Engine
from starling_local.engine.types import SamplingParams


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Item(pydantic.BaseModel):
    label: str = pydantic.Field(max_length=8)
    color: Color
    size: Literal["s", "m", "l"]


class Order(pydantic.BaseModel):
    """What pydantic writes for the openai SDK's `parse` and LangChain: $defs, $ref, anyOf
    with null, arrays, enums, titles and descriptions."""

    items: list[Item] = pydantic.Field(max_length=2)
    note: str | None = pydantic.Field(default=None, max_length=10, description="a note")
    paid: bool


def test_pydantic_schemas_are_accepted() -> None:
    schema = Order.model_json_schema()
    assert "$defs" in schema
    check_schema(schema)
    gbnf = schema_grammar(schema).gbnf
    assert gbnf.startswith('root ::= " "? json-root')
    assert r'char ::= [^"\\\x7F\x00-\x1F]' in gbnf  # no raw control characters in strings


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"type": "integer", "minimum": 0}, "'minimum'"),
        ({"type": "number", "exclusiveMaximum": 3}, "'exclusiveMaximum'"),
        ({"type": "array", "uniqueItems": True}, "'uniqueItems'"),
        ({"type": "object", "minProperties": 1}, "'minProperties'"),
        ({"not": {"type": "string"}}, "'not'"),
        ({"if": {}, "then": {}}, "'if'"),
        ({"type": "string", "format": "uri"}, "'uri'"),
        ({"properties": {"a": {"type": "integer", "multipleOf": 3}}}, "schema.properties.a"),
        ({"type": "decimal"}, "unknown type"),
        ({"$ref": "other.json#/x"}, "local references"),
        (False, "accepts nothing"),
        ([1], "must be an object"),
    ],
)
def test_what_the_converter_would_ignore_is_refused_by_name(schema: object, needle: str) -> None:
    with pytest.raises(GrammarError, match=None) as info:
        check_schema(schema)
    assert needle in str(info.value)


def test_deep_or_huge_schemas_are_refused() -> None:
    deep: dict[str, object] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    with pytest.raises(GrammarError, match="deeper"):
        check_schema(deep)
    huge = {"enum": ["x" * 100] * 1000}
    with pytest.raises(GrammarError, match="bytes"):
        check_schema(huge)


def test_sampled_replies_validate_even_from_random_weights(engine: Engine) -> None:
    schema = Order.model_json_schema()
    grammar = schema_grammar(schema)
    prompt = render_tokens([Message("user", "An order, please")], engine.tokenize_text)
    for seed in range(10):
        stream = engine.generate(
            prompt, SamplingParams(temperature=1.0, seed=seed, max_tokens=400, grammar=grammar)
        )
        text = stream.consume()
        assert stream.stats.stop_reason == "end_of_turn", text
        assert validate(schema, text) is None
        Order.model_validate_json(text)


def test_checked_sampling_gives_llama_cpp_pythons_own_grammar_reply(
    engine: Engine, tiny_q4: Path
) -> None:
    """The engine samples without the grammar and checks the token (llama.cpp's
    `common_sampler` way); llama-cpp-python applies the grammar to every candidate. Greedy,
    they must agree token for token."""
    import llama_cpp

    from starling_local.engine.llama_adapter import model_defaults
    from starling_local.llamacpp.cpu_kernels import cpu_kernels

    schema = {
        "type": "object",
        "properties": {"a": {"type": "string", "maxLength": 20}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    }
    grammar = schema_grammar(schema)
    prompt = render_tokens([Message("user", "Hello")], engine.tokenize_text)
    ours = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=120, grammar=grammar))
    ours.consume()
    with model_defaults(**cpu_kernels().model_params()):
        llm = llama_cpp.Llama(str(tiny_q4), n_ctx=512, verbose=False)
    try:
        theirs = llm.create_completion(
            prompt,
            max_tokens=120,
            temperature=0.0,
            repeat_penalty=1.0,
            grammar=llama_cpp.LlamaGrammar.from_string(grammar.gbnf, verbose=False),
        )
    finally:
        llm.close()
    text = theirs["choices"][0]["text"]  # type: ignore[index]
    jsonschema.validate(json.loads(text), schema)
    assert engine.detokenize(ours.token_ids) == text
