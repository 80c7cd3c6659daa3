"""Running the ASGI app on uvicorn, with what uvicorn does not guard by itself.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but has no timeout for a
request head and no cap on open connections: 1,000 idle sockets, or 20 clients sending their
headers a byte at a time, stay open, and past the descriptor limit `accept` fails for everyone
(`/health` included). `GuardedH11` adds both at the protocol layer: a head must arrive within
`HEAD_TIMEOUT_S` of the connection (or of the last response), its body within `BODY_TIMEOUT_S`
of the head, and past `max_connections` the connection that has waited longest without a
request being served (no head yet, or a body still coming) is closed to make room (the new one
itself when every connection is busy). So 600 clients that send a head and one byte of body
cannot lock the others out.

`StoppingServer` makes SIGTERM and SIGINT a clean stop: stop accepting, let `on_stop` cancel
the replies (running and queued), finish within the graceful timeout, exit 0; a second signal
exits at once. (uvicorn re-raises the signal after its shutdown, which exits 143.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import threading
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5
GRACEFUL_S = 4
#: Descriptors kept free for everything that is not a connection (model, database, logs).
RESERVED_FDS = 64
DEFAULT_MAX_CONNECTIONS = 512
BACKLOG = 32


def connection_limit(wanted: int = DEFAULT_MAX_CONNECTIONS) -> int:
    """At most `wanted`, and below this process's descriptor limit by the descriptors kept
    for the rest and one batch of accepted sockets not yet counted."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(8, min(wanted, soft - RESERVED_FDS - BACKLOG))


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a request-head timeout and a connection cap."""

    max_connections = DEFAULT_MAX_CONNECTIONS
    head_timeout = HEAD_TIMEOUT_S
    body_timeout = BODY_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._waiting_since = self.loop.time()
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_cycle: Any = None
        self._body_since = 0.0
        if len(self.connections) > self.max_connections:
            idle = [
                c
                for c in self.connections
                if isinstance(c, GuardedH11)
                and c is not self
                and (c._idle() or c._awaiting_body())
                and not c.transport.is_closing()
            ] or [self]
            oldest = min(idle, key=lambda c: c._waiting_since)
            oldest.transport.close()
            if oldest is self:
                return
        self._arm(self.head_timeout)

    def _idle(self) -> bool:
        """Waiting for a request head (none in flight)."""
        return self.cycle is None or self.cycle.response_complete

    def _awaiting_body(self) -> bool:
        """A request head came, and its body has not all arrived (nor a response started)."""
        cycle = self.cycle
        return (
            cycle is not None
            and cycle.more_body
            and not cycle.response_started
            and not cycle.response_complete
        )

    def _arm(self, delay: float) -> None:
        self._head_timer = self.loop.call_later(delay, self._check_head)

    def _check_head(self) -> None:
        if self.transport.is_closing():
            return
        now = self.loop.time()
        waited = now - self._waiting_since
        if self._idle() and waited >= self.head_timeout:
            self.transport.close()  # no request head in time (idle, or sent a byte at a time)
            return
        if self._awaiting_body() and now - self._body_since >= self.body_timeout:
            self.transport.close()  # the body did not arrive in time
            return
        self._arm(self.head_timeout - waited if self._idle() else self.head_timeout)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._body_cycle:
            self._body_cycle, self._body_since = self.cycle, self.loop.time()  # a head came

    def on_response_complete(self) -> None:
        self._waiting_since = self.loop.time()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)


def guarded_protocol(max_connections: int) -> type[GuardedH11]:
    return type("GuardedH11Protocol", (GuardedH11,), {"max_connections": max_connections})


class StoppingServer(uvicorn.Server):
    """uvicorn's server, stopped cleanly by SIGTERM or SIGINT (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop
        self.stopped_by: int | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stopped_by is not None:
            os._exit(128 + sig)  # the second signal: at once
        self.stopped_by = sig
        self.should_exit = True
        threading.Thread(target=self._on_stop, name="stop-replies", daemon=True).start()


def make_server(
    app: Any,
    *,
    host: str,
    port: int,
    on_stop: Callable[[], None],
    max_connections: int | None = None,
) -> StoppingServer:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(connection_limit(max_connections or DEFAULT_MAX_CONNECTIONS)),
        log_level="warning",
        access_log=False,  # the app logs each request itself (server.log)
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=GRACEFUL_S,
        # asyncio accepts up to `backlog` sockets per wake-up before any of them reaches the
        # protocol: a small one lets the cap act between batches (2048 would take every
        # descriptor first).
        backlog=BACKLOG,
        lifespan="off",
    )
    return StoppingServer(config, on_stop)
