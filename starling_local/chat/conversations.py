"""`Conversations`: saved conversations and their messages, as every front end changes them.

Creating, editing, deleting, forking, importing and exporting go through here, so a rule (an
empty message is refused, a conversation never exists without its first message, a deleted
conversation takes its KV state files with it) holds for the app, `ask`, `history` and the
server alike. Replies are the `ReplyRunner`'s; `ConversationService` puts the two together.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from starling_local.chat.imports import parse_import
from starling_local.chat.kv_cache import copy_states, forget
from starling_local.chat.settings import ConversationSettings, settings_of, stored_params
from starling_local.chat.template import Message
from starling_local.chat.transcripts import to_json, to_markdown
from starling_local.errors import UsageError
from starling_local.store.conversations import ConversationStore
from starling_local.store.locks import conversation_lock
from starling_local.store.models import Conversation, StoredMessage


class Conversations:
    """The conversations of one store (None: a session that saves nothing)."""

    def __init__(
        self,
        store: ConversationStore | None,
        *,
        owns_store: bool = True,
        kv_root: Path | None = None,
    ) -> None:
        self._store = store
        self._owns_store = owns_store
        self._kv_root = kv_root

    @property
    def model_name(self) -> str:
        """The model new messages are written with (the service's loaded one)."""
        return ""

    @property
    def store(self) -> ConversationStore:
        if self._store is None:
            raise UsageError("this session does not save conversations")
        return self._store

    def close_store(self) -> None:
        if self._store is not None and self._owns_store:
            self._store.close()

    # --- conversations ------------------------------------------------------------------------

    def get(self, conversation_id: int) -> Conversation:
        return self.store.get(conversation_id)

    def latest(self) -> Conversation | None:
        return self.store.latest()

    def settings(self, conversation_id: int) -> ConversationSettings:
        return settings_of(self.store.get(conversation_id))

    def create(self, settings: ConversationSettings) -> Conversation:
        return self.store.create(
            mode=settings.mode.value,
            system=settings.system,
            model=self.model_name,
            params=stored_params(settings),
        )

    def save_settings(self, conversation_id: int, settings: ConversationSettings) -> Conversation:
        """Make `settings` the conversation's (the one place they are written)."""
        return self.store.update(
            conversation_id,
            mode=settings.mode.value,
            system=settings.system,
            params=stored_params(settings),
        )

    def rename(self, conversation_id: int, title: str) -> Conversation:
        if not title.strip():
            raise UsageError("the title is empty")
        return self.store.rename(conversation_id, title)

    def delete(self, conversation_id: int) -> None:
        """Delete a conversation and its KV state files (for every model)."""
        self.store.delete(conversation_id)
        forget(conversation_id, self._kv_root)

    def send(
        self,
        conversation_id: int | None,
        text: str,
        settings: ConversationSettings | None = None,
    ) -> Conversation:
        """Commit a user message (creating the conversation when `conversation_id` is None);
        `settings`, when given, become the conversation's. Ready for `reply()`."""
        if not text.strip():
            raise UsageError("the message is empty")
        if conversation_id is None:
            # One transaction: a conversation never exists without its first message.
            fresh = self.new_conversation(
                [Message("user", text)], settings or ConversationSettings()
            )
            return self.store.insert(fresh)
        if settings is not None:
            conv = self.save_settings(conversation_id, settings)
        else:
            conv = self.store.get(conversation_id)
        if self.model_name and conv.model != self.model_name:
            self.store.update(conv.id, model=self.model_name)
        self.store.add_message(conv.id, "user", text)
        return self.store.get(conv.id)

    @contextlib.contextmanager
    def writing(
        self, conversation_id: int | None, on_wait: Callable[[], object] | None = None
    ) -> Iterator[None]:
        """Be the one writer of a conversation across processes while the block runs (a new
        conversation, `None`, needs no lock): wrap a message's commit and its reply, so
        another process continuing it waits for the reply and its prompt holds it."""
        if conversation_id is None or self._store is None:
            yield
            return
        with conversation_lock(self._store.path, conversation_id, on_wait=on_wait):
            yield

    def regenerate(self, conversation_id: int) -> Conversation:
        """Remove the last reply (kept if the conversation ends with a user message)."""
        conv = self.store.get(conversation_id)
        if not conv.messages:
            raise UsageError("nothing to regenerate: the conversation is empty")
        last = conv.messages[-1]
        if last.role == "assistant":
            self.store.truncate(conv.id, last.id)
        return self.store.get(conv.id)

    def edit_last(self, conversation_id: int, text: str) -> Conversation:
        """Replace the last user message (and what followed it) with `text`."""
        if not text.strip():
            raise UsageError("the message is empty")
        conv = self.store.get(conversation_id)
        users = [m for m in conv.messages if m.role == "user"]
        if not users:
            raise UsageError("no message of yours to edit")
        self.store.truncate(conv.id, users[-1].id)
        self.store.add_message(conv.id, "user", text)
        return self.store.get(conv.id)

    def delete_pair(self, conversation_id: int, message_id: int) -> Conversation:
        """Delete a message and its partner: a user message with the reply after it, or a reply
        with the user message before it."""
        conv = self.store.get(conversation_id)
        ids = [m.id for m in conv.messages]
        if message_id not in ids:
            raise UsageError(f"conversation {conversation_id} has no message {message_id}")
        i = ids.index(message_id)
        role = conv.messages[i].role
        j = i + 1 if role == "user" else i - 1
        partner = conv.messages[j] if 0 <= j < len(ids) and conv.messages[j].role != role else None
        self.store.delete_messages(conv.id, [message_id] + ([partner.id] if partner else []))
        return self.store.get(conv.id)

    def export(self, conversation_id: int, folder: Path) -> tuple[Path, Path]:
        """Write the conversation as Markdown and JSON into `folder`."""
        conv = self.store.get(conversation_id)
        folder.mkdir(parents=True, exist_ok=True)
        md = folder / f"conversation-{conv.id}.md"
        js = folder / f"conversation-{conv.id}.json"
        md.write_text(to_markdown(conv), encoding="utf-8")
        js.write_text(json.dumps(to_json(conv), indent=2, ensure_ascii=False), encoding="utf-8")
        return md, js

    def import_data(self, data: Any) -> list[Conversation]:
        """Add the conversations of an imported JSON document (a starling-local export, a
        ChatGPT `conversations.json`, or a list of messages): all of them, or none."""
        return self.store.insert_many(parse_import(data))

    def import_file(self, path: Path) -> list[Conversation]:
        """`import_data` of a JSON file, with one-line errors for a missing or broken file."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"{path}: not a JSON export ({exc})") from exc
        except RecursionError:
            raise UsageError(f"{path}: the JSON nests too deep to be an export") from None
        try:
            return self.import_data(data)
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from None

    def fork(self, conversation_id: int, at: int | None = None) -> Conversation:
        """A new conversation holding the messages up to message `at` (1-based; default: all),
        a branch of this one. Its first reply starts from the parent's KV cache."""
        conv = self.store.get(conversation_id)
        count = len(conv.messages) if at is None else at
        if not 1 <= count <= len(conv.messages):
            raise UsageError(
                f"conversation {conv.id} has {len(conv.messages)} messages: --at must be 1 to "
                f"{len(conv.messages)}"
            )
        kept = conv.messages[:count]
        branch = replace(
            conv,
            id=0,
            title=f"{conv.title or 'Untitled'} (branch)",
            created="",
            updated="",
            messages=[
                replace(m, incomplete=False) if m.incomplete and m.content else m for m in kept
            ],
            parent_id=conv.id,
        )
        new = self.store.insert(branch)
        copy_states(conv.id, new.id, self._kv_root)
        return new

    def new_conversation(
        self,
        messages: Sequence[Message],
        settings: ConversationSettings,
        params: dict[str, Any] | None = None,
    ) -> Conversation:
        """A conversation not yet in the store (`store.insert` writes it in one transaction),
        holding `messages`, with `settings` and the extra stored `params` given."""
        return Conversation(
            id=0,
            title="",
            mode=settings.mode.value,
            system=settings.system,
            model=self.model_name,
            params={**stored_params(settings), **(params or {})},
            created="",
            updated="",
            messages=[StoredMessage(0, 0, m.role, m.content, "") for m in messages],
        )
