"""Decode and prompt speed as a conversation grows, with flash attention on and off and the
KV cache in f16 and q8_0: the figures behind the engine's defaults."""

from __future__ import annotations

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


def depth_figures(
    path: Path,
    depths: tuple[int, ...] = (0, 2048, 4096, 7936),
    tokens: int = 32,
    n_gpu_layers: int | None = None,
    configs: tuple[str, ...] = tuple(CONFIGS),
) -> dict[str, Any]:
    """For each configuration: decode tokens/s after `depth` cached tokens, and prompt tokens/s
    of the last chunk of 512 before that depth."""
    import llama_cpp

    rng = random.Random(0)
    filler = [rng.randrange(100, 30000) for _ in range(max(depths))]
    rows: list[dict[str, Any]] = []
    for flash_attn, kv_type in (CONFIGS[name] for name in configs):
        engine = Engine(
            path,
            n_ctx=max(depths) + tokens + 64,
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
                memory = llama_cpp.llama_get_memory(ctx)
                done = 0
                for depth in sorted(depths):
                    pp = 0.0
                    while done < max(depth, 1):
                        chunk = filler[done : min(max(depth, 1), done + _CHUNK)] or [1]
                        start = time.perf_counter()
                        on_compute_thread(_decode, ctx, chunk)
                        pp = len(chunk) / (time.perf_counter() - start)
                        done += len(chunk)
                    tg = on_compute_thread(_tg, ctx, tokens)
                    llama_cpp.llama_memory_seq_rm(memory, 0, done, -1)
                    rows.append(
                        {
                            "flash_attn": flash_attn,
                            "kv_type": kv_type,
                            "depth": depth,
                            "decode_tokens_per_s": round(tg, 2),
                            "prompt_tokens_per_s": round(pp, 1) if depth else None,
                        }
                    )
        finally:
            engine.close()
    for row in rows:
        base = next(
            r
            for r in rows
            if r["depth"] == min(depths)
            and (r["flash_attn"], r["kv_type"]) == (row["flash_attn"], row["kv_type"])
        )
        row["vs_depth_0"] = round(row["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
    return {"model": str(path), "tokens": tokens, "rows": rows}


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
