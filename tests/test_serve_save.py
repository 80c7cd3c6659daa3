"""`starling serve --save` and the context budget: conversations matched by the client's id or
their whole history, concurrent requests on one history, no implicit trimming, request budgets
never saved, and token ids that match the text."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from starling_local.store.conversations import ConversationStore
from tests.server_helpers import Served, serve


@pytest.fixture(scope="module")
def saving(tiny_q4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tiny_q4, tmp_path_factory.mktemp("save"), "--ctx", "2048", "--save", "--quiet") as s:
        yield s


def chat(served: Served, messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, **extra}
    r = httpx.post(f"{served.v1}/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def store_of(served: Served) -> ConversationStore:
    return ConversationStore(served.home / "data" / "starling.db")


def test_concurrent_requests_on_one_history_each_get_a_well_formed_conversation(
    saving: Served,
) -> None:
    first = [{"role": "user", "content": "Shared start"}]
    reply = chat(saving, first)["choices"][0]["message"]["content"]
    history = [*first, {"role": "assistant", "content": reply}]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = list(
            pool.map(
                lambda text: chat(saving, [*history, {"role": "user", "content": text}]),
                ["Branch A", "Branch B"],
            )
        )
    assert all(d["choices"][0]["message"]["content"] for d in done)
    store = store_of(saving)
    try:
        shaped = [
            [m.role for m in store.get(c.id).messages]
            for c in store.conversations()
            if store.get(c.id).messages[0].content == "Shared start"
        ]
    finally:
        store.close()
    # One continued the saved conversation, the other found it taken and started its own.
    assert sorted(shaped, key=len) == [
        ["user", "assistant", "user", "assistant"],
        ["user", "assistant", "user", "assistant"],
    ]


def test_clients_with_their_own_ids_are_never_merged(saving: Served) -> None:
    messages = [{"role": "user", "content": "Same words from two clients"}]
    a = chat(saving, messages, user="alice")
    b = chat(saving, messages, user="bob")
    ra, rb = a["choices"][0]["message"]["content"], b["choices"][0]["message"]["content"]
    for who, reply, text in (("alice", ra, "A2"), ("bob", rb, "B2")):
        turn = [{"role": "assistant", "content": reply}, {"role": "user", "content": text}]
        chat(saving, [*messages, *turn], user=who)
    store = store_of(saving)
    try:
        found = {}
        for c in store.conversations():
            conv = store.get(c.id)
            if conv.messages[0].content == messages[0]["content"]:
                found[conv.params.get("client_id")] = [m.content for m in conv.messages]
    finally:
        store.close()
    assert set(found) == {"alice", "bob"}
    assert found["alice"][2] == "A2" and found["bob"][2] == "B2"


def test_no_max_tokens_keeps_every_message_that_fits(saving: Served) -> None:
    long = "llama " * 120  # ~240 tokens a message: 6 of them are over half the window
    messages: list[dict[str, str]] = []
    for i in range(3):
        messages += [{"role": "user", "content": f"{i} {long}"},
                     {"role": "assistant", "content": f"{i} {long}"}]  # fmt: skip
    messages.append({"role": "user", "content": "And now?"})
    r = httpx.post(
        f"{saving.v1}/chat/completions",
        json={"messages": messages, "temperature": 0, "stop": ["e"]},
        timeout=120,
    ).json()
    assert r["usage"]["prompt_tokens"] > 1024  # more than half of the 2048 window stayed
    assert r["starling"]["dropped_messages"] == 0
    # Past the window, the response says how many of the oldest messages were left out.
    over = [*messages[:-1]] * 2 + [messages[-1]]
    cut = httpx.post(
        f"{saving.v1}/chat/completions",
        json={"messages": over, "temperature": 0, "max_tokens": 4},
        timeout=120,
    ).json()
    assert cut["starling"]["dropped_messages"] > 0
    # The request's budget is not the conversation's: it keeps the default.
    store = store_of(saving)
    try:
        for c in store.conversations():
            assert store.get(c.id).params.get("max_tokens") in (None, 1024)
    finally:
        store.close()


def test_token_ids_match_the_text_when_a_stop_string_cuts_it(saving: Served) -> None:
    prompt = httpx.post(
        f"{saving.url}/tokenize", json={"messages": [{"role": "user", "content": "Hello"}]}
    ).json()["tokens"]
    whole = httpx.post(
        f"{saving.v1}/completions",
        json={"prompt": prompt, "max_tokens": 16, "temperature": 0, "return_token_ids": True},
    ).json()["choices"][0]
    text = whole["text"]
    cut_at = text[len(text) // 2 :].strip()[:3]  # a stop string from the reply's second half
    stopped = httpx.post(
        f"{saving.v1}/completions",
        json={
            "prompt": prompt,
            "max_tokens": 16,
            "temperature": 0,
            "return_token_ids": True,
            "stop": [cut_at],
        },
    ).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and cut_at not in stopped["text"]
    ids = stopped["token_ids"]
    assert ids == whole["token_ids"][: len(ids)]
    shown = httpx.post(f"{saving.url}/detokenize", json={"tokens": ids}).json()["content"]
    assert stopped["text"].startswith(shown.lstrip()) and len(ids) < len(whole["token_ids"])
