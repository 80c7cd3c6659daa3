"""The served model's lifetime: loaded on demand, kept while requests use it and for a
keep-alive after the last one (Ollama's `keep_alive`), switched when a request names another
library model, freed when idle.

Requests hold a lease on the model they run on: a switch or an unload waits until no request
holds the old one, and a request for another model waits until the running ones are done (one
model in memory at a time, as Ollama with `OLLAMA_MAX_LOADED_MODELS=1`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from starling_local.chat.service import ConversationService
from starling_local.engine.interface import EngineLike

Opener = Callable[[Path, int | None], tuple[EngineLike, str]]
"""Loads a model file with a context window (None: the server's)."""
#: Ollama's default keep-alive: five minutes.
DEFAULT_KEEP_ALIVE_S = 300.0


@dataclass(frozen=True)
class Lease:
    """A request's hold on the loaded model."""

    path: Path
    load_ns: int
    """Nanoseconds this request spent loading the model (0 when it was loaded already)."""


class ModelSlot:
    """One model at a time for the service; see the module's docstring."""

    def __init__(
        self,
        service: ConversationService,
        opener: Opener | None,
        default: Path,
        keep_alive_s: float | None = DEFAULT_KEEP_ALIVE_S,
    ) -> None:
        self.service = service
        self._opener = opener
        self.default = default
        self.keep_alive_s = keep_alive_s
        """Seconds a model stays loaded after its last request (None: forever)."""
        self._cond = threading.Condition()
        self.path: Path | None = None
        self._leases = 0
        self._loading = False
        self._expires: float | None = None
        self._closed = False
        self._generation = 0  # bumps on every load/unload: stale timers do nothing
        self._timer: threading.Timer | None = None
        self.loaded_at = 0.0
        self._n_ctx: tuple[int | None, int] = (None, 0)
        """(the window asked for at load, the one the engine has)."""

    # --- what is loaded ----------------------------------------------------------------------

    @property
    def can_switch(self) -> bool:
        """Whether requests may name other library models (a local engine; not a remote)."""
        return self._opener is not None

    @property
    def expires_at(self) -> float | None:
        """Wall-clock time the model will be freed if nothing uses it (None: never)."""
        with self._cond:
            return self._expires if self.path is not None else None

    def attached(self, path: Path, n_ctx: int) -> None:
        """The model the server loaded at start-up (no opener involved)."""
        with self._cond:
            self.path = path
            self._n_ctx = (None, n_ctx)
            self.loaded_at = time.time()
            self._set_expiry(self.keep_alive_s)

    # --- leases ------------------------------------------------------------------------------

    def _fits(self, path: Path, n_ctx: int | None) -> bool:
        asked, has = self._n_ctx
        return self.path == path and (n_ctx is None or n_ctx in (asked, has))

    def acquire(self, path: Path | None = None, n_ctx: int | None = None) -> Lease:
        """Hold `path` (default: the server's model) loaded, with a context window of `n_ctx`
        tokens if given (Ollama's `num_ctx`: another window loads the model again, as Ollama
        does), loading or switching first; blocks while another model is in use. Raises what
        the opener raises."""
        path = path or self.default
        with self._cond:
            while True:
                if self._closed:
                    from starling_local.chat.service import ServiceClosedError

                    raise ServiceClosedError("the server is shutting down")
                if self._fits(path, n_ctx) and not self._loading:
                    self._leases += 1
                    return Lease(path, 0)
                if not self._loading and (self.path is None or self._leases == 0):
                    break  # load, or switch: nothing holds the loaded one
                self._cond.wait(0.5)
            self._loading = True
            old = self.path
        start = time.perf_counter_ns()
        try:
            if old is not None:
                self.service.unload_engine()
                with self._cond:
                    self.path = None
            if self._opener is None:
                raise RuntimeError("this server cannot load models")
            engine, name = self._opener(path, n_ctx)
            if not self.service.attach_engine(engine, name):
                engine.close()
                from starling_local.chat.service import ServiceClosedError

                raise ServiceClosedError("the server is shutting down")
        finally:
            with self._cond:
                self._loading = False
                self._cond.notify_all()
        with self._cond:
            self.path = path
            self._n_ctx = (n_ctx, engine.n_ctx)
            self.loaded_at = time.time()
            self._generation += 1
            self._leases += 1
            self._expires = None
            self._cond.notify_all()
        return Lease(path, time.perf_counter_ns() - start)

    def release(self, keep_alive_s: float | str | None = "default") -> None:
        """Drop a lease; the model stays loaded `keep_alive_s` more seconds (0: unload now when
        nothing else holds it; None: forever; "default": the server's keep-alive)."""
        seconds = self.keep_alive_s if keep_alive_s == "default" else keep_alive_s
        assert not isinstance(seconds, str)
        with self._cond:
            self._leases = max(0, self._leases - 1)
            self._set_expiry(seconds)
            unload_now = seconds is not None and seconds <= 0 and self._leases == 0
            self._cond.notify_all()
        if unload_now:
            self.unload()

    def _set_expiry(self, seconds: float | None) -> None:
        self._generation += 1
        if self._timer is not None:  # one timer at a time, however many requests came
            self._timer.cancel()
            self._timer = None
        if seconds is None:
            self._expires = None
            return
        self._expires = time.time() + max(0.0, seconds)
        if seconds > 0:
            self._timer = threading.Timer(seconds, self._expire, args=(self._generation,))
            self._timer.daemon = True
            self._timer.start()

    def _expire(self, generation: int) -> None:
        with self._cond:
            if generation != self._generation or self._leases or self.path is None:
                return
        self.unload()

    def unload(self) -> bool:
        """Free the model now if no request holds it; True if one was freed."""
        with self._cond:
            if self.path is None or self._leases or self._loading or self._opener is None:
                return False
            self._loading = True
        try:
            freed = self.service.unload_engine()
        finally:
            with self._cond:
                self.path = None
                self._expires = None
                self._generation += 1
                self._loading = False
                self._cond.notify_all()
        return freed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._generation += 1
            if self._timer is not None:
                self._timer.cancel()
            self._cond.notify_all()


#: Go's duration units, longer names first (so "ms" is not read as "m").
_UNIT_ORDER = ("ms", "us", "µs", "ns", "h", "m", "s")


def parse_keep_alive(value: object) -> float | None:
    """Ollama's `keep_alive`: seconds as a number, or a duration string (`"5m"`, `"1h30m"`,
    `"10s"`, `"-1"`); negative means forever (None). ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a duration")
    if isinstance(value, int | float):
        return None if value < 0 else float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("keep_alive must be a duration such as '5m' or a number of seconds")
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return None if number < 0 else number
    negative = text.startswith("-")
    rest = text.lstrip("+-")
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    total, number_text, i = 0.0, "", 0
    while i < len(rest):
        ch = rest[i]
        if ch.isdigit() or ch == ".":
            number_text += ch
            i += 1
            continue
        unit = next(
            (u for u in ("ms", "us", "µs", "ns", "h", "m", "s") if rest[i:].startswith(u)), None
        )
        if unit is None or not number_text:
            raise ValueError(f"keep_alive: not a duration: {value!r}")
        total += float(number_text) * units[unit]
        number_text = ""
        i += len(unit)
    if number_text:
        raise ValueError(f"keep_alive: a duration needs a unit (s, m, h): {value!r}")
    return None if negative else total
