"""`ConversationService`: the one conversation workflow that every front end calls.

It owns the store, the engine and the KV state files. A front end (the CLI, the TUI, the
server) parses input, calls it, and shows what comes back: it never renders a prompt, writes a
message or touches a state file itself. Replies run one at a time, each from the calling
thread to the end: the user message is committed first, the reply is recorded at least once a
second, and the KV state file is saved before `reply()` returns.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from starling_local.chat.attachments import with_files
from starling_local.chat.context import ContextOverflowError, FittedPrompt
from starling_local.chat.conversation import ReplyRecorder, to_messages
from starling_local.chat.imports import parse_import
from starling_local.chat.kv_cache import ConversationCache, copy_states, forget
from starling_local.chat.prompts import PromptPreview, fit_messages, preview_prompt, prompt_size
from starling_local.chat.replies import ReplyHooks, ReplyOutcome, ReplyStart, run_reply
from starling_local.chat.sequences import RecentReplies, SequenceCache
from starling_local.chat.settings import ConversationSettings, settings_of, stored_params
from starling_local.chat.template import Message
from starling_local.chat.transcripts import to_json, to_markdown
from starling_local.chat.turns import FifoLock
from starling_local.engine.interface import EngineLike
from starling_local.engine.types import SamplingParams
from starling_local.errors import StarlingError, UsageError

__all__ = ["ConversationService", "ReplyHooks", "ReplyOutcome", "ReplyStart"]
from starling_local.store.conversations import ConversationStore
from starling_local.store.models import Conversation, StoredMessage


class NoModelError(StarlingError):
    """A reply was asked for and no model is loaded."""


class ServiceClosedError(StarlingError):
    """The service was closed (the front end is quitting)."""


@dataclass
class _Turn:
    cancel: threading.Event


class ConversationService:
    """Conversations, replies and their KV state, over one store and one engine."""

    def __init__(
        self,
        store: ConversationStore | None,
        engine: EngineLike | None = None,
        *,
        model_name: str = "",
        owns_store: bool = True,
        kv_root: Path | None = None,
    ) -> None:
        self._store = store
        self._owns_store = owns_store
        self._kv_root = kv_root
        self._engine: EngineLike | None = None
        self._kv: ConversationCache | None = None
        self.model_name = model_name
        self._lock = threading.Lock()  # the service's own fields
        self._replying = FifoLock()  # one reply at a time, in order, to its saved state
        self._turn: _Turn | None = None
        self._stop_next = False
        self._closed = False
        self._sequences = SequenceCache()
        self._replies = RecentReplies()
        if engine is not None:
            self.attach_engine(engine, model_name)

    # --- ownership ----------------------------------------------------------------------------

    @property
    def engine(self) -> EngineLike | None:
        return self._engine

    @property
    def store(self) -> ConversationStore:
        if self._store is None:
            raise UsageError("this session does not save conversations")
        return self._store

    def attach_engine(self, engine: EngineLike, model_name: str = "") -> bool:
        """Take ownership of a loaded engine; False (the caller closes it) if already closed."""
        with self._lock:
            if self._closed:
                return False
            self._engine = engine
            self._kv = ConversationCache(engine, root=self._kv_root)
            self.model_name = model_name or str(engine.path)
            return True

    def swap_engine(self, engine: EngineLike, model_name: str) -> bool:
        """Switch to another loaded engine once the running reply (if any) is done, and close
        the old one; False (the caller closes `engine`) if the service is closed. KV state files
        stay keyed by model, so each model keeps its own."""
        with self._replying:
            with self._lock:
                if self._closed:
                    return False
                old = self._engine
            self._sequences.clear()
            self.attach_engine(engine, model_name)
            if old is not None and old is not engine:
                old.close()
            return True

    def close(self) -> None:
        """Stop a running reply, wait until it is recorded and its state saved, then free the
        engine (and the store, when owned). Safe to call twice and from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            turn = self._turn
        if turn is not None:
            turn.cancel.set()
        with self._replying:
            if self._engine is not None:
                self._engine.close()
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
            fresh = self._new_conversation(
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
        from starling_local.store.locks import conversation_lock

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
        import json

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
        import json

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

    def file_block(self, path: Path) -> tuple[str, int]:
        """A text file as the code block a message would hold, and its size in tokens (refused
        when it does not fit the context window)."""
        engine = self._require_engine()
        block = with_files(
            "", [path], count_tokens=lambda b: len(engine.tokenize_text(b)), n_ctx=engine.n_ctx
        )
        return block, len(engine.tokenize_text(block))

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

    # --- prompts ------------------------------------------------------------------------------

    def _require_engine(self) -> EngineLike:
        engine = self._engine
        if engine is None:
            raise NoModelError("no model is loaded")
        return engine

    def _fit(self, messages: Sequence[Message], settings: ConversationSettings) -> FittedPrompt:
        return fit_messages(self._require_engine(), messages, settings)

    def preview(
        self,
        conversation_id: int | None,
        settings: ConversationSettings,
        pending: str = "…",
    ) -> PromptPreview:
        """The exact prompt of the next reply (with `pending` as the next message when the
        conversation does not end with one of the user's)."""
        conv = self.store.get(conversation_id) if conversation_id else None
        messages = to_messages(conv) if conv else []
        return preview_prompt(self._require_engine(), messages, settings, pending)

    def context_usage(
        self, conversation_id: int | None, settings: ConversationSettings
    ) -> tuple[int, int]:
        """(tokens the conversation takes as the next prompt renders, the context size)."""
        conv = self.store.get(conversation_id) if conversation_id else None
        used = prompt_size(self._require_engine(), to_messages(conv) if conv else [], settings)
        return used, self._require_engine().n_ctx

    # --- replies ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the reply being generated (it is kept, marked stopped), and one still waiting
        for its turn (it then stops as it starts)."""
        with self._lock:
            turn = self._turn
            if self._replying.waiting:
                self._stop_next = True
        if turn is not None:
            turn.cancel.set()

    @property
    def replying(self) -> bool:
        return self._turn is not None

    def reply(
        self,
        conversation_id: int,
        *,
        hooks: ReplyHooks | None = None,
        overrides: dict[str, Any] | None = None,
        cancel: threading.Event | None = None,
        stop: Sequence[str] = (),
    ) -> ReplyOutcome:
        """Generate the reply to a saved conversation that ends with a user message, recording
        it as it streams; its KV state is saved before this returns. A conversation that ends
        with a reply (stopped, cut at its length) gets that reply continued in place.
        `overrides` change sampling fields for this reply only (benchmarks, a request's
        grammar or logprobs)."""
        with self._turn_for(cancel) as turn:
            return self._reply_in(turn, conversation_id, hooks, overrides, stop)

    def _reply_in(
        self,
        turn: _Turn,
        conversation_id: int,
        hooks: ReplyHooks | None,
        overrides: dict[str, Any] | None,
        stop: Sequence[str],
    ) -> ReplyOutcome:
        conv = self.store.get(conversation_id)
        settings = settings_of(conv)
        if overrides:
            settings = settings.with_sampling(**overrides)
        messages = to_messages(conv)
        last = conv.messages[-1] if conv.messages else None
        extend = last if last is not None and last.role == "assistant" else None
        if extend is not None and not extend.content.strip():
            extend = None  # a reply cut before any text: `to_messages` leaves it out
        prompt = self._fit(messages, settings)
        return self._generate(
            prompt.tokens,
            settings.sampling,
            turn,
            hooks,
            conv.id,
            dropped=prompt.dropped_messages,
            stop=stop,
            extend=extend,
        )

    def continue_reply(
        self,
        conversation_id: int,
        *,
        hooks: ReplyHooks | None = None,
        cancel: threading.Event | None = None,
    ) -> ReplyOutcome:
        """Continue the conversation's last reply in place (one that was stopped, cancelled or
        cut at its length): the reply is left open in the prompt and grows."""
        conv = self.store.get(conversation_id)
        if not conv.messages or conv.messages[-1].role != "assistant":
            raise UsageError("there is no reply to continue: the last message is not a reply")
        if not conv.messages[-1].content.strip():
            raise UsageError("there is no reply to continue: the last reply is empty")
        return self.reply(conversation_id, hooks=hooks, cancel=cancel)

    def answer(
        self,
        messages: Sequence[Message],
        settings: ConversationSettings,
        *,
        hooks: ReplyHooks | None = None,
        cancel: threading.Event | None = None,
        stop: Sequence[str] = (),
    ) -> ReplyOutcome:
        """A reply to `messages` that is not saved anywhere (`ask --no-save`, the server).
        Messages that end with a reply get that reply continued (the outcome's text is what
        was added)."""
        with self._turn_for(cancel) as turn:
            prompt = self._fit(self._replies.exact(messages), settings)
            continued = bool(messages) and messages[-1].role == "assistant"
            outcome = self._generate(
                prompt.tokens,
                settings.sampling,
                turn,
                hooks,
                None,
                dropped=prompt.dropped_messages,
                stop=stop,
                raw=continued,
                continued=continued,
            )
            if outcome.stats.stop_reason != "stop":  # a stop string cut the ids from the text
                self._replies.remember(outcome.text, outcome.token_ids)
            return outcome

    def respond(
        self,
        messages: Sequence[Message],
        settings: ConversationSettings,
        *,
        hooks: ReplyHooks | None = None,
        cancel: threading.Event | None = None,
        stop: Sequence[str] = (),
        save: bool = False,
        client_id: str | None = None,
    ) -> ReplyOutcome:
        """A reply to a whole message list (the server's chat requests). With `save` it is kept:
        it continues the saved conversation whose messages are exactly the ones before the last
        (of the client `client_id`, when given), or starts one. Messages that end with a reply
        continue that reply. Finding, writing and replying happen in one turn, so two requests
        on one history each get a well-formed conversation; a request refused before its reply
        starts (it does not fit the context...) saves nothing. The request's budget and
        per-request fields are never saved with the conversation."""
        if not save:
            return self.answer(messages, settings, hooks=hooks, cancel=cancel, stop=stop)
        continuing = messages[-1].role == "assistant"
        history = list(messages if continuing else messages[:-1])
        once = _request_only(settings) | {"max_tokens": settings.sampling.max_tokens}
        with self._turn_for(cancel) as turn:
            self._fit(self._replies.exact(messages), settings)  # refused: nothing is written
            cid = self._find(history, client_id)
            kept = settings.with_sampling(max_tokens=SamplingParams().max_tokens)
            if cid is None:
                cid = self.store.insert(self._new_conversation(history, kept, client_id)).id
            else:
                saved = settings_of(self.store.get(cid, messages=False)).sampling.max_tokens
                kept = settings.with_sampling(max_tokens=saved)
            if not continuing:
                self._add_user(cid, messages[-1].content, kept)
            outcome = self._reply_in(turn, cid, hooks, once, stop)
            self._remember_history(cid)
            return outcome

    def _find(self, history: Sequence[Message], client_id: str | None) -> int | None:
        """The conversation (of `client_id`, if given) whose messages are exactly `history`."""
        if not history:
            return None
        key = _history_key([(m.role, m.content) for m in history])
        for conv in self.store.conversations():
            if client_id is not None and conv.params.get("client_id") != client_id:
                continue
            if conv.params.get("history_key") == key:
                return conv.id
        return None

    def _remember_history(self, conversation_id: int) -> None:
        conv = self.store.get(conversation_id)
        key = _history_key([(m.role, m.content) for m in conv.messages])
        self.store.update(conversation_id, params={**conv.params, "history_key": key})

    def _add_user(self, conversation_id: int, text: str, settings: ConversationSettings) -> None:
        conv = self.store.get(conversation_id, messages=False)
        keep: dict[str, Any] = {
            k: conv.params[k] for k in ("client_id", "history_key") if k in conv.params
        }
        self.store.update(
            conversation_id,
            mode=settings.mode.value,
            system=settings.system,
            model=self.model_name or None,
            params={**stored_params(settings), **keep},
        )
        self.store.add_message(conversation_id, "user", text)

    def _new_conversation(
        self,
        messages: Sequence[Message],
        settings: ConversationSettings,
        client_id: str | None = None,
    ) -> Conversation:
        params = stored_params(settings)
        if client_id is not None:
            params["client_id"] = client_id
        return Conversation(
            id=0,
            title="",
            mode=settings.mode.value,
            system=settings.system,
            model=self.model_name,
            params=params,
            created="",
            updated="",
            messages=[StoredMessage(0, 0, m.role, m.content, "") for m in messages],
        )

    def complete(
        self,
        tokens: Sequence[int],
        sampling: SamplingParams,
        *,
        hooks: ReplyHooks | None = None,
        cancel: threading.Event | None = None,
        stop: Sequence[str] = (),
        stop_ids: Sequence[int] = (),
    ) -> ReplyOutcome:
        """A raw completion of `tokens` (no template: the caller rendered them), as
        `/v1/completions` and another starling-local's remote engine ask for."""
        engine = self._require_engine()
        if not tokens:
            raise UsageError("the prompt is empty")
        if len(tokens) >= engine.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(tokens)} tokens and the context window is {engine.n_ctx}"
            )
        bad = [t for t in tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is not in the vocabulary")
        with self._turn_for(cancel) as turn:
            return self._generate(
                list(tokens), sampling, turn, hooks, None, stop=stop, stop_ids=stop_ids, raw=True
            )

    @contextlib.contextmanager
    def _turn_for(self, cancel: threading.Event | None) -> Iterator[_Turn]:
        """The engine to this reply (waiting for the one before), with its cancel event."""
        with self._replying:
            with self._lock:
                if self._closed:
                    raise ServiceClosedError("the conversation service is closed")
                turn = self._turn = _Turn(cancel or threading.Event())
                if self._stop_next:  # stopped while it waited for its turn
                    self._stop_next = False
                    turn.cancel.set()
            try:
                yield turn
            finally:
                with self._lock:
                    self._turn = None

    def _generate(
        self,
        prompt: list[int],
        sampling: SamplingParams,
        turn: _Turn,
        hooks: ReplyHooks | None,
        conversation_id: int | None,
        *,
        dropped: int = 0,
        stop: Sequence[str] = (),
        stop_ids: Sequence[int] = (),
        raw: bool = False,
        continued: bool = False,
        extend: StoredMessage | None = None,
    ) -> ReplyOutcome:
        engine = self._require_engine()
        self._sequences.prepare(engine, prompt)
        if conversation_id is not None and self._kv is not None:
            self._kv.restore(conversation_id, prompt)
        store = self.store if conversation_id else None

        def record() -> ReplyRecorder:
            assert store is not None and conversation_id is not None
            return ReplyRecorder(store, conversation_id, extend=extend)

        outcome = run_reply(
            engine,
            prompt,
            sampling,
            cancel=turn.cancel,
            hooks=hooks or ReplyHooks(),
            record=record if store is not None else None,
            conversation_id=conversation_id,
            dropped_messages=dropped,
            stop=stop,
            stop_ids=stop_ids,
            raw=raw or extend is not None,
            continued=continued or extend is not None,
        )
        if conversation_id is not None and self._kv is not None:
            # Before the reply is reported done: the next reply (maybe of another conversation)
            # must not take the engine first and leave this file holding its cache. A failed
            # save (a full disk) costs the next reply time, never this reply.
            try:
                self._kv.save(conversation_id)
            except (OSError, StarlingError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                outcome.warnings.append(
                    f"the KV cache was not saved ({reason}); the reply is, and the next one "
                    "evaluates the history again"
                )
        return outcome


def _history_key(messages: Sequence[tuple[str, str]]) -> str:
    """Identifies a message list by its roles and texts (whitespace at the ends aside)."""
    import hashlib
    import json

    data = json.dumps([(role, text.strip()) for role, text in messages], ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()


def _request_only(settings: ConversationSettings) -> dict[str, Any]:
    """The sampling fields of one request that a saved conversation does not keep (a grammar,
    logprobs): they apply to this reply only."""
    from dataclasses import fields

    from starling_local.chat.settings import PER_REQUEST

    sampling = settings.sampling
    defaults = SamplingParams()
    return {
        f.name: getattr(sampling, f.name)
        for f in fields(SamplingParams)
        if f.name in PER_REQUEST and getattr(sampling, f.name) != getattr(defaults, f.name)
    }
