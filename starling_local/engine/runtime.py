"""Loading a Starling GGUF and streaming replies from it.

The stream stops at `<|end_of_turn|>` (id 32000) whatever the file's eos says, keeps UTF-8 whole
across tokens, reuses the KV cache across turns, and reports what it did.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from starling_local.engine.attention import KV_TYPES, default_attention
from starling_local.engine.batch_cost import BatchCost
from starling_local.engine.grammar import Grammar
from starling_local.engine.logprobs import token_logprob
from starling_local.engine.speculation import Speculation, decode_tokens
from starling_local.engine.types import (
    EngineClosedError,
    EngineError,
    EngineStream,
    KVSnapshot,
    ReplyDecoder,
    SamplingParams,
)
from starling_local.gguf.info import GGUFInfo, check_runnable
from starling_local.llamacpp.cpu_kernels import cpu_kernels
from starling_local.llamacpp.system import (
    backend,
    last_log_error,
    physical_cores,
    route_llama_log,
)
from starling_local.paths import get_paths
from starling_local.vocab import END_OF_TURN_ID, EOS_ID

#: Prompt tokens evaluated per `llama_decode` call, with a cancel check between calls.
PREFILL_CHUNK = 256

#: llama.cpp's "pick a random seed" value.
RANDOM_SEED = 0xFFFFFFFF
DEFAULT_CTX = 8192

ChatFormat = Literal["starling", "file"]
"""`starling`: turns end at `<|end_of_turn|>` whatever the file says; `file`: as the file says."""


def model_key(path: Path) -> str:
    """Identifies a model file (path, size, modification time) for KV state files."""
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


class Engine:
    """One loaded model and its llama.cpp context.

    Every public method may be called from any thread. Generations run one at a time (a second
    one waits for the first); tokenizing never waits for a generation. `close()` cancels a
    running generation, waits for it to leave llama.cpp, then frees the model.
    """

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
        speculate: bool = False,
        chat_format: ChatFormat = "starling",
        flash_attn: bool | None = None,
        kv_type: str | None = None,
    ) -> None:
        """`chat_format="file"` runs another llama-architecture GGUF as the file says (its own
        eos and chat template): for benchmarks that need a trained model."""
        starling = chat_format == "starling"
        self.info: GGUFInfo = check_runnable(model_path, starling=starling)
        self.path = self.info.path
        # `_context` guards the llama.cpp context (its KV cache): held by a generation for its
        # whole length, and by the KV state methods. `_model` guards the model's lifetime:
        # tokenizing takes only this one, so it never waits for a generation.
        self._context = threading.Lock()
        self._model = threading.Lock()
        self._state = threading.Lock()
        self._active: tuple[threading.Event, Iterator[str]] | None = None
        self._closing = False
        log_path = log_path or get_paths().engine_log
        route_llama_log(log_path)
        import llama_cpp

        from starling_local.engine import llama_adapter as adapter

        self._adapter = adapter
        self.backend = backend()
        offload = llama_cpp.llama_supports_gpu_offload()
        if n_gpu_layers is None:
            n_gpu_layers = -1 if offload else 0
        self.n_threads = n_threads or physical_cores()
        choice = default_attention(self.backend, speculate)
        self.kv_type = kv_type or (choice.kv_type if flash_attn is not False else "f16")
        self.flash_attn = (
            flash_attn if flash_attn is not None else choice.flash_attn or self.kv_type != "f16"
        )
        if self.kv_type not in KV_TYPES:
            choices = ", ".join(KV_TYPES)
            raise EngineError(f"KV cache type {self.kv_type!r}: choose one of {choices}")
        if self.kv_type != "f16" and not self.flash_attn:
            raise EngineError(f"a {self.kv_type} KV cache needs flash attention")
        # KV state files and caches hold attention-specific layouts: keyed by both.
        self.model_key = (
            f"{model_key(self.path)}-{'fa' if self.flash_attn else 'nofa'}-{self.kv_type}"
        )
        trained = int(self.info.context_length or DEFAULT_CTX)
        overrides: dict[str, bool | int | float | str] = {}
        if starling and self.info.eos_id != END_OF_TURN_ID:
            # Many third-party Starling GGUFs say eos 2 (`</s>`); the model ends turns with 32000.
            overrides["tokenizer.ggml.eos_token_id"] = END_OF_TURN_ID
        #: Which CPU kernels (AMX, repacked weights) the weights go to: probed, see cpu_kernels.
        self.cpu_kernels = None if vocab_only else cpu_kernels()
        defaults: dict[str, Any] = dict(self.cpu_kernels.model_params() if self.cpu_kernels else {})
        if on_progress is not None:

            @llama_cpp.llama_progress_callback  # type: ignore[untyped-decorator]
            def progress(fraction: float, user_data: Any) -> bool:
                on_progress(float(fraction))
                return True

            defaults["progress_callback"] = progress
        try:
            with adapter.model_defaults(**defaults):
                self._llm: Any = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=min(n_ctx or DEFAULT_CTX, trained),
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    n_gpu_layers=n_gpu_layers,
                    flash_attn=self.flash_attn,
                    type_k=KV_TYPES[self.kv_type],
                    type_v=KV_TYPES[self.kv_type],
                    use_mmap=True,
                    verbose=False,
                    kv_overrides=overrides or None,
                    vocab_only=vocab_only,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            detail = last_log_error(log_path) or str(exc)
            raise EngineError(f"{self.path}: llama.cpp could not load the model: {detail}") from exc
        self.n_gpu_layers = n_gpu_layers
        #: CPU threads kept busy while generating: the layers left on the CPU run on all of them.
        self.cpu_threads = self.n_threads if n_gpu_layers == 0 or not offload else 1
        self.n_ctx: int = self._llm.n_ctx()
        if not vocab_only:
            # The first decode of a process pays for page-faulting the weights and setting up
            # compute graphs: better at load time (in the background) than in the first reply.
            adapter.warm_up(self._llm)
        ends = {END_OF_TURN_ID, EOS_ID} if starling else {self.info.eot_id}
        self._stop_ids = frozenset(
            {int(self._llm.token_eos()), *(int(t) for t in ends if t is not None)}
        )
        self.speculate = speculate
        """Verify tokens drafted from the conversation itself in each decoding step: each token
        is still the model's own choice (see `speculation.decode_tokens`), in batches no larger
        than the machine computes exactly as single tokens (measured, see `batch_cost`); faster
        where the reply repeats its context. Off by default: on a CPU it needs flash attention and
        a q8_0 KV cache, which long conversations and long prompts pay for (see
        `default_attention`)."""
        self._speculation = Speculation(adapter, self.model_key, self._speculation_key())
        if self.speculate and not vocab_only:
            self._speculation.policy(self._llm)

    @property
    def closed(self) -> bool:
        return self._llm is None

    def _open_llm(self) -> Any:
        llm = self._llm
        if llm is None:
            raise EngineClosedError("the model has been unloaded")
        return llm

    # --- tokens -------------------------------------------------------------------------------

    def tokenize_text(self, text: str) -> list[int]:
        """Tokenize as plain text: no BOS, special-token texts stay text."""
        with self._model:
            llm = self._open_llm()
            return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for."""
        with self._model:
            return bytes(self._open_llm().detokenize([token]))

    def reply_decoder(self, raw: bool = False) -> ReplyDecoder:
        """A decoder of this model's reply tokens."""
        return ReplyDecoder(self.token_bytes, raw)

    def tokenize(self, text: str, *, bos: bool = False, special: bool = False) -> list[int]:
        """Tokenize `text`; `special` parses control-token texts such as `<|end_of_turn|>`."""
        with self._model:
            llm = self._open_llm()
            return list(llm.tokenize(text.encode("utf-8"), add_bos=bos, special=special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of `tokens` (control tokens written as their text)."""
        with self._model:
            data = self._adapter.detokenize(self._open_llm(), tokens, special=True)
        return data.decode("utf-8", errors="replace")

    def check_grammar(self, grammar: Grammar) -> None:
        """EngineError unless llama.cpp's grammar sampler takes `grammar`."""
        with self._model:
            if not self._adapter.grammar_parses(self._open_llm(), grammar.gbnf):
                raise EngineError("llama.cpp could not parse the grammar")

    @property
    def vocab_size(self) -> int:
        with self._model:
            return int(self._open_llm().n_vocab())

    def cached_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` are already in the KV cache."""
        with self._context:
            return self._cached_prefix(tokens)

    def _cached_prefix(self, tokens: Sequence[int]) -> int:
        n = 0
        for a, b in zip(self._adapter.cached_tokens(self._open_llm()), tokens, strict=False):
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
        *,
        stop_ids: Iterable[int] = (),
        raw: bool = False,
    ) -> EngineStream:
        """Stream a reply to the prompt `tokens` (which start with BOS). The generation starts
        (and waits for any other one to end) when the stream is first iterated. `stop_ids` end
        it too (stop reason `stop`); `raw` keeps a leading space (raw completions, a reply
        continued mid-text)."""
        params = params or SamplingParams()
        if self._closing:
            raise EngineClosedError("the model has been unloaded")
        stream = EngineStream.starting(tokens, self.n_ctx)
        stream._chunks = self._run(
            list(tokens), params, cancel or threading.Event(), stream, frozenset(stop_ids), raw
        )
        return stream

    def _run(
        self,
        tokens: list[int],
        params: SamplingParams,
        cancel: threading.Event,
        stream: EngineStream,
        stop_ids: frozenset[int],
        raw: bool,
    ) -> Iterator[str]:
        stats = stream.stats
        with self._context:
            if self._closing:
                raise EngineClosedError("the model has been unloaded")
            llm = self._open_llm()
            with self._state:
                self._active = (cancel, stream._chunks)
            try:
                yield from self._decode(llm, tokens, params, cancel, stream, stop_ids, raw)
            except GeneratorExit:  # closed from outside (see `close`)
                stats.stop_reason = "cancelled"
                raise
            finally:
                with self._state:
                    self._active = None

    def _decode(
        self,
        llm: Any,
        tokens: list[int],
        params: SamplingParams,
        cancel: threading.Event,
        stream: EngineStream,
        extra_stop_ids: frozenset[int],
        raw: bool,
    ) -> Iterator[str]:
        stats = stream.stats
        # The last prompt token is always evaluated again: its logits give the first token.
        reuse = min(self._cached_prefix(tokens), len(tokens) - 1)
        stats.prompt_evaluated = len(tokens) - reuse
        budget = min(params.max_tokens, self.n_ctx - len(tokens))
        decoder = self.reply_decoder(raw)
        end_ids = frozenset() if params.ignore_eos else self._stop_ids
        llm.set_seed(RANDOM_SEED if params.seed is None else params.seed & 0xFFFFFFFF)
        t0 = time.perf_counter()
        t_first = t0
        stats.stop_reason = "length"
        sampler = self._sampler(llm, params)
        if params.prompt_logprobs is not None:
            # Every prompt position's logits are needed: nothing comes from the cache.
            reuse = 0
            stats.prompt_evaluated = len(tokens)
        self._adapter.truncate_cache(llm, reuse)
        prefilled = (
            self._prefill_logprobs(llm, tokens, params.prompt_logprobs, cancel, stream)
            if params.prompt_logprobs is not None
            else self._prefill(llm, tokens[reuse:-1], cancel)
        )
        if not prefilled:
            sampler.close()
            stats.stop_reason = "cancelled"
            return
        if budget <= 0:
            sampler.close()
            return
        policy = self._speculation.policy(llm) if self.speculate else None
        generator = decode_tokens(
            self._adapter, llm, sampler, tokens, budget, policy, stats, params.logprobs
        )
        try:
            for token, logprob in generator:
                now = time.perf_counter()
                if stats.completion_tokens == 0:
                    t_first = now
                    stats.ttft_s = now - t0
                if cancel.is_set():
                    stats.stop_reason = "cancelled"
                    break
                if token in end_ids:
                    stats.stop_reason = "end_of_turn"
                    break
                if token in extra_stop_ids:
                    stats.stop_reason = "stop"
                    break
                stats.completion_tokens += 1
                stats.decode_s = now - t_first
                stream.token_ids.append(token)
                if logprob is not None:
                    stream.logprobs.append(logprob)
                text = decoder.push(token)
                if text:
                    yield text
                if stats.completion_tokens >= budget:
                    break
        finally:
            generator.close()
            sampler.close()
        tail = decoder.flush()
        if tail:
            yield tail

    def _speculation_key(self) -> tuple[object, ...]:
        """What the batch-cost curve depends on besides the model."""
        return (
            self.backend,
            self.n_threads,
            self.n_gpu_layers,
            self.flash_attn,
            self.kv_type,
            self._adapter.version(),
            # Which kernels a batch takes (and so the exact batch) depends on these too.
            f"extra-buffers={self.cpu_kernels.describe() if self.cpu_kernels else ''}",
            f"tiled={os.environ.get('GGML_CPU_TILED_MM', '')}",
        )

    def use_batch_cost(self, cost: BatchCost) -> None:
        """Draft as if decoding cost `cost` (tests and benchmarks: "what if the machine's
        curve were flat"); the acceptance seen so far is forgotten. The largest exact batch
        is never more than the measured one."""
        with self._context:
            self._speculation.use_cost(self._open_llm(), cost)

    def batch_cost(self, fresh: bool = False) -> BatchCost:
        """This machine's cost of one `llama_decode` of k tokens for this model (k = 1, 2, 4,
        8, 16); measured on first use (or now, if `fresh`), then cached per machine and model."""
        with self._context:
            return self._speculation.cost(self._open_llm(), fresh)

    def _sampler(self, llm: Any, params: SamplingParams) -> Any:
        try:
            return self._adapter.make_sampler(
                llm,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                min_p=params.min_p,
                repeat_penalty=params.repeat_penalty,
                repeat_last_n=params.repeat_last_n,
                frequency_penalty=params.frequency_penalty,
                presence_penalty=params.presence_penalty,
                logit_bias=params.logit_bias,
                grammar=params.grammar.gbnf if params.grammar else None,
            )
        except ValueError as exc:
            raise EngineError(f"the grammar was refused: {exc}") from None

    def _prefill_logprobs(
        self,
        llm: Any,
        tokens: list[int],
        top: int,
        cancel: threading.Event,
        stream: EngineStream,
    ) -> bool:
        """Evaluate all but the last of `tokens` from an empty cache with logits at every
        position, recording each next token's log-probability (the first token has none)."""
        stream.prompt_logprobs = [None]
        body = tokens[:-1]
        for start in range(0, len(body), PREFILL_CHUNK):
            if cancel.is_set():
                return False
            chunk = body[start : start + PREFILL_CHUNK]
            self._adapter.decode(llm, chunk, outputs=len(chunk))
            for i in range(len(chunk)):
                following = tokens[start + i + 1]
                row = self._adapter.logits_row(llm, i)
                stream.prompt_logprobs.append(token_logprob(row, following, top))
        return not cancel.is_set()

    def _prefill(self, llm: Any, tokens: list[int], cancel: threading.Event) -> bool:
        """Evaluate `tokens` after the cached ones a chunk at a time, checking `cancel` between
        chunks (a client that went away stops a long prompt evaluation too); False if
        cancelled."""
        for start in range(0, len(tokens), PREFILL_CHUNK):
            if cancel.is_set():
                return False
            self._adapter.decode(llm, tokens[start : start + PREFILL_CHUNK], outputs=0)
        return not cancel.is_set()

    # --- KV state in memory --------------------------------------------------------------------

    def snapshot(self) -> KVSnapshot | None:
        """A copy of the KV cache and its tokens (None when empty), to `restore` later."""
        with self._context:
            tokens, buffer, size = self._adapter.state_of(self._open_llm())
            if not tokens or size <= 0:
                return None
            return KVSnapshot(tuple(tokens), bytearray(memoryview(buffer).cast("B")[:size]))

    def restore(self, snapshot: KVSnapshot) -> int:
        """Make `snapshot` the KV cache; the tokens now cached (0 if llama.cpp refused it)."""
        with self._context:
            llm = self._open_llm()
            if len(snapshot.tokens) >= self.n_ctx:
                return 0
            ok = self._adapter.restore_state(llm, snapshot.tokens, bytearray(snapshot.payload))
            return len(snapshot.tokens) if ok else 0

    @property
    def cached_tokens(self) -> int:
        """How many tokens the KV cache holds."""
        with self._context:
            return len(self._adapter.cached_tokens(self._open_llm()))

    def clear_cache(self) -> None:
        """Forget the KV cache (the next prompt is evaluated from its first token)."""
        with self._context:
            self._adapter.clear_cache(self._open_llm())

    @contextlib.contextmanager
    def raw_context(self) -> Iterator[Any]:
        """The llama.cpp context pointer, for the benchmark's bare `llama_decode` loop: held
        exclusively, with an empty cache before and after."""
        with self._context:
            llm = self._open_llm()
            self._adapter.clear_cache(llm)
            try:
                yield self._adapter.context_pointer(llm)
            finally:
                self._adapter.clear_cache(llm)

    @property
    def eos_token_id(self) -> int:
        """The end-of-generation id llama.cpp uses (after any override at load)."""
        with self._model:
            return int(self._open_llm().token_eos())

    # --- KV state on disk ----------------------------------------------------------------------

    def save_state(self, path: Path) -> int:
        """Write the KV cache and its tokens to `path` (see `state_file`); return the bytes
        written (0 when the cache is empty)."""
        from starling_local.engine.state_file import write_state_file

        with self._context:
            llm = self._open_llm()
            tokens, buffer, size = self._adapter.state_of(llm)
            if not tokens or size <= 0:
                return 0
            return write_state_file(
                path,
                model=self.model_key,
                version=self._adapter.version(),
                tokens=tokens,
                payload=buffer,
                size=size,
            )

    def state_tokens(self, path: Path) -> list[int]:
        """The tokens the state file at `path` holds, read without its payload ([] if it is
        missing; a file this engine cannot load is deleted, as `load_state` deletes it)."""
        from starling_local.engine.state_file import StateFileError, read_state_tokens

        try:
            return read_state_tokens(path, model=self.model_key, version=self._adapter.version())
        except StateFileError:
            path.unlink(missing_ok=True)
            return []
        except OSError:
            return []

    def load_state(self, path: Path) -> int:
        """Replace the KV cache with the one saved in `path`; return how many tokens it holds.

        A file that is damaged, truncated, or made by another model or llama-cpp-python version
        is deleted without reaching llama.cpp, and 0 is returned (the cache is then empty and
        the history is evaluated instead)."""
        from starling_local.engine.state_file import StateFileError, read_state_file

        with self._context:
            llm = self._open_llm()
            try:  # read and checked before the live cache is touched
                tokens, payload = read_state_file(
                    path, model=self.model_key, version=self._adapter.version()
                )
            except FileNotFoundError:
                return 0
            except (StateFileError, OSError):
                path.unlink(missing_ok=True)
                return 0
            if len(tokens) >= self.n_ctx:
                path.unlink(missing_ok=True)
                return 0
            self._adapter.clear_cache(llm)
            if not self._adapter.restore_state(llm, tokens, payload):
                path.unlink(missing_ok=True)
                return 0
            return len(tokens)

    # --- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Cancel a running generation, wait for it to leave llama.cpp, then free the model and
        context. Safe to call twice, and from any thread."""
        with self._state:
            if self._llm is None:
                return
            self._closing = True
            active = self._active
        if active is not None:
            active[0].set()
        while not self._context.acquire(timeout=0.05):
            # The generation stops at its next token. If nobody is iterating its stream any
            # more it never gets there: close the suspended generator (it releases the lock).
            with self._state:
                active = self._active
            if active is not None:
                with contextlib.suppress(ValueError):  # ValueError: it is running: wait
                    active[1].close()  # type: ignore[attr-defined]
        try:
            with self._model:
                llm, self._llm = self._llm, None
                if llm is not None:
                    llm.close()
        finally:
            self._context.release()
