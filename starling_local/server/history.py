"""OpenAI's "send the whole history every turn", and conversations saved from it.

A chat request carries every message so far. With `starling serve --save`, each request that
continues a saved conversation (its messages are exactly that conversation's, then one more)
is added to it, and any other starts one; the conversation's messages are keyed by a hash of
their roles and texts, so finding it reads no messages.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from starling_local.chat.service import ConversationService, ReplyHooks, ReplyOutcome
from starling_local.chat.settings import (
    PER_REQUEST,
    ConversationSettings,
    settings_of,
    stored_params,
)
from starling_local.chat.template import Message
from starling_local.engine.types import SamplingParams

#: What a conversation saved from requests keeps besides its settings.
KEPT = ("client_id", "history_key")


def respond(
    service: ConversationService,
    messages: Sequence[Message],
    settings: ConversationSettings,
    *,
    hooks: ReplyHooks | None = None,
    cancel: threading.Event | None = None,
    stop: Sequence[str] = (),
    save: bool = False,
    client_id: str | None = None,
) -> ReplyOutcome:
    """The reply to a chat request's messages. With `save` it is kept: it continues the saved
    conversation whose messages are exactly the ones before the last (of the client
    `client_id`, when given), or starts one. Messages that end with a reply continue that
    reply. Finding, writing and replying happen in one turn, so two requests on one history
    each get a well-formed conversation; a request refused before its reply starts (it does
    not fit the context...) saves nothing. The request's budget and per-request fields are
    never saved with the conversation."""
    if not save:
        return service.answer(messages, settings, hooks=hooks, cancel=cancel, stop=stop)
    continuing = messages[-1].role == "assistant"
    history = list(messages if continuing else messages[:-1])
    once = _request_only(settings) | {"max_tokens": settings.sampling.max_tokens}
    with service.turn(cancel) as turn:
        service.runner.fit(messages, settings)  # refused: nothing is written
        cid = _find(service, history, client_id)
        kept = settings.with_sampling(max_tokens=SamplingParams().max_tokens)
        if cid is None:
            extra = {"client_id": client_id} if client_id is not None else {}
            cid = service.store.insert(service.new_conversation(history, kept, extra)).id
        else:
            saved = settings_of(service.store.get(cid, messages=False)).sampling.max_tokens
            kept = settings.with_sampling(max_tokens=saved)
        if not continuing:
            _add_user(service, cid, messages[-1].content, kept)
        outcome = service.reply(cid, hooks=hooks, overrides=once, stop=stop, turn=turn)
        _remember_history(service, cid)
        return outcome


def history_key(messages: Sequence[tuple[str, str]]) -> str:
    """Identifies a message list by its roles and texts (whitespace at the ends aside)."""
    data = json.dumps([(role, text.strip()) for role, text in messages], ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()


def _find(
    service: ConversationService, history: Sequence[Message], client_id: str | None
) -> int | None:
    """The conversation (of `client_id`, if given) whose messages are exactly `history`."""
    if not history:
        return None
    key = history_key([(m.role, m.content) for m in history])
    for conv in service.store.conversations():
        if client_id is not None and conv.params.get("client_id") != client_id:
            continue
        if conv.params.get("history_key") == key:
            return conv.id
    return None


def _remember_history(service: ConversationService, conversation_id: int) -> None:
    conv = service.store.get(conversation_id)
    key = history_key([(m.role, m.content) for m in conv.messages])
    service.store.update(conversation_id, params={**conv.params, "history_key": key})


def _add_user(
    service: ConversationService, conversation_id: int, text: str, settings: ConversationSettings
) -> None:
    store = service.store
    conv = store.get(conversation_id, messages=False)
    keep: dict[str, Any] = {k: conv.params[k] for k in KEPT if k in conv.params}
    store.update(
        conversation_id,
        mode=settings.mode.value,
        system=settings.system,
        model=service.model_name or None,
        params={**stored_params(settings), **keep},
    )
    store.add_message(conversation_id, "user", text)


def _request_only(settings: ConversationSettings) -> dict[str, Any]:
    """The sampling fields of one request that a saved conversation does not keep (a grammar,
    logprobs): they apply to this reply only."""
    sampling = settings.sampling
    defaults = SamplingParams()
    return {
        f.name: getattr(sampling, f.name)
        for f in fields(SamplingParams)
        if f.name in PER_REQUEST and getattr(sampling, f.name) != getattr(defaults, f.name)
    }
