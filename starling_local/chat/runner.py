"""`ReplyRunner`: the engine, and the replies it generates one at a time.

It owns the loaded engine and the caches that spare a reply from evaluating its history again:
the engine's own KV cache, copies of recent sequences in RAM, and each saved conversation's
state file on disk. Replies take turns first come first served; a turn holds the engine from
its prompt to its end, and a saved conversation's state file is written before the turn ends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from starling_local.chat.context import ContextOverflowError, FittedPrompt
from starling_local.chat.conversation import ReplyRecorder
from starling_local.chat.generation import ReplyHooks, ReplyOutcome, run_reply
from starling_local.chat.kv_cache import ConversationCache
from starling_local.chat.prompts import fit_messages
from starling_local.chat.sequences import RecentReplies, SequenceCache
from starling_local.chat.settings import ConversationSettings
from starling_local.chat.template import Message
from starling_local.chat.turns import FifoLock
from starling_local.engine.interface import EngineLike
from starling_local.engine.types import SamplingParams
from starling_local.errors import StarlingError, UsageError
from starling_local.store.conversations import ConversationStore
from starling_local.store.models import StoredMessage


class NoModelError(StarlingError):
    """A reply was asked for and no model is loaded."""


class ServiceClosedError(StarlingError):
    """The service was closed (the front end is quitting)."""


@dataclass
class Turn:
    """The engine is this reply's until the turn ends; `cancel` stops the reply."""

    cancel: threading.Event


@dataclass(frozen=True)
class Recording:
    """Where a reply is kept as it streams: a saved conversation, and the reply it continues
    in place (None: a new reply message)."""

    store: ConversationStore
    conversation_id: int
    extend: StoredMessage | None = None


class ReplyRunner:
    """One engine, its caches, and replies in turns."""

    def __init__(
        self,
        engine: EngineLike | None = None,
        model_name: str = "",
        kv_root: Path | None = None,
        *,
        owns_engine: bool = True,
    ) -> None:
        self._kv_root = kv_root
        self._owns_engine = owns_engine
        self._engine: EngineLike | None = None
        self._kv: ConversationCache | None = None
        self.model_name = model_name
        self._lock = threading.Lock()  # the runner's own fields
        self._turns = FifoLock()  # one reply at a time, in the order they came
        self._turn: Turn | None = None
        self._stop_next = False
        self._closed = False
        self._sequences = SequenceCache()
        self._replies = RecentReplies()
        self._in_file: tuple[int, int] | None = None
        """(conversation, cached tokens) while the engine's cache is what the conversation's
        state file holds: the last turn saved it, and nothing ran since."""
        if engine is not None:
            self.attach(engine, model_name)

    # --- the engine ---------------------------------------------------------------------------

    @property
    def engine(self) -> EngineLike | None:
        return self._engine

    def require_engine(self) -> EngineLike:
        engine = self._engine
        if engine is None:
            raise NoModelError("no model is loaded")
        return engine

    def attach(self, engine: EngineLike, model_name: str = "") -> bool:
        """Take ownership of a loaded engine; False (the caller closes it) if already closed."""
        with self._lock:
            if self._closed:
                return False
            self._engine = engine
            self._kv = ConversationCache(engine, root=self._kv_root)
            self._in_file = None
            self.model_name = model_name or str(engine.path)
            return True

    def swap(self, engine: EngineLike, model_name: str) -> bool:
        """Switch to another loaded engine once the running reply (if any) is done, and close
        the old one; False (the caller closes `engine`) if closed. State files stay keyed by
        model, so each model keeps its own."""
        with self._turns:
            with self._lock:
                if self._closed:
                    return False
                old = self._engine
            self._sequences.clear()
            self.attach(engine, model_name)
            if old is not None and old is not engine:
                old.close()
            return True

    def unload(self) -> bool:
        """Free the engine once the running reply (if any) is done, leaving the runner open
        for the next `attach` (a server's keep-alive); False if there was none to free."""
        with self._turns:
            with self._lock:
                engine, self._engine, self._kv, self._in_file = self._engine, None, None, None
            self._sequences.clear()
            if engine is None:
                return False
            if self._owns_engine:
                engine.close()
            return True

    def close(self) -> None:
        """Stop a running reply, wait until it is recorded and its state saved, then free the
        engine (when owned: a benchmark keeps its own). Safe to call twice, from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            turn = self._turn
        if turn is not None:
            turn.cancel.set()
        with self._turns:
            if self._engine is not None and self._owns_engine:
                self._engine.close()

    # --- turns --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def turn(self, cancel: threading.Event | None = None) -> Iterator[Turn]:
        """The engine to one reply (waiting for those that asked before), with its cancel
        event. What runs inside sees no other reply's prompt or KV cache."""
        with self._turns:
            with self._lock:
                if self._closed:
                    raise ServiceClosedError("the conversation service is closed")
                turn = self._turn = Turn(cancel or threading.Event())
                if self._stop_next:  # stopped while it waited for its turn
                    self._stop_next = False
                    turn.cancel.set()
            try:
                yield turn
            finally:
                with self._lock:
                    self._turn = None

    def stop(self) -> None:
        """Stop the reply being generated (it is kept, marked stopped), and one still waiting
        for its turn (it then stops as it starts)."""
        with self._lock:
            turn = self._turn
            if self._turns.waiting:
                self._stop_next = True
        if turn is not None:
            turn.cancel.set()

    @property
    def replying(self) -> bool:
        return self._turn is not None

    @property
    def waiting(self) -> int:
        """Replies waiting for their turn."""
        return self._turns.waiting

    # --- replies ------------------------------------------------------------------------------

    def fit(self, messages: Sequence[Message], settings: ConversationSettings) -> FittedPrompt:
        """The prompt of a reply to `messages`, with the ids of replies this runner generated
        (a client that sends the history back as text then matches the KV cache)."""
        return fit_messages(self.require_engine(), self._replies.exact(messages), settings)

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
        with self.turn(cancel) as turn:
            prompt = self.fit(messages, settings)
            continued = bool(messages) and messages[-1].role == "assistant"
            outcome = self.run(
                turn,
                prompt,
                settings.sampling,
                hooks,
                stop=stop,
                raw=continued,
                continued=continued,
            )
            if outcome.stats.stop_reason != "stop":  # a stop string cut the ids from the text
                self._replies.remember(outcome.text, outcome.token_ids)
            return outcome

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
        engine = self.require_engine()
        if not tokens:
            raise UsageError("the prompt is empty")
        if len(tokens) >= engine.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(tokens)} tokens and the context window is {engine.n_ctx}"
            )
        unknown = [t for t in tokens if not 0 <= t < engine.vocab_size]
        if unknown:
            raise UsageError(f"token id {unknown[0]} is not in the vocabulary")
        prompt = FittedPrompt(list(tokens), 0)
        with self.turn(cancel) as turn:
            return self.run(turn, prompt, sampling, hooks, stop=stop, stop_ids=stop_ids, raw=True)

    def run(
        self,
        turn: Turn,
        prompt: FittedPrompt,
        sampling: SamplingParams,
        hooks: ReplyHooks | None,
        *,
        recording: Recording | None = None,
        stop: Sequence[str] = (),
        stop_ids: Sequence[int] = (),
        raw: bool = False,
        continued: bool = False,
    ) -> ReplyOutcome:
        """Generate from `prompt` in `turn`: the engine's cache first made to hold as much of
        it as RAM or the conversation's state file can give, the reply recorded as it streams
        (with `recording`), and the state file saved before this returns."""
        engine = self.require_engine()
        tokens = prompt.tokens
        cid = recording.conversation_id if recording else None
        in_file = self._in_file == (cid, engine.cached_tokens)
        self._in_file = None
        covered = self._sequences.prepare(engine, tokens)
        if cid is not None and self._kv is not None and not in_file and covered < len(tokens) - 1:
            self._kv.restore(cid, tokens)  # the file may hold more of the prompt than RAM
        record: Callable[[], ReplyRecorder] | None = None
        if recording is not None:
            rec = recording

            def record() -> ReplyRecorder:
                return ReplyRecorder(rec.store, rec.conversation_id, extend=rec.extend)

        extending = recording is not None and recording.extend is not None
        outcome = run_reply(
            engine,
            tokens,
            sampling,
            cancel=turn.cancel,
            hooks=hooks or ReplyHooks(),
            record=record,
            conversation_id=cid,
            dropped_messages=prompt.dropped_messages,
            stop=stop,
            stop_ids=stop_ids,
            raw=raw or extending,
            continued=continued or extending,
        )
        if cid is not None and self._kv is not None:
            # Before the turn ends: the next reply (maybe of another conversation) must not
            # take the engine first and leave this file holding its cache. A failed save (a
            # full disk) costs the next reply time, never this reply.
            try:
                if self._kv.save(cid):
                    self._in_file = (cid, engine.cached_tokens)
            except (OSError, StarlingError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                outcome.warnings.append(
                    f"the KV cache was not saved ({reason}); the reply is, and the next one "
                    "evaluates the history again"
                )
        return outcome
