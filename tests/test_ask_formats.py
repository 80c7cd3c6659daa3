"""`starling ask` with structured output and llama.cpp's penalty and bias samplers."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from tests.cli_helpers import assert_one_line_error, starling

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "rank": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["city", "rank", "tags"],
}


def test_json_schema_makes_stdout_the_document_alone(tiny_q4: Path, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    for seed in ("1", "2"):
        r = starling(
            "ask", "-m", tiny_q4, "--json-schema", schema, "--seed", seed, "--temperature",
            "1", "--max-tokens", "300", "Describe a city", home=tmp_path,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        jsonschema.validate(json.loads(r.stdout), SCHEMA)
        assert r.stdout == r.stdout.strip() + "\n"
    # Saved with the conversation: the reply, not the grammar (the next reply is free text).
    again = starling("ask", "-m", tiny_q4, "--continue", "--max-tokens", "4", "And?", home=tmp_path)
    assert again.returncode == 0, again.stderr
    # --format json, greedy, with a bias toward "}" (28752): the object closes as soon as it
    # may (sampled, random weights may open a string that "}" never ends).
    plain = starling(
        "ask", "-m", tiny_q4, "--no-save", "--format", "json", "--logit-bias", "28752=100",
        "--temperature", "0", "--max-tokens", "300", "Hi", home=tmp_path,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert isinstance(json.loads(plain.stdout), dict)


def test_bad_schemas_and_flags_get_one_line(tiny_q4: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "integer", "minimum": 1}))
    assert_one_line_error(
        starling("ask", "-m", tiny_q4, "--json-schema", bad, "Hi", home=tmp_path), 2, "minimum"
    )
    broken = tmp_path / "broken.json"
    broken.write_text("{nope")
    assert_one_line_error(
        starling("ask", "-m", tiny_q4, "--json-schema", broken, "Hi", home=tmp_path),
        2,
        "not a JSON schema",
    )
    for flag, value, needle in (
        ("--frequency-penalty", "3", "-2 to 2"),
        ("--presence-penalty", "-5", "-2 to 2"),
        ("--logit-bias", "x=1", "ID=BIAS"),
        ("--logit-bias", "5=500", "-100 to 100"),
    ):
        assert_one_line_error(
            starling("ask", "-m", tiny_q4, flag, value, "Hi", home=tmp_path), 2, needle
        )
    # Cut before the JSON closes: an error, not half a document on stdout.
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    cut = starling(
        "ask", "-m", tiny_q4, "--no-save", "--json-schema", schema, "--max-tokens", "3", "Hi",
        home=tmp_path,
    )  # fmt: skip
    assert_one_line_error(cut, 1, "raise --max-tokens")
    assert cut.stdout == ""


def test_penalties_from_the_command_line(tiny_q4: Path, tmp_path: Path) -> None:
    def hellos(*flags: str) -> int:
        r = starling(
            "ask", "-m", tiny_q4, "--no-save", "--temperature", "0", "--max-tokens", "24",
            "--logit-bias", "22557=5", *flags, "Hello", home=tmp_path,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout.split().count("Hello")

    biased = hellos()
    assert biased >= 20
    assert hellos("--frequency-penalty", "2") < biased / 4
    assert hellos("--presence-penalty", "2") < biased / 4
    assert hellos("--repeat-penalty", "1.5") < biased / 4
