"""What the store keeps: conversations and their messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StoredMessage:
    id: int
    conversation_id: int
    role: str  # "user" | "assistant"
    content: str
    created: str
    incomplete: bool = False
    stop_reason: str | None = None
    tokens: tuple[int, ...] | None = None
    stats: dict[str, Any] | None = None


@dataclass
class Conversation:
    id: int
    title: str
    mode: str
    system: str
    model: str
    params: dict[str, Any]
    created: str
    updated: str
    messages: list[StoredMessage] = field(default_factory=list)
    parent_id: int | None = None
    """The conversation this one was branched from, if any."""
