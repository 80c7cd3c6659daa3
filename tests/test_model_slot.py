"""The server's model slot (keep-alive, switching, num_ctx) on stand-in engines: no model."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from starling_local.server.model_slot import ModelSlot

A, B = Path("/models/a.gguf"), Path("/models/b.gguf")


class FakeEngine:
    def __init__(self, path: Path, n_ctx: int) -> None:
        self.path, self.n_ctx, self.closed = path, n_ctx, False


class FakeService:
    """What the slot uses of the conversation service: attach and unload."""

    def __init__(self) -> None:
        self.engine: FakeEngine | None = None
        self.events: list[str] = []

    def attach_engine(self, engine: Any, name: str) -> bool:
        self.engine = engine
        self.events.append(f"load {engine.path.name} {engine.n_ctx}")
        return True

    def unload_engine(self) -> bool:
        if self.engine is None:
            return False
        self.events.append(f"unload {self.engine.path.name}")
        self.engine = None
        return True


def make(keep_alive: float | None = 300.0) -> tuple[ModelSlot, FakeService]:
    service = FakeService()

    def opener(path: Path, n_ctx: int | None) -> tuple[FakeEngine, str]:
        return FakeEngine(path, n_ctx or 8192), path.stem

    slot = ModelSlot(service, opener, A, keep_alive)  # type: ignore[arg-type]
    return slot, service


def test_a_model_is_loaded_once_and_kept_while_used() -> None:
    slot, service = make()
    first = slot.acquire()
    second = slot.acquire()
    assert first.load_ns > 0 and second.load_ns == 0
    slot.release(0)  # another request still holds it: not unloaded
    assert service.events == ["load a.gguf 8192"]
    slot.release(0)
    assert service.events == ["load a.gguf 8192", "unload a.gguf"] and slot.path is None


def test_a_switch_waits_for_the_requests_on_the_old_model() -> None:
    slot, service = make()
    slot.acquire(A)
    got: list[Path] = []
    waiter = threading.Thread(target=lambda: got.append(slot.acquire(B).path))
    waiter.start()
    time.sleep(0.3)
    assert got == [] and service.events == ["load a.gguf 8192"]
    slot.release()
    waiter.join(5)
    assert got == [B]
    assert service.events == ["load a.gguf 8192", "unload a.gguf", "load b.gguf 8192"]


def test_num_ctx_reloads_only_for_another_window() -> None:
    slot, service = make()

    def request(n_ctx: int | None) -> None:
        slot.acquire(A, n_ctx)
        slot.release()

    request(1024)
    request(1024)
    request(None)  # no window asked: what is loaded
    request(2048)
    assert service.events == ["load a.gguf 1024", "unload a.gguf", "load a.gguf 2048"]


def test_the_keep_alive_frees_an_idle_model_and_forever_never_does() -> None:
    slot, service = make(keep_alive=0.2)
    slot.acquire()
    slot.release()
    assert slot.expires_at is not None
    deadline = time.monotonic() + 5
    while slot.path is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slot.path is None and service.events[-1] == "unload a.gguf"
    slot.acquire()
    slot.release(None)  # this request: forever
    time.sleep(0.4)
    assert slot.path == A and slot.expires_at is None
