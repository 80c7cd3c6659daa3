"""What the conversation layer needs of an engine: the local llama.cpp `Engine`, or a
`RemoteEngine` that generates on another machine."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from starling_local.engine.runtime import EngineStream, KVSnapshot, SamplingParams


class EngineLike(Protocol):
    path: Path
    model_key: str
    backend: str
    n_ctx: int
    cpu_threads: int
    """CPU threads of this machine kept busy while generating (0: it runs elsewhere)."""

    @property
    def closed(self) -> bool: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...
    def tokenize_text(self, text: str) -> list[int]: ...
    def tokenize(self, text: str, *, bos: bool = False, special: bool = False) -> list[int]: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...
    def cached_prefix(self, tokens: Sequence[int]) -> int: ...
    def snapshot(self) -> KVSnapshot | None: ...
    def restore(self, snapshot: KVSnapshot) -> int: ...
    def save_state(self, path: Path) -> int: ...
    def load_state(self, path: Path) -> int: ...
    def generate(
        self,
        tokens: Sequence[int],
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
        *,
        stop_ids: Iterable[int] = (),
        reply: bool = True,
    ) -> EngineStream: ...
    def close(self) -> None: ...
