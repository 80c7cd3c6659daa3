"""What real clients send `starling serve`: structured output, tools, logprobs, penalties, echo,
continuing a reply, and the rest of the OpenAI surface. Driven through the real openai SDK and
raw HTTP on 127.0.0.1, against the tiny random-weight model (a grammar makes even it answer in
valid JSON)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx2 as httpx
import jsonschema
import numpy as np
import openai
import pydantic
import pytest

from tests.cards import CARD_SINGLE
from tests.server_helpers import Served, serve

HELLO = [{"role": "user", "content": "Hello"}]
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # recorded requests (from shared/)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 8}},
            "required": ["zone"],
        },
    },
}


@pytest.fixture(scope="module")
def server(tiny_q4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tiny_q4, tmp_path_factory.mktemp("dialect"), "--ctx", "2048") as s:
        yield s


@pytest.fixture
def client(server: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def post(server: Served, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.v1}{path}", json=body, timeout=120)


def events(server: Served, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{server.v1}{path}", json=body, timeout=120) as s:
        assert s.status_code == 200, s.read()
        lines = list(s.iter_lines())
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


# --- structured output ---------------------------------------------------------------------------


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    population: int
    coastal: bool


def test_the_sdk_parses_a_pydantic_model_even_from_random_weights(client: openai.OpenAI) -> None:
    for seed in (1, 2, 3):
        done = client.chat.completions.parse(
            model="tiny-q4_k_m",
            messages=[{"role": "user", "content": "Describe a city."}],
            response_format=City,
            temperature=1.0,
            seed=seed,
            max_tokens=300,
        )
        parsed = done.choices[0].message.parsed
        assert isinstance(parsed, City) and len(parsed.name) <= 16
        assert done.choices[0].finish_reason == "stop"


def test_json_object_is_one_object(server: Served) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = {
        "messages": HELLO,
        "temperature": 0,
        "max_tokens": 200,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    }
    r = post(server, "/chat/completions", body).json()
    jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), schema)
    # Streamed, the chunks make the same document.
    chunks = events(server, "/chat/completions", {**body, "stream": True})
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == r["choices"][0]["message"]["content"]
    # json_object with a grammar of "any object": bounded here by a stop at the first "}".
    plain = post(
        server,
        "/chat/completions",
        {
            "messages": HELLO,
            "temperature": 0,
            "max_tokens": 300,
            "logit_bias": {"28752": 100},  # "}": the object closes as soon as it may
            "response_format": {"type": "json_object"},
        },
    ).json()
    assert isinstance(json.loads(plain["choices"][0]["message"]["content"]), dict)


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "integer", "minimum": 3}, "minimum"),
        ({"type": "object", "patternProperties": {"x": {}}}, "patternProperties"),
        ({"type": "string", "format": "email"}, "email"),
        ({"type": "array", "items": {"type": "number", "multipleOf": 2}}, "multipleOf"),
        ({"$ref": "https://example.com/s.json"}, "local references"),
    ],
)
def test_a_schema_the_converter_cannot_express_is_a_400_naming_it(
    server: Served, schema: dict[str, Any], keyword: str
) -> None:
    r = post(
        server,
        "/chat/completions",
        {
            "messages": HELLO,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema},
            },
        },
    )
    assert r.status_code == 400 and keyword in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "response_format"


# --- tools ---------------------------------------------------------------------------------------


def test_open_webui_default_chat_body_streams_a_normal_reply(server: Served) -> None:
    body = json.loads((FIXTURES / "openwebui-0.12.4-default-chat.json").read_text())
    assert len(body["tools"]) == 36 and "tool_choice" not in body
    body = {**body, "model": "tiny-q4_k_m", "max_tokens": 12, "temperature": 0}
    chunks = events(server, "/chat/completions", body)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip() and chunks[-1]["choices"][0]["finish_reason"] == "length"
    # The tools were not rendered into the prompt: it is the plain question's.
    alone = post(server, "/chat/completions", {**body, "tools": None, "stream": False}).json()
    assert alone["usage"]["prompt_tokens"] < 40
    assert alone["choices"][0]["message"]["content"] == text


def test_a_required_call_is_one_valid_call_of_an_offered_function(client: openai.OpenAI) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for seed in (1, 2):
        r = client.chat.completions.create(
            model="tiny-q4_k_m",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER, TIME],  # type: ignore[list-item]
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_a_named_call_streams_as_tool_call_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny-q4_k_m",
        messages=[{"role": "user", "content": "What time is it?"}],
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=True,
        temperature=0,
        max_tokens=200,
        stream=True,
    )
    chunks = list(stream)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas if d.function] == ["get_time"]
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    jsonschema.validate(json.loads(arguments), TIME["function"]["parameters"])  # type: ignore[index]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_an_agent_loop_history_renders_calls_and_results_as_turns(
    server: Served, client: openai.OpenAI
) -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": history}).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["content"]
    assert text == (
        '<s> GPT4 Correct User: Weather in Paris?<|end_of_turn|> GPT4 Correct Assistant: {"name": '
        '"get_weather", "arguments": {"city": "Paris"}}<|end_of_turn|> GPT4 Correct User: Result '
        'of get_weather (call call_1): {"temp": 21}<|end_of_turn|> GPT4 Correct Assistant:'
    )
    answer = client.chat.completions.create(
        model="tiny-q4_k_m",
        messages=history,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        max_tokens=8,
        temperature=0,
    )
    assert answer.choices[0].message.content and answer.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"tool_choice": "required"}, "no tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "x"),
        ({"tools": [{"type": "retrieval"}]}, "function tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_bad_tool_requests_are_400s(server: Served, extra: dict[str, Any], needle: str) -> None:
    r = post(server, "/chat/completions", {"messages": HELLO, **extra})
    assert r.status_code == 400 and needle in r.json()["error"]["message"]


# --- logprobs, penalties, echo -------------------------------------------------------------------


def test_chat_logprobs_put_the_greedy_token_on_top(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny-q4_k_m",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token
    assert "".join(e.token for e in content).strip() == (r.choices[0].message.content or "")
    streamed = client.chat.completions.create(
        model="tiny-q4_k_m",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=6,
        temperature=0,
        logprobs=True,
        stream=True,
    )
    tokens = [
        e.token
        for c in streamed
        for e in (c.choices[0].logprobs.content or [] if c.choices[0].logprobs else [])
    ]
    assert tokens == [e.token for e in content]


def test_echo_prompt_logprobs_equal_llama_cpp_own_log_softmax(
    server: Served, tiny_q4: Path
) -> None:
    import llama_cpp

    prompt = "The quick brown fox jumps over the lazy dog"
    r = post(
        server,
        "/completions",
        {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0},
    ).json()
    choice = r["choices"][0]
    assert choice["text"] == prompt and r["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == r["usage"]["prompt_tokens"]
    # llama.cpp's own logits for the same ids, every position, and their log-softmax.
    from starling_local.engine.llama_adapter import model_defaults
    from starling_local.llamacpp.cpu_kernels import cpu_kernels

    # (The CPU kernels the engine chose: AMX crashes where a VM advertises it without enabling it.)
    with model_defaults(**cpu_kernels().model_params()):
        llm = llama_cpp.Llama(str(tiny_q4), n_ctx=256, logits_all=True, verbose=False)
    ids = llm.tokenize(prompt.encode(), add_bos=True)
    llm.eval(ids)
    logsoftmax = np.array(
        [llama_cpp.Llama.logits_to_logprobs(row) for row in llm.scores[: len(ids)]]
    )
    expected = [float(logsoftmax[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert np.allclose(lp["token_logprobs"][1:], expected, atol=1e-3)
    llm.close()
    # lm-evaluation-harness's request: ids, echo, one token, logprobs=1.
    ll = post(
        server,
        "/completions",
        {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0},
    ).json()["choices"][0]["logprobs"]
    assert len(ll["token_logprobs"]) == len(ids) + 1
    assert np.allclose(ll["token_logprobs"][1 : len(ids)], expected, atol=1e-3)
    assert ll["text_offset"] == sorted(ll["text_offset"])


def test_completion_logprobs_in_the_legacy_shape(server: Served) -> None:
    r = post(
        server,
        "/completions",
        {"prompt": "Hello", "logprobs": 2, "max_tokens": 5, "temperature": 0},
    ).json()
    lp = r["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == 5 and all(len(t) == 2 for t in lp["top_logprobs"])
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]
    rows = zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True)
    for token, value, top in rows:
        assert max(top.values()) == pytest.approx(value) and token in top


def test_penalties_and_logit_bias_change_the_reply(client: openai.OpenAI) -> None:
    def reply(**kw: Any) -> str:
        r = client.chat.completions.create(
            model="tiny-q4_k_m",
            messages=HELLO,  # type: ignore[arg-type]
            max_tokens=24,
            temperature=0,
            **kw,
        )
        return r.choices[0].message.content or ""

    # A bias of 5 makes "Hello" (22557) the greedy choice almost every time; each penalty,
    # applied by llama.cpp's penalties sampler after the bias, makes it repeat less.
    hello = {"22557": 5}
    biased = reply(logit_bias=hello).split().count("Hello")
    assert biased >= 20
    assert reply(logit_bias=hello, frequency_penalty=2.0).split().count("Hello") < biased / 4
    assert reply(logit_bias=hello, presence_penalty=2.0).split().count("Hello") < biased / 4
    repeat = reply(logit_bias=hello, extra_body={"repetition_penalty": 1.5})
    assert repeat.split().count("Hello") < biased / 4
    assert reply(logit_bias={"22557": 100}) == " ".join(["Hello"] * 24)
    plain = reply()
    assert plain.startswith("itud")  # greedy's first token, 14534: banned, another comes
    assert not reply(logit_bias={"14534": -100}).startswith("itud")
    for bad in ({"frequency_penalty": 5.0}, {"presence_penalty": -2.5}):
        with pytest.raises(openai.BadRequestError):
            reply(**bad)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        reply(logit_bias={"99999": 1})
    with pytest.raises(openai.BadRequestError, match="-100 to 100"):
        reply(logit_bias={"5": 101})


# --- continuing a reply --------------------------------------------------------------------------


def test_a_history_ending_with_the_assistant_continues_it(server: Served) -> None:
    messages = [*HELLO, {"role": "assistant", "content": "Hello Hello"}]
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["tokens"]
    assert ids == [*CARD_SINGLE, 22557, 22557]
    r = post(
        server, "/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0}
    ).json()
    assert r["usage"]["prompt_tokens"] == 19
    # The continuation is what greedy decoding after those 19 ids gives.
    raw = post(
        server,
        "/completions",
        {"prompt": ids, "max_tokens": 6, "temperature": 0, "stop_token_ids": [32000]},
    ).json()
    assert r["choices"][0]["message"]["content"] == raw["choices"][0]["text"]


# --- the rest of the surface ---------------------------------------------------------------------


def test_models_retrieve_and_json_errors_for_unknown_routes(
    client: openai.OpenAI, server: Served
) -> None:
    model = client.models.retrieve("tiny-q4_k_m")
    assert model.id == "tiny-q4_k_m" and model.owned_by == "starling-local"
    assert client.models.retrieve("gpt-4o").id == "gpt-4o"  # any name is the served model
    for method, path, status in (
        ("GET", "/v1/nothing", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
    ):
        r = httpx.request(method, f"{server.url}{path}")
        assert r.status_code == status and r.headers["content-type"] == "application/json"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_null_means_not_set_and_routes_answer_without_v1(server: Served) -> None:
    body = {
        "messages": HELLO,
        "model": None,
        "stream": None,
        "temperature": None,
        "max_tokens": 4,
        "stop": None,
        "tools": None,
        "tool_choice": None,
        "response_format": None,
        "logprobs": None,
        "logit_bias": None,
        "seed": None,
        "stream_options": None,
    }
    r = httpx.post(f"{server.url}/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["system_fingerprint"] and data["choices"][0]["logprobs"] is None
    assert data["choices"][0]["message"]["refusal"] is None
    assert httpx.get(f"{server.url}/models").json()["data"][0]["id"] == "tiny-q4_k_m"
    short = {"prompt": "Hi", "max_tokens": 2}
    assert httpx.post(f"{server.url}/completions", json=short).is_success


def test_streamed_text_with_unicode_line_breaks_stays_one_event_a_line(server: Served) -> None:
    """NEL (token 31363 is U+0085), U+2028 and U+2029 are line ends to `str.splitlines`, and so
    to httpx's `iter_lines`: raw inside an event's JSON, they would cut it in two."""
    body = {  # a continued reply: its first characters are not stripped as leading space
        "messages": [*HELLO, {"role": "assistant", "content": "Hi"}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "logit_bias": {"31363": 100},
    }
    chunks = events(server, "/chat/completions", body)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "\x85" in text


@pytest.mark.parametrize("bad", [32002, 40000, -5])
def test_an_id_outside_the_vocabulary_is_a_400_on_every_path(server: Served, bad: int) -> None:
    """llama.cpp aborts the whole process (std::out_of_range) on such an id; it never gets
    there: a prompt of ids, echoed or not, and /detokenize."""
    for extra in ({}, {"echo": True}, {"echo": True, "max_tokens": 0, "logprobs": 1}):
        r = post(server, "/completions", {"prompt": [1, 22557, bad], "max_tokens": 1, **extra})
        assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": [22557, bad]})
    assert r.status_code == 400
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_any_model_name_is_the_served_model(client: openai.OpenAI, server: Served) -> None:
    """As llama-server: the README's `model="starling"`, LangChain's default `gpt-3.5-turbo`,
    any other name; the response names the served model. `NAME:code` is code mode."""
    for name in ("starling", "gpt-3.5-turbo", "tiny-q4_k_m"):
        r = client.chat.completions.create(model=name, messages=HELLO, max_tokens=2)
        assert r.model == "tiny-q4_k_m"
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": HELLO, "mode": "code"}).json()
    assert ids["tokens"][:2] == [1, 7596]  # "Code User:"


def test_empty_content_is_a_turn_like_any_other(server: Served) -> None:
    body = {"messages": [{"role": "user", "content": ""}], "max_tokens": 2}
    r = post(server, "/chat/completions", body)
    assert r.status_code == 200, r.text


def test_ollamas_format_and_vllms_guided_json_hold_the_reply(server: Served) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for extra in ({"format": schema}, {"guided_json": schema}, {"guided_json": json.dumps(schema)}):
        r = post(server, "/chat/completions", {"messages": HELLO, "max_tokens": 64, **extra})
        content = r.json()["choices"][0]["message"]["content"]
        assert set(json.loads(content)) == {"ok"}, extra
    loose = post(
        server,
        "/chat/completions",
        {"messages": HELLO, "max_tokens": 200, "temperature": 0, "format": "json"},
    ).json()
    if loose["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(loose["choices"][0]["message"]["content"]), dict)
    suffix = post(server, "/completions", {"prompt": "def f(", "suffix": "x", "max_tokens": 2})
    assert suffix.status_code == 400 and "fill-in-the-middle" in suffix.text


def test_a_forced_call_cut_by_max_tokens_is_a_200_with_length(
    client: openai.OpenAI, server: Served
) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
    choice = {"type": "function", "function": {"name": "lookup"}}
    r = client.chat.completions.create(
        model="x", messages=HELLO, tools=[tool], tool_choice=choice, max_tokens=6
    )  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "length"
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name in ("", "lookup") and isinstance(call.function.arguments, str)
    stream = client.chat.completions.create(
        model="x", messages=HELLO, tools=[tool], tool_choice=choice, max_tokens=6, stream=True
    )  # type: ignore[arg-type]
    finishes = [c.choices[0].finish_reason for c in stream if c.choices]
    assert finishes[-1] == "length"


def test_browsers_on_loopback_read_replies(server: Served) -> None:
    origin = {"Origin": "http://localhost:3000"}
    pre = httpx.options(
        f"{server.v1}/chat/completions",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = httpx.post(
        f"{server.v1}/chat/completions",
        headers=origin,
        json={"messages": HELLO, "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = httpx.post(
        f"{server.v1}/chat/completions",
        headers={"Origin": "https://evil.example"},
        json={"messages": HELLO, "max_tokens": 2},
    )
    assert other.status_code == 403


def test_a_wrong_method_says_which_are_allowed(server: Served) -> None:
    r = httpx.get(f"{server.v1}/chat/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"]


class Item(pydantic.BaseModel):
    sku: str = pydantic.Field(max_length=8)
    qty: int


class Order(pydantic.BaseModel):
    items: list[Item] = pydantic.Field(max_length=2)


class Tree(pydantic.BaseModel):
    label: str = pydantic.Field(max_length=6)
    children: list[Tree] = pydantic.Field(default=[], max_length=1)


@pytest.mark.parametrize("model", [Order, Tree])
def test_a_pydantic_model_with_sub_models_is_a_tool(
    client: openai.OpenAI, model: type[pydantic.BaseModel]
) -> None:
    """`openai.pydantic_function_tool` writes nested models as `$defs` with `$ref`s from the
    parameters' root (and a recursive one as a `$ref` to itself): the call's arguments hold to
    the whole schema."""
    tool = openai.pydantic_function_tool(model)
    name = tool["function"]["name"]
    r = client.chat.completions.create(
        model="x",
        messages=HELLO,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": name}},
        max_tokens=400,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    jsonschema.validate(arguments, tool["function"]["parameters"])
    model.model_validate(arguments)


# --- the Responses API ---------------------------------------------------------------------------


def test_responses_create_plain_and_token_exact(client: openai.OpenAI) -> None:
    r = client.responses.create(model="starling", input="Hello", max_output_tokens=6)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.usage is not None and r.usage.input_tokens == len(CARD_SINGLE)
    assert r.usage.output_tokens == 6 and r.output_text
    chat = client.chat.completions.create(model="x", messages=HELLO, max_tokens=6, temperature=0)
    same = client.responses.create(
        model="x", input=[{"role": "user", "content": "Hello"}], max_output_tokens=6, temperature=0
    )
    assert same.output_text == chat.choices[0].message.content
    told = client.responses.create(
        model="x", input="Hello", instructions="Be brief.", max_output_tokens=2
    )
    assert told.usage is not None and told.usage.input_tokens > len(CARD_SINGLE)


def test_responses_stream_the_documented_events(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model="x", input="Hello", max_output_tokens=6, temperature=0, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    whole = client.responses.create(model="x", input="Hello", max_output_tokens=6, temperature=0)
    assert deltas == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with client.responses.stream(model="x", input="Hello", max_output_tokens=4) as stream:
        final = stream.get_final_response()
    assert final.usage is not None and final.usage.output_tokens == 4


class Flag(pydantic.BaseModel):
    ok: bool


def test_responses_parse_and_function_calls_round_trip(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(model="x", input="ok?", text_format=Flag, max_output_tokens=64)
    assert isinstance(parsed.output_parsed, Flag)
    tool = {
        "type": "function",
        "name": "weather",
        "description": "the weather",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
    r = client.responses.create(
        model="x",
        input="Weather in Paris?",
        tools=[tool],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "weather"},
        max_output_tokens=64,
    )
    call = r.output[0]
    assert call.type == "function_call" and call.name == "weather"
    assert set(json.loads(call.arguments)) == {"city"}
    follow = client.responses.create(
        model="x",
        max_output_tokens=4,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": "weather",
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )  # type: ignore[list-item]
    assert follow.output[0].type == "message" and follow.usage is not None
    assert follow.usage.input_tokens > 30
    for bad in (
        {"previous_response_id": "resp_1"},
        {"store": True},
        {"tools": [{"type": "web_search"}]},
    ):
        with pytest.raises(openai.BadRequestError):
            client.responses.create(model="x", input="Hi", **bad)  # type: ignore[arg-type]


def test_the_agents_sdk_runs_on_the_responses_api(eager_gguf: Path, tmp_path: Path) -> None:
    """The openai Agents SDK (its Responses model): a plain turn, and a tool it is made to
    call, run, and stop on. The eager model ends its turns (the Agents SDK takes a reply cut
    at max_tokens as a failure)."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)

    @agents.function_tool
    def weather(city: Annotated[str, pydantic.Field(max_length=8)]) -> str:
        """The weather in a city."""
        return "sunny"

    with serve(eager_gguf, tmp_path) as s:
        client = AsyncOpenAI(base_url=s.v1, api_key="unused", max_retries=0)
        model = agents.OpenAIResponsesModel(model="starling", openai_client=client)
        plain = agents.Agent(name="plain", instructions="Be brief.", model=model)
        assert isinstance(agents.Runner.run_sync(plain, "Hello").final_output, str)
        caller = agents.Agent(
            name="caller",
            model=model,
            tools=[weather],
            model_settings=agents.ModelSettings(
                tool_choice="weather", max_tokens=256, temperature=0
            ),
            tool_use_behavior="stop_on_first_tool",
        )
        assert agents.Runner.run_sync(caller, "Weather in Paris?").final_output == "sunny"
