"""Conversations from elsewhere: a starling-local export, a ChatGPT data export
(`conversations.json`), or a plain OpenAI-style list of `{"role", "content"}` messages.

Everything is checked before anything is stored: a file that cannot be read as a whole is
refused with one line, and nothing of it is imported.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from starling_local.chat.settings import check_params
from starling_local.chat.transcripts import from_json
from starling_local.errors import UsageError
from starling_local.store.models import Conversation, StoredMessage

FORMATS = "a starling-local export, a ChatGPT conversations.json, or a list of messages"
#: Bounds on what one import may hold.
MAX_DEPTH = 64
MAX_CONVERSATIONS = 100_000
MAX_MESSAGES = 100_000
MAX_MESSAGE_CHARS = 4 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_import(data: Any) -> list[Conversation]:
    """The conversations in an imported JSON document (at least one), ready to insert:
    structure, types, sizes and settings checked, lone surrogates made U+FFFD."""
    data = _clean(data)
    if isinstance(data, dict) and "mapping" in data:
        found = [from_chatgpt(data, 0)]
    elif isinstance(data, dict) and "messages" in data:
        found = [from_json(data)]
    elif isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
        if all("mapping" in d for d in data):
            found = [from_chatgpt(d, i) for i, d in enumerate(data)]
        elif all("role" in d for d in data):
            found = [from_messages(data)]
        else:
            found = []
    else:
        found = []
    if not found:
        raise UsageError(f"not a conversation file this version can import ({FORMATS})")
    if len(found) > MAX_CONVERSATIONS:
        raise UsageError(f"more than {MAX_CONVERSATIONS} conversations in one file")
    return [_checked(c, i) for i, c in enumerate(found)]


def _checked(conv: Conversation, index: int) -> Conversation:
    where = f"conversation {index}" if index else "the conversation"
    if len(conv.messages) > MAX_MESSAGES:
        raise UsageError(f"{where}: more than {MAX_MESSAGES} messages")
    for i, m in enumerate(conv.messages):
        if len(m.content) > MAX_MESSAGE_CHARS:
            raise UsageError(f"{where}, message {i}: longer than {MAX_MESSAGE_CHARS} characters")
    return replace(conv, params=check_params(conv.params, where))


def _clean(data: Any) -> Any:
    """`data` with lone surrogates (no UTF-8 text holds them) as U+FFFD, checked for depth,
    without recursion."""
    root = [data]
    stack: list[tuple[Any, Any, int]] = [(root, 0, 0)]
    while stack:
        parent, key, depth = stack.pop()
        value = parent[key]
        if isinstance(value, str):
            if _SURROGATE.search(value):
                parent[key] = _SURROGATE.sub("\ufffd", value)
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise UsageError(f"the file nests deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                fixed = {_SURROGATE.sub("\ufffd", k): v for k, v in value.items()}
                parent[key] = fixed
                stack.extend((fixed, k, depth + 1) for k in fixed)
            else:
                stack.extend((value, i, depth + 1) for i in range(len(value)))
    return root[0]


def _stamp(value: Any) -> str:
    """A Unix time as text ("" for anything that is not a plausible one: NaN, 1e20...)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        try:
            return datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="microseconds")
        except (OverflowError, OSError, ValueError):
            return ""
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
        if (
            not isinstance(node_id, str)
            or node_id in seen
            or node_id not in mapping
            or not isinstance(mapping[node_id], dict)
        ):
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
        author = message.get("author")
        role = author.get("role") if isinstance(author, dict) else None
        text = _text(message.get("content"))
        metadata = message.get("metadata")
        hidden = isinstance(metadata, dict) and metadata.get("is_visually_hidden_from_conversation")
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
