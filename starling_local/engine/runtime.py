"""Loading a Starling GGUF and streaming replies from it.

The stream stops at `<|end_of_turn|>` (id 32000) whatever the file's eos says, keeps UTF-8 whole
across tokens, reuses the KV cache across turns, and reports what it did.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from starling_local.acquire.gguf_file import GGUFInfo, check_runnable
from starling_local.engine.system import (
    backend,
    extra_buffers_enabled,
    last_log_error,
    model_defaults,
    physical_cores,
    route_llama_log,
)
from starling_local.errors import StarlingError
from starling_local.paths import get_paths
from starling_local.vocab import END_OF_TURN_ID, EOS_ID

StopReason = Literal["end_of_turn", "length", "cancelled"]

#: llama.cpp's "pick a random seed" value.
RANDOM_SEED = 0xFFFFFFFF
DEFAULT_CTX = 8192


class EngineError(StarlingError):
    """The model could not be loaded or run."""


@dataclass
class SamplingParams:
    """How the next token is chosen. `temperature` 0 is greedy."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None
    stop_at_end_of_turn: bool = True
    """False only for benchmarks that must decode exactly `max_tokens` tokens."""


@dataclass
class GenerationStats:
    """What one reply cost."""

    prompt_tokens: int
    prompt_evaluated: int
    """Prompt tokens actually run through the model (the rest came from the KV cache)."""
    completion_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: StopReason = "end_of_turn"

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first one (the first one's time is the TTFT)."""
        if self.completion_tokens < 2 or self.decode_s <= 0:
            return 0.0
        return (self.completion_tokens - 1) / self.decode_s


@dataclass
class EngineStream:
    """An iterator of reply text chunks; `stats` and `text` are complete once it is exhausted."""

    _chunks: Iterator[str]
    stats: GenerationStats
    token_ids: list[int] = field(default_factory=list)
    text: str = ""

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        chunk = next(self._chunks)
        self.text += chunk
        return chunk

    def consume(self) -> str:
        """Run to the end and return the whole reply."""
        for _ in self:
            pass
        return self.text


class ReplyDecoder:
    """Token ids -> reply text: only whole UTF-8 characters (a character may span several byte
    tokens), without the leading space the template's `Assistant:` leaves to the model."""

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False

    def push(self, token: int) -> str:
        text: str = self._utf8.decode(self._piece(token))
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        return text

    def flush(self) -> str:
        text: str = self._utf8.decode(b"", final=True)
        return text if self._started else text.lstrip()


class Engine:
    """One loaded model and its llama.cpp context. One generation at a time."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        log_path: Path | None = None,
        vocab_only: bool = False,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        self.info: GGUFInfo = check_runnable(model_path)
        self.path = self.info.path
        self._lock = threading.Lock()
        log_path = log_path or get_paths().engine_log
        route_llama_log(log_path)
        import llama_cpp

        self.backend = backend()
        offload = llama_cpp.llama_supports_gpu_offload()
        if n_gpu_layers is None:
            n_gpu_layers = -1 if offload else 0
        self.n_threads = n_threads or physical_cores()
        trained = int(self.info.context_length or DEFAULT_CTX)
        overrides: dict[str, bool | int | float | str] = {}
        if self.info.eos_id != END_OF_TURN_ID:
            # Many third-party Starling GGUFs say eos 2 (`</s>`); the model ends turns with 32000.
            overrides["tokenizer.ggml.eos_token_id"] = END_OF_TURN_ID
        defaults: dict[str, Any] = {} if extra_buffers_enabled() else {"use_extra_bufts": False}
        if on_progress is not None:

            @llama_cpp.llama_progress_callback  # type: ignore[misc,untyped-decorator]
            def progress(fraction: float, user_data: Any) -> bool:
                on_progress(float(fraction))
                return True

            defaults["progress_callback"] = progress
        try:
            with model_defaults(**defaults):
                self._llm: Any = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=min(n_ctx or DEFAULT_CTX, trained),
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    n_gpu_layers=n_gpu_layers,
                    # llama.cpp's own default ("auto") turns it on for CPU, Metal and CUDA alike;
                    # here it decoded a 0.5B model 17% faster on 2 CPU cores.
                    flash_attn=True,
                    use_mmap=True,
                    verbose=False,
                    kv_overrides=overrides or None,
                    vocab_only=vocab_only,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            detail = last_log_error(log_path) or str(exc)
            raise EngineError(f"{self.path}: llama.cpp could not load the model: {detail}") from exc
        self.n_gpu_layers = n_gpu_layers
        self.n_ctx: int = self._llm.n_ctx()
        if not vocab_only:
            self._warm_up()
        self._stop_ids = frozenset({END_OF_TURN_ID, EOS_ID, int(self._llm.token_eos())})

    def _warm_up(self) -> None:
        """Decode one token and forget it: the first decode of a process pays for page-faulting
        the weights and setting up compute graphs; better at load time (in the background) than
        in the user's first reply."""
        import llama_cpp

        ctx = self._llm._ctx.ctx
        one = (llama_cpp.llama_token * 1)(1)
        llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1))
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        self._llm.n_tokens = 0

    # --- tokens -------------------------------------------------------------------------------

    def tokenize_text(self, text: str) -> list[int]:
        """Tokenize as plain text: no BOS, special-token texts stay text."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def reply_decoder(self) -> ReplyDecoder:
        """A decoder of this model's reply tokens."""
        return ReplyDecoder(lambda token: bytes(self._llm.detokenize([token])))

    def cached_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` are already in the KV cache."""
        llm = self._llm
        n = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], tokens, strict=False):
            if a != b:
                break
            n += 1
        return n

    # --- generation ---------------------------------------------------------------------------

    def generate(
        self,
        tokens: Sequence[int],
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
    ) -> EngineStream:
        """Stream a reply to the prompt `tokens` (which start with BOS)."""
        params = params or SamplingParams()
        if len(tokens) >= self.n_ctx:
            raise EngineError(
                f"the prompt is {len(tokens)} tokens; the context window is {self.n_ctx}"
            )
        cached = self.cached_prefix(tokens)
        # llama-cpp-python re-evaluates the last token when the whole prompt is cached.
        evaluated = len(tokens) - min(cached, len(tokens) - 1)
        stats = GenerationStats(prompt_tokens=len(tokens), prompt_evaluated=evaluated)
        stream = EngineStream(iter(()), stats)
        stream._chunks = self._run(list(tokens), params, cancel or threading.Event(), stream)
        return stream

    def _run(
        self,
        tokens: list[int],
        params: SamplingParams,
        cancel: threading.Event,
        stream: EngineStream,
    ) -> Iterator[str]:
        stats = stream.stats
        llm = self._llm
        budget = min(params.max_tokens, self.n_ctx - len(tokens))
        decoder = self.reply_decoder()
        stop_ids = self._stop_ids if params.stop_at_end_of_turn else frozenset()
        with self._lock:
            llm.set_seed(RANDOM_SEED if params.seed is None else params.seed & 0xFFFFFFFF)
            t0 = time.perf_counter()
            t_first = t0
            stats.stop_reason = "length"
            if budget <= 0:
                return
            generator = llm.generate(
                tokens,
                top_k=params.top_k,
                top_p=params.top_p,
                min_p=params.min_p,
                temp=params.temperature,
                repeat_penalty=params.repeat_penalty,
            )
            try:
                for token in generator:
                    now = time.perf_counter()
                    if stats.completion_tokens == 0:
                        t_first = now
                        stats.ttft_s = now - t0
                    if cancel.is_set():
                        stats.stop_reason = "cancelled"
                        break
                    if token in stop_ids:
                        stats.stop_reason = "end_of_turn"
                        break
                    stats.completion_tokens += 1
                    stats.decode_s = now - t_first
                    stream.token_ids.append(token)
                    text = decoder.push(token)
                    if text:
                        yield text
                    if stats.completion_tokens >= budget:
                        break
            finally:
                generator.close()
            tail = decoder.flush()
            if tail:
                yield tail

    # --- KV state on disk ----------------------------------------------------------------------

    def save_state(self, path: Path) -> int:
        """Write the KV cache (sequence 0) and its tokens to `path`; return the bytes written."""
        import llama_cpp

        with self._lock:
            llm = self._llm
            n = int(llm.n_tokens)
            if n == 0:
                return 0
            tokens = (llama_cpp.llama_token * n)(*llm.input_ids[:n])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
            written = int(
                llama_cpp.llama_state_seq_save_file(llm._ctx.ctx, str(tmp).encode(), 0, tokens, n)
            )
            if written <= 0:
                tmp.unlink(missing_ok=True)
                return 0
            os.replace(tmp, path)
            return written

    def load_state(self, path: Path) -> int:
        """Replace the KV cache with the one saved in `path`; return how many tokens it holds
        (0 if the file does not fit this context or is unreadable: the cache is then empty)."""
        import llama_cpp

        with self._lock:
            llm = self._llm
            ctx = llm._ctx.ctx
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            llm.n_tokens = 0
            capacity = self.n_ctx
            tokens = (llama_cpp.llama_token * capacity)()
            count = ctypes.c_size_t(0)
            read = llama_cpp.llama_state_seq_load_file(
                ctx, str(path).encode(), 0, tokens, capacity, ctypes.byref(count)
            )
            if read <= 0 or count.value == 0:
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
                return 0
            n = int(count.value)
            llm.input_ids[:n] = tokens[:n]
            llm.n_tokens = n
            return n

    def close(self) -> None:
        """Free the model and context now rather than at garbage collection."""
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None
