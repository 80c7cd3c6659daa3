"""Conversations from elsewhere: a starling-local export, a ChatGPT data export
(`conversations.json`), or a plain OpenAI-style list of `{"role", "content"}` messages.

Everything is checked before anything is stored: a file that cannot be read as a whole is
refused with one line, and nothing of it is imported.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from starling_local.chat.transcripts import from_json
from starling_local.errors import UsageError
from starling_local.store.models import Conversation, StoredMessage

FORMATS = "a starling-local export, a ChatGPT conversations.json, or a list of messages"


def parse_import(data: Any) -> list[Conversation]:
    """The conversations in an imported JSON document (at least one), ready to insert."""
    if isinstance(data, dict) and "mapping" in data:
        return [from_chatgpt(data, 0)]
    if isinstance(data, dict) and "messages" in data:
        return [from_json(data)]
    if isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
        if all("mapping" in d for d in data):
            return [from_chatgpt(d, i) for i, d in enumerate(data)]
        if all("role" in d for d in data):
            return [from_messages(data)]
    raise UsageError(f"not a conversation file this version can import ({FORMATS})")


def _stamp(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="microseconds")
    return ""


def _text(content: Any) -> str | None:
    """The text of a ChatGPT message's content (None for images, code runs, tool output...)."""
    if not isinstance(content, dict) or content.get("content_type") != "text":
        return None
    parts = content.get("parts")
    if not isinstance(parts, list):
        return None
    return "".join(p for p in parts if isinstance(p, str))


def from_chatgpt(data: dict[str, Any], index: int) -> Conversation:
    """One conversation of a ChatGPT export: the branch the user last saw, found by following
    `current_node` back to the root (other branches of the tree are not the main line)."""
    where = f"conversation {index}"
    mapping = data.get("mapping")
    current = data.get("current_node")
    if not isinstance(mapping, dict) or not isinstance(current, str) or current not in mapping:
        raise UsageError(f"{where}: a ChatGPT conversation needs 'mapping' and 'current_node'")
    chain = []
    seen = set()
    node_id: Any = current
    while node_id is not None:
        if node_id in seen or node_id not in mapping or not isinstance(mapping[node_id], dict):
            raise UsageError(f"{where}: broken message tree at {node_id!r}")
        seen.add(node_id)
        chain.append(mapping[node_id])
        node_id = mapping[node_id].get("parent")
    messages = []
    system = ""
    for node in reversed(chain):
        message = node.get("message")
        if not isinstance(message, dict):
            continue
        role = (message.get("author") or {}).get("role")
        text = _text(message.get("content"))
        hidden = (message.get("metadata") or {}).get("is_visually_hidden_from_conversation")
        if text is None or not text.strip() or hidden:
            continue
        if role == "system":
            system = text.strip()
        elif role in ("user", "assistant"):
            messages.append(StoredMessage(0, 0, role, text, _stamp(message.get("create_time"))))
    if not messages:
        raise UsageError(f"{where}: no text messages on its current branch")
    title = data.get("title")
    return Conversation(
        id=0,
        title=title if isinstance(title, str) else "",
        mode="chat",
        system=system,
        model=str(data.get("default_model_slug") or "chatgpt"),
        params={},
        created=_stamp(data.get("create_time")),
        updated=_stamp(data.get("update_time")),
        messages=messages,
    )


def from_messages(data: list[dict[str, Any]]) -> Conversation:
    """A plain OpenAI-style message list as one conversation (system messages: its system
    prompt)."""
    messages = []
    system = []
    for i, m in enumerate(data):
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, str):
            raise UsageError(f"message {i}: 'content' must be a string")
        if role == "system":
            system.append(content.strip())
        elif role in ("user", "assistant"):
            messages.append(StoredMessage(0, 0, role, content, ""))
        else:
            raise UsageError(f"message {i}: role must be system, user or assistant, not {role!r}")
    if not messages:
        raise UsageError("the list has no user or assistant messages")
    return Conversation(
        id=0,
        title="",
        mode="chat",
        system="\n\n".join(s for s in system if s),
        model="",
        params={},
        created="",
        updated="",
        messages=messages,
    )
