"""Decode and prompt speed as a conversation grows, with flash attention on and off and the
KV cache in f16 and q8_0: the figures behind the engine's defaults."""

from __future__ import annotations

import ctypes
import random
import time
from pathlib import Path
from typing import Any

from starling_local.engine.compute import on_compute_thread
from starling_local.engine.runtime import Engine
from starling_local.errors import UsageError

#: (flash attention, KV cache type) combinations llama.cpp allows (q8_0 needs flash attention),
#: by name.
CONFIGS = {"fa-f16": (True, "f16"), "nofa-f16": (False, "f16"), "fa-q8_0": (True, "q8_0")}
_CHUNK = 512


def _decode(ctx: Any, tokens: list[int]) -> None:
    import llama_cpp

    arr = (llama_cpp.llama_token * len(tokens))(*tokens)
    if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) != 0:
        raise RuntimeError("llama_decode failed")


def _tg(ctx: Any, n: int) -> float:
    """Tokens/s of `n` single-token decodes (greedy), then those tokens are forgotten."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_greedy()
    try:
        start = time.perf_counter()
        for _ in range(n):
            _decode(ctx, [llama_cpp.llama_sampler_sample(sampler, ctx, -1)])
        return n / (time.perf_counter() - start)
    finally:
        llama_cpp.llama_sampler_free(sampler)


def _state(ctx: Any) -> bytes:
    from starling_local.engine import llama_adapter

    buffer, size = llama_adapter.read_seq_state(ctx)
    return ctypes.string_at(buffer, size)


def _load(ctx: Any, data: bytes) -> None:
    from starling_local.engine import llama_adapter

    if not llama_adapter.write_seq_state(ctx, bytearray(data)):
        raise RuntimeError("llama.cpp refused the converted KV cache")


def n_head_kv(ctx: Any) -> int:
    import llama_cpp

    return int(llama_cpp.llama_model_n_head_kv(llama_cpp.llama_get_model(ctx)))


#: The configuration every depth's prompt is evaluated in once; the others load its cache,
#: converted (`kv_layout`). Its f16 cache converts to every other layout, and its prompts are
#: the fastest on both backends.
_SOURCE = "fa-f16"


def depth_figures(
    path: Path,
    depths: tuple[int, ...] = (0, 2048, 4096, 7936),
    tokens: int = 32,
    n_gpu_layers: int | None = None,
    configs: tuple[str, ...] = tuple(CONFIGS),
) -> dict[str, Any]:
    """For each configuration: decode tokens/s after `depth` cached tokens, and prompt tokens/s
    of the last chunk of (up to) 512 before that depth.

    The filler before that chunk is evaluated once, with flash attention and an f16 cache; each
    other configuration loads that cache, converted to its layout, then evaluates the same
    chunk and decodes from there, as it would have after evaluating everything itself."""
    rng = random.Random(0)
    filler = [rng.randrange(100, 30000) for _ in range(max(depths))]
    n_ctx = max(depths) + tokens + 64
    ordered = sorted(set(depths))
    # Each depth's chunk starts here; the cache before it is what the configurations share.
    chunk_start = {d: max(0, d - _CHUNK) for d in ordered}
    shared: dict[int, bytes] = {}
    figures: dict[str, dict[int, tuple[float, float]]] = {}
    for name in [_SOURCE, *(c for c in configs if c != _SOURCE)]:
        flash_attn, kv_type = CONFIGS[name]
        engine = Engine(
            path,
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            flash_attn=flash_attn,
            kv_type=kv_type,
            speculate=False,
        )
        try:
            if max(depths) + tokens >= engine.n_ctx:
                raise UsageError(
                    f"depth {max(depths)} and {tokens} decoded tokens do not fit the model's "
                    f"{engine.n_ctx}-token window"
                )
            with engine.raw_context() as ctx:
                figures[name] = on_compute_thread(
                    _measure, ctx, name, filler, ordered, chunk_start, shared, tokens
                )
        finally:
            engine.close()
    rows: list[dict[str, Any]] = []
    for name in configs:
        flash_attn, kv_type = CONFIGS[name]
        base = figures[name][ordered[0]][0]
        for depth in ordered:
            tg, pp = figures[name][depth]
            rows.append(
                {
                    "flash_attn": flash_attn,
                    "kv_type": kv_type,
                    "depth": depth,
                    "decode_tokens_per_s": round(tg, 2),
                    "prompt_tokens_per_s": round(pp, 1) if depth else None,
                    "vs_depth_0": round(tg / base, 3),
                }
            )
    return {
        "model": str(path),
        "tokens": tokens,
        "prompt_evaluated_once_in": _SOURCE,
        "rows": rows,
    }


def _measure(
    ctx: Any,
    name: str,
    filler: list[int],
    depths: list[int],
    chunk_start: dict[int, int],
    shared: dict[int, bytes],
    tokens: int,
) -> dict[int, tuple[float, float]]:
    """(decode tok/s, prompt tok/s) at each depth for the configuration `name` of `ctx`."""
    import llama_cpp

    from starling_local.bench import kv_layout

    memory = llama_cpp.llama_get_memory(ctx)
    flash_attn, kv_type = CONFIGS[name]
    out: dict[int, tuple[float, float]] = {}
    done = 0
    for depth in depths:
        start = chunk_start[depth]
        if name == _SOURCE:
            while done < start:
                chunk = filler[done : min(start, done + _CHUNK)]
                _decode(ctx, chunk)
                done += len(chunk)
            if start:
                shared[depth] = _state(ctx)
        elif start:
            state = shared[depth]
            if (flash_attn, kv_type) != CONFIGS[_SOURCE]:
                state = kv_layout.convert(
                    state, kv_type=kv_type, flash_attn=flash_attn, n_head_kv=n_head_kv(ctx)
                )
            _load(ctx, state)
        else:
            llama_cpp.llama_memory_clear(memory, True)
        chunk = filler[start:depth] or [1]
        begin = time.perf_counter()
        _decode(ctx, chunk)
        pp = len(chunk) / (time.perf_counter() - begin)
        tg = _tg(ctx, tokens)
        if name == _SOURCE:
            llama_cpp.llama_memory_seq_rm(memory, 0, start, -1)
            done = start
        out[depth] = (tg, pp)
    return out


def format_depths(f: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"long conversations, {Path(f['model']).name}: decode tok/s ({f['tokens']} tokens) "
        "and prompt tok/s at each depth",
        "  flash attn  KV     depth   decode   vs depth 0   prompt",
    ]
    for r in f["rows"]:
        pp = f"{r['prompt_tokens_per_s']:>8.1f}" if r["prompt_tokens_per_s"] else "       -"
        lines.append(
            f"  {'on ' if r['flash_attn'] else 'off'}         {r['kv_type']:<5}  {r['depth']:>6}"
            f"  {r['decode_tokens_per_s']:>7.1f}   {r['vs_depth_0']:>10.3f}  {pp}"
        )
    return lines
