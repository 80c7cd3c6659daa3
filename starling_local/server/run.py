"""One generation running in a worker thread, seen from the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from starling_local.chat.service import ReplyHooks, ReplyOutcome, ReplyStart
from starling_local.engine.logprobs import TokenLogprob
from starling_local.engine.types import EngineStream

Call = Callable[[ReplyHooks, threading.Event], ReplyOutcome]


@dataclass(frozen=True)
class Piece:
    """Text that streamed, with the token ids (and their logprobs, when asked) behind it."""

    text: str
    ids: list[int]
    logprobs: list[TokenLogprob]


Event = ReplyStart | Piece | ReplyOutcome


class WorkerReply:
    """`events()` yields the start, the pieces as they stream, then the outcome. The client
    going away (or leaving `events()` early) cancels it, also while its prompt is being
    evaluated."""

    def __init__(self, request: Request, call: Call, done: Callable[[], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancel = threading.Event()
        self._sent = 0
        self.watcher = asyncio.create_task(self._watch(request))

        def work() -> None:
            try:
                hooks = ReplyHooks(on_start=self._on_start, on_text=self._on_text)
                result: Any = call(hooks, self.cancel)
            except BaseException as exc:
                result = exc
            finally:
                done()
            self.loop.call_soon_threadsafe(self._finish, result)

        threading.Thread(target=work, name="starling-request", daemon=True).start()

    def _on_start(self, start: ReplyStart) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, start)

    def _on_text(self, text: str, stream: EngineStream) -> None:
        ids = stream.token_ids[self._sent :]
        logprobs = stream.logprobs[self._sent :]
        self._sent = len(stream.token_ids)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, Piece(text, ids, logprobs))

    def _finish(self, result: Any) -> None:
        self.watcher.cancel()
        self.queue.put_nowait(result)

    async def _watch(self, request: Request) -> None:
        while not self.cancel.is_set():
            if await request.is_disconnected():
                self.cancel.set()
                return
            await asyncio.sleep(0.05)

    async def events(self) -> AsyncGenerator[Event, None]:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, ReplyOutcome):
                    return
        finally:
            self.cancel.set()  # a no-op when the reply is complete
