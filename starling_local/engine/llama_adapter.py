"""The one place that reaches into llama-cpp-python's private parts.

`Llama` keeps its context (`_ctx`), its batch (`_batch`), its model (`_model`), its seed
(`_seed`) and the tokens in its KV cache (`input_ids`, `n_tokens`) as private
attributes, and builds its model parameters from `llama_model_default_params()` with no
argument for some of them. The engine needs all of these; they are checked here at import,
so an upgrade of llama-cpp-python that changes them fails with one line naming the versions
that work, never deep in a reply.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import llama_cpp
import llama_cpp._internals
import llama_cpp.llama_cpp as low

from starling_local.engine.compute import on_compute_thread
from starling_local.errors import StarlingError

#: The llama-cpp-python releases whose private attributes this module was written against.
SUPPORTED = ">=0.3.36,<0.4"

_LLAMA_INIT_ATTRIBUTES = ("_ctx", "_batch", "_model", "_seed", "n_tokens", "input_ids")
_LOW_LEVEL = (
    "llama_model_default_params",
    "llama_get_memory",
    "llama_memory_clear",
    "llama_decode",
    "llama_batch_get_one",
    "llama_state_seq_get_size",
    "llama_state_seq_get_data",
    "llama_state_seq_set_data",
    "llama_get_logits_ith",
)
_patch_lock = threading.Lock()


class IncompatibleLlamaError(StarlingError):
    """The installed llama-cpp-python lacks what the engine relies on."""


def missing_parts(llama_class: Any = None, module: Any = None) -> list[str]:
    """What the engine needs and `llama_class` / `module` do not have (empty: all is there)."""
    llama_class = llama_class or llama_cpp.Llama
    module = module or low
    init_names = set(llama_class.__init__.__code__.co_names)
    missing = [f"Llama.{a}" for a in _LLAMA_INIT_ATTRIBUTES if a not in init_names]
    missing += [name for name in _LOW_LEVEL if not hasattr(module, name)]
    if not hasattr(llama_cpp._internals.LlamaContext, "kv_cache_seq_rm"):
        missing.append("LlamaContext.kv_cache_seq_rm")
    for name in ("add_logit_bias", "add_penalties", "add_greedy", "add_dist"):
        if not hasattr(llama_cpp._internals.LlamaSampler, name):
            missing.append(f"LlamaSampler.{name}")
    return missing


def check_compatible(llama_class: Any = None, module: Any = None) -> None:
    """Fail with one line when llama-cpp-python is not a version the engine works with."""
    missing = missing_parts(llama_class, module)
    if missing:
        found = getattr(llama_cpp, "__version__", "unknown")
        raise IncompatibleLlamaError(
            f"starling-local needs llama-cpp-python {SUPPORTED} (installed: {found}, which has "
            f"no {missing[0]}): pip install 'llama-cpp-python{SUPPORTED}'"
        )


check_compatible()


def version() -> str:
    return str(llama_cpp.__version__)


@contextlib.contextmanager
def model_defaults(**fields: Any) -> Iterator[None]:
    """Make `llama_model_default_params()` return `fields` changed while the block runs (for
    parameters `Llama` has no argument for, such as `use_extra_bufts`)."""
    original = low.llama_model_default_params

    def patched() -> Any:
        params = original()
        for key, value in fields.items():
            setattr(params, key, value)
        return params

    with _patch_lock:
        low.llama_model_default_params = patched
        try:
            yield
        finally:
            low.llama_model_default_params = original


def context_pointer(llm: Any) -> Any:
    """The `llama_context *` of a `Llama`."""
    return llm._ctx.ctx


def cached_tokens(llm: Any) -> list[int]:
    """The tokens whose keys and values are in the KV cache, in order."""
    return [int(t) for t in llm.input_ids[: llm.n_tokens]]


def n_cached(llm: Any) -> int:
    """How many tokens the KV cache holds."""
    return int(llm.n_tokens)


def clear_cache(llm: Any) -> None:
    """Empty the KV cache."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(context_pointer(llm)), True)
    llm.n_tokens = 0


def truncate_cache(llm: Any, n: int) -> None:
    """Keep only the first `n` cached tokens."""
    if n < llm.n_tokens:
        llm._ctx.kv_cache_seq_rm(-1, n, -1)
        llm.n_tokens = n


def warm_up(llm: Any) -> None:
    """Decode one token and forget it (page in the weights, set up the compute graphs)."""
    one = (llama_cpp.llama_token * 1)(1)
    on_compute_thread(
        llama_cpp.llama_decode, context_pointer(llm), llama_cpp.llama_batch_get_one(one, 1)
    )
    clear_cache(llm)


def read_seq_state(ctx: Any) -> tuple[Any, int]:
    """The KV cache of sequence 0 of the `llama_context *` `ctx`, as llama.cpp serializes it:
    (buffer, size)."""
    size = int(llama_cpp.llama_state_seq_get_size(ctx, 0))
    buffer = (ctypes.c_uint8 * size)()
    written = int(llama_cpp.llama_state_seq_get_data(ctx, buffer, size, 0))
    return buffer, written


def write_seq_state(ctx: Any, data: bytearray) -> bool:
    """Empty the KV cache of `ctx` and load `data` (from `read_seq_state`) as sequence 0;
    False (and an empty cache) if llama.cpp refuses it. llama.cpp trusts its lengths."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    buffer = (ctypes.c_uint8 * len(data)).from_buffer(data)
    if int(llama_cpp.llama_state_seq_set_data(ctx, buffer, len(data), 0)) <= 0:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        return False
    return True


def state_of(llm: Any) -> tuple[list[int], Any, int]:
    """The KV cache of sequence 0 as llama.cpp serializes it: (tokens, buffer, size)."""
    buffer, written = read_seq_state(context_pointer(llm))
    return cached_tokens(llm), buffer, written


def restore_state(llm: Any, tokens: Sequence[int], data: bytearray) -> bool:
    """Load a serialized sequence-0 cache holding `tokens`; False (and an empty cache) if
    llama.cpp refuses it. `data` must come from `state_of` of the same model and version:
    llama.cpp trusts its lengths."""
    clear_cache(llm)
    if not write_seq_state(context_pointer(llm), data):
        return False
    n = len(tokens)
    llm.input_ids[:n] = list(tokens)
    llm.n_tokens = n
    return True


def decode(llm: Any, tokens: Sequence[int], outputs: int = 1) -> None:
    """Evaluate `tokens` after the cached ones in one `llama_decode`, with logits for the last
    `outputs` of them (read them with `sample(llm, sampler, i)`, i = the token's index here)."""
    n_past = int(llm.n_tokens)
    n = len(tokens)
    llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
    batch = llm._batch.batch
    batch.n_tokens = n
    first_output = n - outputs
    for i, token in enumerate(tokens):
        batch.token[i] = token
        batch.pos[i] = n_past + i
        batch.seq_id[i][0] = 0
        batch.n_seq_id[i] = 1
        batch.logits[i] = i >= first_output
    on_compute_thread(llm._ctx.decode, llm._batch)
    llm.input_ids[n_past : n_past + n] = tokens
    llm.n_tokens = n_past + n


def logits_bytes(llm: Any, index: int) -> bytes:
    """The raw float32 logits of the `index`-th token of the last `decode` (for comparing two
    computations bit for bit)."""
    row = llama_cpp.llama_get_logits_ith(context_pointer(llm), index)
    return ctypes.string_at(row, 4 * int(llm.n_vocab()))


def max_batch(llm: Any) -> int:
    """The most tokens one `decode` call takes."""
    return int(llm.n_batch)


def make_sampler(
    llm: Any,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repeat_penalty: float,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    logit_bias: Sequence[tuple[int, float]] = (),
    grammar: str | None = None,
    repeat_last_n: int = 64,
) -> Any:
    """llama.cpp's sampler chain in the order its own `common_sampler` uses: logit bias,
    penalties (repeat, frequency, presence), then greedy at temperature 0, else top-k, typical,
    top-p, min-p, temperature, and a draw seeded by `Llama.set_seed`; with a grammar, checked as
    `common_sampler` checks it (see `GrammarSampler`). Close it with `.close()`. A grammar
    llama.cpp cannot parse raises ValueError."""
    sampler = llama_cpp._internals.LlamaSampler()
    rule = None
    try:
        if logit_bias:
            sampler.add_logit_bias(int(llm.n_vocab()), dict(logit_bias))
        sampler.add_penalties(
            n_vocab=int(llm.n_vocab()),
            penalty_last_n=int(llm.n_ctx()) if repeat_last_n < 0 else repeat_last_n,
            penalty_repeat=repeat_penalty,
            penalty_freq=frequency_penalty,
            penalty_present=presence_penalty,
        )
        if grammar is not None:
            # llama.cpp returns NULL for a grammar it cannot parse (LlamaSampler.add_grammar
            # would add the NULL to a chain).
            rule = llama_cpp.llama_sampler_init_grammar(
                llm._model.vocab, grammar.encode("utf-8"), b"root"
            )
            if not rule:
                raise ValueError("llama.cpp could not parse the grammar")
        if temperature == 0.0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(top_k)
            sampler.add_typical(1.0, 1)
            sampler.add_top_p(top_p, 1)
            sampler.add_min_p(min_p, 1)
            sampler.add_temp(temperature)
            sampler.add_dist(llm._seed)
    except BaseException:
        sampler.close()
        raise
    if rule is not None:
        return GrammarSampler(sampler, rule, int(llm.n_vocab()))
    return sampler


class GrammarSampler:
    """A sampler chain and a grammar, used as llama.cpp's `common_sampler_sample` uses them:
    sample with the chain alone, check that one token against the grammar, and only when the
    grammar refuses it apply the grammar to every candidate and sample again. The grammar's
    check of all 32k candidates is what costs; most tokens pass the single check. The token is
    then accepted by both (the chain's penalties and the grammar's state see it once)."""

    def __init__(self, chain: Any, rule: Any, n_vocab: int) -> None:
        import numpy as np

        self._chain = chain
        self._rule = rule
        self._n_vocab = n_vocab
        self._data = (llama_cpp.llama_token_data * n_vocab)()
        dtype = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
        self._view = np.frombuffer(self._data, dtype=dtype)
        self._ids = np.arange(n_vocab, dtype=np.intc)
        self._one = (llama_cpp.llama_token_data * 1)()

    def _candidates(self, ctx: Any, idx: int) -> Any:
        import numpy as np

        row = llama_cpp.llama_get_logits_ith(ctx.ctx, idx)
        self._view["id"] = self._ids
        self._view["logit"] = np.ctypeslib.as_array(row, shape=(self._n_vocab,))
        self._view["p"] = 0.0
        return llama_cpp.llama_token_data_array(
            data=self._data, size=self._n_vocab, selected=-1, sorted=False
        )

    def _pick(self, candidates: Any) -> int:
        llama_cpp.llama_sampler_apply(self._chain.sampler, ctypes.byref(candidates))
        return int(candidates.data[candidates.selected].id)

    def sample(self, ctx: Any, idx: int = -1) -> int:
        token = self._pick(self._candidates(ctx, idx))
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 1.0, 0.0
        single = llama_cpp.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self._rule, ctypes.byref(single))
        if single.data[0].logit == float("-inf"):  # refused: constrain every candidate
            candidates = self._candidates(ctx, idx)
            llama_cpp.llama_sampler_apply(self._rule, ctypes.byref(candidates))
            token = self._pick(candidates)
        llama_cpp.llama_sampler_accept(self._rule, token)
        llama_cpp.llama_sampler_accept(self._chain.sampler, token)
        return token

    def close(self) -> None:
        if self._rule is not None:
            llama_cpp.llama_sampler_free(self._rule)
            self._rule = None
        self._chain.close()


def detokenize(llm: Any, tokens: Sequence[int], special: bool = True) -> bytes:
    """The bytes of `tokens`, in time linear in their number (llama-cpp-python's own
    `detokenize` grows one bytes object token by token: quadratic). As it does, the space
    sentencepiece puts before the first word after BOS is dropped."""
    vocab = llm._model.vocab
    buffer = ctypes.create_string_buffer(256)
    pieces = []
    for token in tokens:
        n = int(llama_cpp.llama_token_to_piece(vocab, int(token), buffer, 256, 0, special))
        if n < 0:  # a piece longer than the buffer (none is, in Starling's vocabulary)
            big = ctypes.create_string_buffer(-n)
            n = int(llama_cpp.llama_token_to_piece(vocab, int(token), big, -n, 0, special))
            pieces.append(big.raw[:n])
        else:
            pieces.append(buffer.raw[:n])
    out = b"".join(pieces)
    if tokens and tokens[0] == int(llm.token_bos()) and out[:1] == b" ":
        out = out[1:]
    return out


def grammar_parses(llm: Any, grammar: str) -> bool:
    """Whether llama.cpp's grammar sampler takes `grammar` (GBNF) for this model."""
    rule = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode("utf-8"), b"root")
    if not rule:
        return False
    llama_cpp.llama_sampler_free(rule)
    return True


def logits_row(llm: Any, index: int) -> Any:
    """A copy of the float32 logits of the `index`-th token of the last `decode` (numpy)."""
    import numpy as np

    row = llama_cpp.llama_get_logits_ith(context_pointer(llm), index)
    return np.ctypeslib.as_array(row, shape=(int(llm.n_vocab()),)).copy()


def sample(llm: Any, sampler: Any, index: int) -> int:
    """Sample from the logits of the `index`-th token of the last `decode` (the sampler then
    counts the token as chosen, for its penalties)."""
    return int(sampler.sample(llm._ctx, index))
