"""The clients people point at a local `/v1` server, installed from PyPI as test extras and
driven against `starling serve` on the tiny model: LangChain's `ChatOpenAI` (structured output
both ways it asks for it) and litellm (chat, streaming, `response_format`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest

from tests.server_helpers import Served, serve

# litellm reads its model price list from the network at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


class Answer(pydantic.BaseModel):
    """An answer with a confidence."""

    answer: str = pydantic.Field(max_length=20)
    confident: bool


@pytest.fixture(scope="module")
def server(tiny_q4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tiny_q4, tmp_path_factory.mktemp("clients"), "--ctx", "2048") as s:
        yield s


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(server: Served, method: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=server.v1,
        api_key="unused",  # type: ignore[arg-type]
        model="tiny-q4_k_m",
        temperature=0,
        max_tokens=300,  # type: ignore[call-arg]
        max_retries=0,
    )
    if method == "json_mode":
        # JSON mode: any object; the tiny model's is parsed as the schema only by luck, so
        # the raw message is checked to be one JSON object.
        raw = llm.bind(response_format={"type": "json_object"}, logit_bias={"28752": 100})
        message = raw.invoke("Answer in JSON.")
        assert isinstance(json.loads(str(message.content)), dict)
        return
    structured = llm.with_structured_output(Answer, method=method)  # type: ignore[arg-type]
    result = structured.invoke("Is the sky blue?")
    assert isinstance(result, Answer) and len(result.answer) <= 20


def test_litellm_chat_stream_and_response_format(server: Served) -> None:
    import litellm

    common = {
        "model": "openai/tiny-q4_k_m",
        "api_base": server.v1,
        "api_key": "unused",
        "temperature": 0,
    }
    hello = [{"role": "user", "content": "Hello"}]
    whole = litellm.completion(messages=hello, max_tokens=8, **common)
    text = whole.choices[0].message.content
    assert text and whole.usage.prompt_tokens == 17 and whole.usage.completion_tokens == 8
    chunks = list(litellm.completion(messages=hello, max_tokens=8, stream=True, **common))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    schema = Answer.model_json_schema()
    formatted = litellm.completion(
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        max_tokens=300,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "Answer", "schema": schema, "strict": True},
        },
        **common,
    )
    Answer.model_validate_json(formatted.choices[0].message.content)
