"""Conversations as files: JSON export and import, and Markdown for reading."""

from __future__ import annotations

from typing import Any

from starling_local.errors import UsageError
from starling_local.store.models import Conversation, StoredMessage

EXPORT_FORMAT = "starling-local/conversation@1"


def to_json(conv: Conversation) -> dict[str, Any]:
    """A conversation as the export object (`starling history export --format json`)."""
    return {
        "format": EXPORT_FORMAT,
        "id": conv.id,
        "title": conv.title,
        "mode": conv.mode,
        "system": conv.system,
        "model": conv.model,
        "params": conv.params,
        "created": conv.created,
        "updated": conv.updated,
        "messages": [
            {
                "role": m.role,
                "content": m.content,
                "created": m.created,
                "incomplete": m.incomplete,
                "stop_reason": m.stop_reason,
            }
            for m in conv.messages
        ],
    }


def to_markdown(conv: Conversation) -> str:
    """A conversation for people to read."""
    lines = [f"# {conv.title or 'Untitled'}", ""]
    lines += [f"*{conv.mode} mode · {conv.model or 'no model'} · {conv.created[:19]}*", ""]
    if conv.system:
        lines += ["**System:** " + conv.system, ""]
    for m in conv.messages:
        who = "You" if m.role == "user" else "Starling"
        note = " *(incomplete)*" if m.incomplete else ""
        lines += [f"## {who}{note}", "", m.content, ""]
    return "\n".join(lines)


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UsageError(f"{key!r} must be a string")
    return value


def from_json(data: Any) -> Conversation:
    """An export object as a conversation to insert (checked field by field, one-line errors)."""
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise UsageError("not a starling-local conversation export (needs 'messages')")
    messages = []
    for i, m in enumerate(data["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise UsageError(f"message {i}: role must be user or assistant")
        if not isinstance(m.get("content"), str):
            raise UsageError(f"message {i}: content must be a string")
        stop = m.get("stop_reason")
        messages.append(
            StoredMessage(
                id=0,
                conversation_id=0,
                role=m["role"],
                content=m["content"],
                created=str(m.get("created") or ""),
                incomplete=bool(m.get("incomplete")),
                stop_reason=str(stop) if stop is not None else None,
            )
        )
    mode = data.get("mode", "chat")
    if mode not in ("chat", "code"):
        raise UsageError(f"mode must be chat or code, not {mode!r}")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise UsageError("'params' must be an object")
    return Conversation(
        id=0,
        title=_text(data, "title"),
        mode=mode,
        system=_text(data, "system"),
        model=_text(data, "model"),
        params=params,
        created=_text(data, "created"),
        updated="",
        messages=messages,
    )
