"""The conversation service: the one workflow behind `ask`, the app and the server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from starling_local.chat.service import ConversationService, ReplyHooks, ReplyStart
from starling_local.chat.settings import ConversationSettings, settings_of
from starling_local.chat.template import Mode
from starling_local.engine.runtime import Engine
from starling_local.errors import UsageError
from starling_local.store.conversations import ConversationStore

GREEDY = ConversationSettings().with_sampling(temperature=0.0, max_tokens=8)


@pytest.fixture
def service(tiny_q4: Path, tmp_path: Path) -> ConversationService:
    svc = ConversationService(
        ConversationStore(tmp_path / "s.db"), Engine(tiny_q4, n_ctx=2048), kv_root=tmp_path / "kv"
    )
    yield svc  # type: ignore[misc]
    svc.close()


def test_send_commits_first_and_reply_records_with_state_saved(
    service: ConversationService, tmp_path: Path
) -> None:
    conv = service.send(None, "Hello llamas", GREEDY)
    assert [m.role for m in service.get(conv.id).messages] == ["user"]  # before any reply
    starts: list[ReplyStart] = []
    texts: list[str] = []
    outcome = service.reply(conv.id, hooks=ReplyHooks(starts.append, lambda t, s: texts.append(t)))
    saved = service.get(conv.id).messages[-1]
    assert (saved.role, saved.content, saved.incomplete) == ("assistant", outcome.text, False)
    assert saved.tokens == tuple(outcome.token_ids) and "".join(texts) == outcome.text
    assert starts[0].message_id == saved.id and starts[0].prompt_tokens == 19
    # The KV state file is on disk when reply() returns.
    assert (tmp_path / "kv" / service.engine.model_key / f"conversation-{conv.id}.kv").exists()  # type: ignore[union-attr]
    assert settings_of(service.get(conv.id)) == GREEDY


def test_two_conversations_alternating_each_restore_their_own_cache(
    service: ConversationService,
) -> None:
    """Replies to A and B from two threads at once, three rounds: the service runs them one at a
    time, and each conversation's state file holds its own tokens (only the new turn is
    evaluated), whatever ran in between."""
    story = "Tell me a long story about " + "llamas and alpacas " * 30
    convs = {name: service.send(None, f"{name}: {story}", GREEDY).id for name in "AB"}
    evaluated: dict[str, list[tuple[int, int]]] = {"A": [], "B": []}
    errors: list[BaseException] = []

    def turn(name: str, text: str) -> None:
        try:
            cid = convs[name]
            if text:
                service.send(cid, text)
            out = service.reply(cid)
            evaluated[name].append((out.stats.prompt_evaluated, out.stats.prompt_tokens))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    for round_no in range(3):
        text = "" if round_no == 0 else f"And then, part {round_no}?"
        threads = [threading.Thread(target=turn, args=(n, text)) for n in "AB"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert errors == []
    for name in "AB":
        first, *later = evaluated[name]
        assert first[0] > 200  # a new conversation: all of it (but a shared template prefix)
        for done, total in later:
            assert total > 250 and done < 30, evaluated  # only "And then, part N?" and template
    # The RAM cache did the above; the state files must hold each conversation's own tokens:
    # with the RAM cache and the live KV cache gone, each next turn still evaluates only itself.
    engine = service.engine
    assert isinstance(engine, Engine)
    service.runner._sequences.clear()
    for name in "AB":
        engine.clear_cache()
        service.send(convs[name], "And finally?")
        out = service.reply(convs[name])
        assert out.stats.prompt_evaluated < 30, (name, out.stats)


def test_regenerate_edit_delete(service: ConversationService, tmp_path: Path) -> None:
    conv = service.send(None, "First", GREEDY)
    first = service.reply(conv.id)
    again = service.regenerate(conv.id)
    assert [m.role for m in again.messages] == ["user"]
    second = service.reply(conv.id)
    assert second.message_id != first.message_id and second.text == first.text  # greedy
    edited = service.edit_last(conv.id, "Second")
    assert [(m.role, m.content) for m in edited.messages] == [("user", "Second")]
    with pytest.raises(UsageError):
        service.edit_last(conv.id, "   ")
    service.reply(conv.id)
    kv = list((tmp_path / "kv").glob(f"*/conversation-{conv.id}.kv"))
    assert kv
    service.delete(conv.id)
    assert not any(p.exists() for p in kv)
    with pytest.raises(UsageError):
        service.get(conv.id)


def test_settings_are_read_and_written_in_one_place(service: ConversationService) -> None:
    settings = ConversationSettings(Mode.CODE, "Be terse").with_sampling(seed=7, ignore_eos=True)
    conv = service.send(None, "Sort a list", settings)
    assert conv.params["seed"] == 7 and "ignore_eos" not in conv.params
    back = service.settings(conv.id)
    assert (back.mode, back.system, back.sampling.seed, back.sampling.ignore_eos) == (
        Mode.CODE,
        "Be terse",
        7,
        False,
    )
    preview = service.preview(conv.id, back)
    assert (
        preview.text
        == "<s>Be terse<|end_of_turn|>Code User: Sort a list<|end_of_turn|>Code Assistant:"
    )
    assert service.context_usage(conv.id, back) == (preview.tokens, 2048)


def test_stop_keeps_the_partial_reply_marked_stopped(service: ConversationService) -> None:
    conv = service.send(None, "Go on and on", GREEDY.with_sampling(max_tokens=1500))

    def stop_after_some(text: str, stats: object) -> None:
        if len(text) and service.replying:
            service.stop()

    out = service.reply(conv.id, hooks=ReplyHooks(on_text=stop_after_some))
    saved = service.get(conv.id).messages[-1]
    assert out.stats.stop_reason == "cancelled" and saved.incomplete
    assert saved.stop_reason == "cancelled" and saved.content == out.text != ""


def test_close_during_a_reply_waits_for_it_to_be_saved(tiny_q4: Path, tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "c.db")
    service = ConversationService(store, Engine(tiny_q4, n_ctx=4096), owns_store=False)
    conv = service.send(None, "Go on and on", GREEDY.with_sampling(max_tokens=4000))
    streaming = threading.Event()
    worker = threading.Thread(
        target=service.reply,
        args=(conv.id,),
        kwargs={"hooks": ReplyHooks(on_text=lambda t, s: streaming.set())},
    )
    worker.start()
    assert streaming.wait(30)
    service.close()
    worker.join(10)
    reply = store.get(conv.id).messages[-1]
    assert reply.incomplete and reply.stop_reason == "cancelled" and reply.content
    assert service.engine is not None and service.engine.closed


def test_replies_are_served_in_the_order_they_came(service: ConversationService) -> None:
    """Replies asked for while one runs start in the order they were asked for, also when the
    thread that just finished asks again at once (a plain lock goes to whoever grabs it first:
    the thread that released it, as a rule)."""
    from starling_local.chat.template import Message

    started: list[str] = []
    first_streams = threading.Event()
    busy = GREEDY.with_sampling(max_tokens=300, ignore_eos=True)
    short = GREEDY.with_sampling(max_tokens=2)

    def ask(name: str, settings: ConversationSettings) -> None:
        hooks = ReplyHooks(
            on_start=lambda start: started.append(name),
            on_text=lambda text, stream: first_streams.set(),
        )
        service.answer([Message("user", f"Question {name}")], settings, hooks=hooks)

    def twice() -> None:
        ask("first", busy)
        ask("again", short)  # at once: before any waiter has woken

    runner = threading.Thread(target=twice)
    runner.start()
    assert first_streams.wait(30)
    threads = []
    for i in range(4):
        t = threading.Thread(target=ask, args=(f"q{i}", short))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 30
        while service.runner.waiting < i + 1 and time.monotonic() < deadline:
            threading.Event().wait(0.005)  # queued before the next one arrives
    for t in [runner, *threads]:
        t.join(60)
    assert started == ["first", "q0", "q1", "q2", "q3", "again"]
