"""The fast tier: the conversation service's logic on the scripted engine, and the small parts
(stop strings, the RAM caches, the request validators) on their own. No model is built."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from starling_local.chat.sequences import RecentReplies, SequenceCache
from starling_local.chat.service import ConversationService, ReplyHooks
from starling_local.chat.settings import ConversationSettings
from starling_local.chat.stops import StopMatcher
from starling_local.chat.template import Message
from starling_local.config import Environment, Preferences
from starling_local.engine.types import KVSnapshot, SamplingParams
from starling_local.errors import UsageError
from starling_local.server.protocol import APIError, parse_chat
from starling_local.store.conversations import ConversationStore
from tests.cards import CARD_SINGLE
from tests.scripted import Script, ScriptedEngine

GREEDY = ConversationSettings(sampling=SamplingParams(temperature=0.0, max_tokens=64))


@pytest.fixture
def service(scripted: ScriptedEngine, tmp_path: Path) -> Iterator[ConversationService]:
    store = ConversationStore(tmp_path / "history.db")
    service = ConversationService(store, scripted, kv_root=tmp_path / "kv")
    yield service
    service.close()


# --- the service on the scripted engine ----------------------------------------------------


def test_a_reply_is_rendered_by_the_card_and_saved_with_its_ids(
    service: ConversationService, scripted: ScriptedEngine
) -> None:
    scripted.then(" Hi there!")
    conv = service.send(None, "Hello", GREEDY)
    outcome = service.reply(conv.id)
    assert scripted.prompts == [CARD_SINGLE]
    assert outcome.text == "Hi there!"  # the leading space the template leaves is not shown
    user, reply = service.get(conv.id).messages
    assert (user.content, reply.content, reply.incomplete) == ("Hello", "Hi there!", False)
    assert reply.tokens == tuple(outcome.token_ids) and reply.stop_reason == "end_of_turn"


def test_the_next_turn_evaluates_only_itself(
    service: ConversationService, scripted: ScriptedEngine
) -> None:
    scripted.then(" One.", " Two.")
    conv = service.send(None, "Hello", GREEDY)
    service.reply(conv.id)
    service.send(conv.id, "And then?")
    second = service.reply(conv.id)
    first_prompt, second_prompt = scripted.prompts
    assert second_prompt[: len(first_prompt)] == first_prompt  # the history, token for token
    assert second.stats.prompt_evaluated < 20 < second.stats.prompt_tokens


def test_a_failure_mid_reply_keeps_the_text_so_far_marked_as_an_error(
    service: ConversationService, scripted: ScriptedEngine
) -> None:
    scripted.then(Script(" one two three four five six", fail_after=3))
    conv = service.send(None, "Count", GREEDY)
    outcome = service.reply(conv.id)
    assert outcome.error == "the scripted engine failed mid-reply"
    reply = service.get(conv.id).messages[-1]
    assert reply.incomplete and reply.stop_reason == "error"
    assert reply.content == outcome.text and outcome.text.startswith("one")


def test_a_stop_string_ends_the_reply_and_is_not_kept(
    service: ConversationService, scripted: ScriptedEngine
) -> None:
    scripted.then(" The answer is 42. STOP and more")
    conv = service.send(None, "Answer", GREEDY)
    outcome = service.reply(conv.id, stop=["STOP"])
    assert outcome.text == "The answer is 42. " and outcome.stats.stop_reason == "stop"
    assert service.get(conv.id).messages[-1].content == outcome.text  # as shown


def test_replies_are_served_in_the_order_they_came(
    service: ConversationService, scripted: ScriptedEngine
) -> None:
    """Replies asked for while one runs start in the order they were asked for, also when the
    thread that just finished asks again at once: a plain lock goes to whoever grabs it
    first, as a rule the thread that released it."""
    gate = threading.Event()
    first = Script(" first", gate=gate)
    scripted.then(first)
    started: list[str] = []

    def ask(name: str) -> None:
        hooks = ReplyHooks(on_start=lambda start: started.append(name))
        service.answer([Message("user", name)], GREEDY, hooks=hooks)

    def twice() -> None:
        ask("first")
        ask("again")  # at once, before any waiter has woken

    runner = threading.Thread(target=twice)
    runner.start()
    assert first.started.wait(10)
    waiters = []
    for i in range(4):
        t = threading.Thread(target=ask, args=(f"q{i}",))
        t.start()
        waiters.append(t)
        for _ in range(1000):  # queued before the next one arrives
            if service.runner.waiting == i + 1:
                break
            threading.Event().wait(0.005)
        assert service.runner.waiting == i + 1
    gate.set()
    for t in [runner, *waiters]:
        t.join(30)
    assert started == ["first", "q0", "q1", "q2", "q3", "again"]


def test_stop_also_stops_a_reply_waiting_for_its_turn(
    service: ConversationService, scripted: ScriptedEngine
) -> None:
    gate = threading.Event()
    running = Script(" a b c", gate=gate)
    scripted.then(running, " d e f")
    results: dict[str, str] = {}

    def ask(name: str) -> None:
        results[name] = service.answer([Message("user", name)], GREEDY).stats.stop_reason

    a = threading.Thread(target=ask, args=("a",))
    a.start()
    assert running.started.wait(10)
    b = threading.Thread(target=ask, args=("b",))
    b.start()
    while service.runner.waiting == 0:
        threading.Event().wait(0.005)
    service.stop()
    gate.set()
    a.join(10)
    b.join(10)
    assert results == {"a": "cancelled", "b": "cancelled"}


def test_a_closed_service_refuses_replies_and_closes_its_engine(
    service: ConversationService, scripted: ScriptedEngine
) -> None:
    service.close()
    assert scripted.closed
    with pytest.raises(Exception, match="closed"):
        service.answer([Message("user", "Hi")], GREEDY)


# --- stop strings ------------------------------------------------------------------------


def test_a_stop_string_split_across_chunks_is_never_shown() -> None:
    matcher = StopMatcher(["</answer>"])
    shown = [matcher.feed(c) for c in ["Yes", " it is</ans", "wer> and more"]]
    assert "".join(shown) == "Yes it is" and matcher.stopped
    assert matcher.feed("later") == "" and matcher.text == "Yes it is"


def test_a_held_prefix_that_is_not_a_stop_comes_out() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("ST") == ""  # could be the start of STOP
    assert matcher.feed("ILL here") == "STILL here"
    assert matcher.feed("ST") == "" and matcher.flush() == "ST" and not matcher.stopped


def test_the_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(["a", "bbb"])
    assert matcher.feed("xx bbb a") == "xx " and matcher.stopped


# --- the RAM caches ----------------------------------------------------------------------


def _snapshot(tokens: range | list[int], size: int = 100) -> KVSnapshot:
    return KVSnapshot(tuple(tokens), bytearray(size))


def test_the_sequence_cache_drops_the_least_recently_used_past_its_cap() -> None:
    cache = SequenceCache(cap=250)
    for start in (1000, 2000, 3000):
        cache.add(_snapshot(range(start, start + 50)))
    assert len(cache) == 2  # 300 bytes: the oldest went
    assert [e.tokens[0] for e in cache._entries] == [2000, 3000]


def test_a_sequence_continued_by_a_newer_one_is_dropped() -> None:
    cache = SequenceCache(cap=10_000)
    cache.add(_snapshot(range(50)))
    cache.add(_snapshot(range(80)))  # continues the first: the first is redundant
    assert [len(e.tokens) for e in cache._entries] == [80]


def test_prepare_restores_the_kept_sequence_a_prompt_continues(scripted: ScriptedEngine) -> None:
    cache = SequenceCache(cap=10_000)
    conversation_a = list(range(100, 200))
    conversation_b = list(range(500, 600))
    scripted.restore(_snapshot(conversation_a))
    # B's prompt would overwrite A's cache: A is kept in RAM first.
    assert cache.prepare(scripted, [*conversation_b, 1]) == 0
    assert len(cache) == 1
    scripted.restore(_snapshot(conversation_b))
    assert cache.prepare(scripted, [*conversation_a, 7, 8]) == len(conversation_a)
    assert scripted.cached_prefix(conversation_a) == len(conversation_a)


def test_recent_replies_give_back_their_ids_by_text() -> None:
    recent = RecentReplies(size=2)
    recent.remember(" Hello there ", [1, 2, 3])
    recent.remember("second", [4])
    recent.remember("third", [5])  # past the size: "Hello there" is forgotten
    messages = [Message("assistant", "third"), Message("user", "third"), Message("assistant", "x")]
    exact = recent.exact(messages)
    assert exact[0].tokens == (5,) and exact[1].tokens is None and exact[2].tokens is None
    assert recent.exact([Message("assistant", "Hello there")])[0].tokens is None


# --- request validators ------------------------------------------------------------------


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"messages": "hi"}, "messages", "messages"),
        ({"messages": HI, "n": 2}, "n", "n=1"),
        ({"messages": HI, "temperature": "hot"}, "temperature", "number"),
        ({"messages": HI, "temperature": 9}, "temperature", "between"),
        ({"messages": HI, "max_tokens": 1.5}, "max_tokens", "integer"),
        ({"messages": HI, "stop": [1]}, "stop", "strings"),
        ({"messages": HI, "tools": {}}, "tools", "list"),
        ({"messages": HI, "tool_choice": "required"}, "tool_choice", "no tools"),
        ({"messages": HI, "logit_bias": {"x": 1}}, "logit_bias", "token id"),
        ({"messages": HI, "logit_bias": {"5": 500}}, "logit_bias", "-100 to 100"),
        ({"messages": [{"role": "user", "content": 5}]}, None, "content"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(
    body: dict[str, object], param: str | None, message: str
) -> None:
    with pytest.raises(APIError) as caught:
        parse_chat(body, ConversationSettings())
    assert caught.value.status == 400 and message in caught.value.message
    if param is not None:
        assert caught.value.param == param


def test_a_good_request_becomes_settings_and_turns() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        ],
        "temperature": 0,
        "max_tokens": 12,
        "stop": "END",
    }
    req = parse_chat(body, ConversationSettings())
    assert req.messages == [Message("user", "Hello")]
    settings = req.generation.settings
    assert settings.system == "Be brief." and settings.sampling.temperature == 0
    assert req.generation.max_tokens == 12 and req.generation.stop == ["END"]


def test_the_state_file_is_read_only_when_the_live_cache_falls_short(
    service: ConversationService, scripted: ScriptedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn the live KV cache covers reads no state file; the same turn after the live cache
    is gone (another conversation, a restart) loads it."""
    reads: list[Path] = []
    real = scripted.state_tokens
    monkeypatch.setattr(scripted, "state_tokens", lambda path: reads.append(path) or real(path))
    scripted.then(" One.", " Two.", " Three.")
    conv = service.send(None, "Hello", GREEDY)
    service.reply(conv.id)
    service.send(conv.id, "And then?")
    assert service.reply(conv.id).stats.prompt_evaluated < 20
    assert reads == []  # the live cache held the history
    scripted.clear_cache()
    service.runner._sequences.clear()
    service.send(conv.id, "And after?")
    assert service.reply(conv.id).stats.prompt_evaluated < 20  # from the state file
    assert len(reads) == 1


# --- settings from the environment ---------------------------------------------------------


def test_the_environment_is_read_typed_with_one_line_errors() -> None:
    env = Environment.read(
        {"STARLING_KV_CACHE_MB": "512", "STARLING_BACKUPS": "0", "STARLING_MODEL": " beta "}
    )
    assert env.kv_cache_bytes == 512 << 20 and env.backups is False and env.model == "beta"
    assert env.cpu_extra_buffers == "auto" and env.remote is None
    assert Environment.read({"STARLING_CPU_EXTRA_BUFFERS": "yes"}).cpu_extra_buffers == "on"
    with pytest.raises(UsageError, match="STARLING_KV_CACHE_MB must be a whole number of MiB"):
        Environment.read({"STARLING_KV_CACHE_MB": "lots"})
    with pytest.raises(UsageError, match="STARLING_BACKUPS must be on or off"):
        Environment.read({"STARLING_BACKUPS": "maybe"})


def test_preferences_survive_a_hand_edited_file() -> None:
    prefs = Preferences.from_json({"theme": 3, "speculate": "yes", "default_model": "beta"})
    assert prefs == Preferences(default_model="beta")
    assert Preferences.from_json(["not", "an", "object"]) == Preferences()


def test_serve_ollama_listens_where_ollama_would(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from starling_local.cli.serve import listen_address

    def address(**given: object) -> tuple[str, int]:
        args = argparse.Namespace(**{"host": None, "port": None, "ollama": False, **given})
        return listen_address(args)

    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert address() == ("127.0.0.1", 8000)
    assert address(ollama=True) == ("127.0.0.1", 11434)
    for value, expected in [
        ("127.0.0.1:11500", ("127.0.0.1", 11500)),
        ("http://localhost:9999/", ("localhost", 9999)),
        ("0.0.0.0", ("0.0.0.0", 11434)),
        ("[::1]:11434", ("::1", 11434)),
        (":12000", ("127.0.0.1", 12000)),
    ]:
        monkeypatch.setenv("OLLAMA_HOST", value)
        assert address(ollama=True) == expected, value
    assert address(ollama=True, port=1234) == ("127.0.0.1", 1234)  # --port wins
    assert address() == ("127.0.0.1", 8000)  # without --ollama, OLLAMA_HOST is not read


def test_keep_alive_durations_read_as_ollama_reads_them() -> None:
    from starling_local.server.model_slot import parse_keep_alive

    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("10s") == 10 and parse_keep_alive(0) == 0
    assert parse_keep_alive("500ms") == 0.5 and parse_keep_alive("2.5") == 2.5
    assert parse_keep_alive(-1) is None and parse_keep_alive("-1m") is None
    for bad in ("soon", "5", "5x", "", True):
        if bad == "5":
            assert parse_keep_alive(bad) == 5  # a bare number is seconds
            continue
        with pytest.raises(ValueError):
            parse_keep_alive(bad)
