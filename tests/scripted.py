"""A scripted engine for the fast tier, as llm's `MockModel` and oterm's `FunctionModel`: the
real Starling tokenizer (the packaged vocabulary, through llama.cpp) and no model. Each
`generate()` takes the next scripted reply, streams it token by token, and keeps a KV cache of
token ids, so the service's cache logic sees what a real engine would report."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from starling_local.engine.runtime import Engine
from starling_local.engine.types import (
    EngineClosedError,
    EngineError,
    EngineStream,
    KVSnapshot,
    ReplyDecoder,
    SamplingParams,
)


@dataclass
class Script:
    """One scripted reply: its text, an error raised after `fail_after` tokens, and a gate the
    reply waits at before its first token (a test holds the engine with it)."""

    text: str
    fail_after: int | None = None
    gate: threading.Event | None = None
    started: threading.Event = field(default_factory=threading.Event)


class ScriptedEngine:
    """An `EngineLike` that replies with `replies` in turn (then "OK")."""

    backend = "scripted"
    cpu_threads = 0
    speculate = False
    model_key = "scripted"

    def __init__(self, vocab: Engine, replies: Iterable[str | Script] = (), n_ctx: int = 4096):
        self.path = Path("scripted-starling.gguf")
        self.n_ctx = n_ctx
        self._vocab = vocab
        self._script = [r if isinstance(r, Script) else Script(r) for r in replies]
        self._cache: list[int] = []
        self._closed = False
        self.prompts: list[list[int]] = []
        """Every prompt generated from, in order."""

    def then(self, *replies: str | Script) -> ScriptedEngine:
        self._script += [r if isinstance(r, Script) else Script(r) for r in replies]
        return self

    # --- tokens (the real vocabulary) ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def vocab_size(self) -> int:
        return self._vocab.vocab_size

    def tokenize_text(self, text: str) -> list[int]:
        return self._vocab.tokenize_text(text)

    def tokenize(self, text: str, *, bos: bool = False, special: bool = False) -> list[int]:
        return self._vocab.tokenize(text, bos=bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._vocab.detokenize(tokens)

    def token_bytes(self, token: int) -> bytes:
        return self._vocab.token_bytes(token)

    # --- the KV cache, as token ids -----------------------------------------------------------

    @property
    def cached_tokens(self) -> int:
        return len(self._cache)

    def cached_prefix(self, tokens: Sequence[int]) -> int:
        n = 0
        for a, b in zip(self._cache, tokens, strict=False):
            if a != b:
                break
            n += 1
        return n

    def clear_cache(self) -> None:
        self._cache = []

    def snapshot(self) -> KVSnapshot | None:
        return KVSnapshot(tuple(self._cache), bytearray(4 * len(self._cache)))

    def restore(self, snapshot: KVSnapshot) -> int:
        self._cache = list(snapshot.tokens)
        return len(self._cache)

    def save_state(self, path: Path) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self._cache).encode()
        path.write_bytes(data)
        return len(data)

    def state_tokens(self, path: Path) -> list[int]:
        return list(json.loads(path.read_bytes()))

    def load_state(self, path: Path) -> int:
        self._cache = list(json.loads(path.read_bytes()))
        return len(self._cache)

    # --- generation ---------------------------------------------------------------------------

    def generate(
        self,
        tokens: Sequence[int],
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
        *,
        stop_ids: Iterable[int] = (),
        raw: bool = False,
    ) -> EngineStream:
        if self._closed:
            raise EngineClosedError("the model has been unloaded")
        stream = EngineStream.starting(tokens, self.n_ctx)
        stream._chunks = self._run(
            list(tokens), params or SamplingParams(), cancel or threading.Event(), stream, raw
        )
        return stream

    def _run(
        self,
        tokens: list[int],
        params: SamplingParams,
        cancel: threading.Event,
        stream: EngineStream,
        raw: bool,
    ) -> Iterator[str]:
        script = self._script.pop(0) if self._script else Script("OK")
        script.started.set()
        if script.gate is not None:
            script.gate.wait(30)
        self.prompts.append(tokens)
        stats = stream.stats
        stats.prompt_evaluated = len(tokens) - min(self.cached_prefix(tokens), len(tokens) - 1)
        self._cache = list(tokens)
        decoder = ReplyDecoder(self.token_bytes, raw)
        budget = min(params.max_tokens, self.n_ctx - len(tokens))
        stats.stop_reason = "end_of_turn"
        for n, token in enumerate(self.tokenize_text(script.text)):
            if cancel.is_set():
                stats.stop_reason = "cancelled"
                break
            if n >= budget:
                stats.stop_reason = "length"
                break
            if script.fail_after is not None and n >= script.fail_after:
                raise EngineError("the scripted engine failed mid-reply")
            stream.token_ids.append(token)
            self._cache.append(token)
            stats.completion_tokens += 1
            text = decoder.push(token)
            if text:
                yield text
        tail = decoder.flush()
        if tail:
            yield tail

    def close(self) -> None:
        self._closed = True
