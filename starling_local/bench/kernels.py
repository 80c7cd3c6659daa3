"""CPU kernels: decode and prompt evaluation against llama.cpp's own `llama-bench`.

llama-bench runs in its fastest configuration that does not crash here: repacked weights for
decode (`--repack 1`; on a machine whose AMX kernels crash, decode still runs, since a batch of
one takes the AVX-512 VNNI path), and for prompts `--repack 1` only where llama.cpp's whole list
of extra buffer types is usable (`--repack 0` where the AMX probe died). Same file, same threads,
same attention settings as the engine; rounds alternate the two programs and the ratio is the
median of the per-round ratios.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from starling_local.bench.decode import starling_decode
from starling_local.engine.runtime import Engine
from starling_local.engine.types import SamplingParams
from starling_local.errors import UsageError

PROMPT_TEXT = "The llama walked along the ridge and counted the stars above the valley. "


def default_llama_bench() -> Path | None:
    """Where `scripts/build_llama_server.sh` leaves llama-bench for this llama-cpp-python."""
    from starling_local.llamacpp.system import llama_cpp_version
    from starling_local.paths import get_paths

    cache = get_paths().cache.parent
    for root in (cache, Path.home() / ".cache" / "starling-local"):
        path = root / "llama-server" / llama_cpp_version() / "llama-bench"
        if path.exists():
            return path
    return None


def llama_bench_ts(binary: Path, args: list[str]) -> float:
    """llama-bench's average tokens/s for one test."""
    done = subprocess.run(
        [str(binary), *args, "-o", "json"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise RuntimeError(f"llama-bench {' '.join(args)}: {last}")
    rows = json.loads(done.stdout)
    return float(rows[0]["avg_ts"])


def starling_prompt(engine: Engine, n: int) -> float:
    """Prompt tokens/s of evaluating an `n`-token prompt from an empty cache (the engine's
    generate path, stopped after one token)."""
    ids = engine.tokenize_text(PROMPT_TEXT * (n // 10 + 1))[: n - 1]
    engine.clear_cache()
    start = time.perf_counter()
    stream = engine.generate([1, *ids], SamplingParams(temperature=0.0, max_tokens=1))
    stream.consume()
    evaluated = stream.stats.prompt_evaluated
    if evaluated != n:
        raise RuntimeError(f"the engine evaluated {evaluated} prompt tokens, not {n}")
    return n / (stream.stats.ttft_s or (time.perf_counter() - start))


def kernel_figures(
    path: Path,
    llama_bench: Path | None,
    *,
    tokens: int = 64,
    prompt: int = 512,
    rounds: int = 3,
    n_gpu_layers: int | None = None,
) -> dict[str, Any]:
    binary = llama_bench or default_llama_bench()
    if binary is None:
        raise UsageError(
            "no llama-bench: build it with `bash scripts/build_llama_server.sh` "
            "(it lands beside llama-server) or name one with --llama-bench"
        )
    engine = Engine(path, n_ctx=max(2048, prompt + 64), n_gpu_layers=n_gpu_layers)
    try:
        kernels = engine.cpu_kernels
        assert kernels is not None
        common = ["-m", str(path), "-t", str(engine.n_threads), "-r", "1", "--no-warmup",
                  "-fa", "1" if engine.flash_attn else "0",
                  "-ctk", engine.kv_type, "-ctv", engine.kv_type,
                  "-ngl", str(engine.n_gpu_layers)]  # fmt: skip
        prompt_repack = "1" if kernels.whole_list and kernels.repack else "0"
        decode_args = [*common, "-p", "0", "-n", str(tokens), "--repack", "1"]
        prompt_args = [*common, "-p", str(prompt), "-n", "0", "--repack", prompt_repack]
        starling_decode(engine, 8)  # warm: weights paged in, graphs built
        rows: dict[str, list[float]] = {k: [] for k in ("raw_tg", "ours_tg", "raw_pp", "ours_pp")}
        for _ in range(rounds):
            rows["raw_tg"].append(llama_bench_ts(binary, decode_args))
            rows["ours_tg"].append(starling_decode(engine, tokens))
            rows["raw_pp"].append(llama_bench_ts(binary, prompt_args))
            rows["ours_pp"].append(starling_prompt(engine, prompt))
    finally:
        engine.close()

    def median_ratio(ours: list[float], raw: list[float]) -> float:
        ratios = sorted(o / r for o, r in zip(ours, raw, strict=True))
        return ratios[len(ratios) // 2]

    return {
        "model": str(path),
        "model_bytes": path.stat().st_size,
        "kernels": kernels.describe(),
        "extra_buffer_types": list(kernels.buffer_types),
        "available": list(kernels.available),
        "llama_bench": {"decode": " ".join(decode_args[2:]), "prompt": " ".join(prompt_args[2:])},
        "tokens": tokens,
        "prompt_tokens": prompt,
        "rounds": rounds,
        "decode": {
            "llama_bench_tokens_per_s": max(rows["raw_tg"]),
            "starling_tokens_per_s": max(rows["ours_tg"]),
            "ratio": median_ratio(rows["ours_tg"], rows["raw_tg"]),
            "rounds": {"llama_bench": rows["raw_tg"], "starling": rows["ours_tg"]},
        },
        "prompt": {
            "llama_bench_tokens_per_s": max(rows["raw_pp"]),
            "starling_tokens_per_s": max(rows["ours_pp"]),
            "ratio": median_ratio(rows["ours_pp"], rows["raw_pp"]),
            "rounds": {"llama_bench": rows["raw_pp"], "starling": rows["ours_pp"]},
        },
    }


def format_kernels(figures: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["", "CPU kernels vs llama-bench (same file, same run; ratio = median of rounds)"]
    for shape, f in figures.items():
        d, p = f["decode"], f["prompt"]
        lines += [
            f"  {shape}: {f['kernels']}",
            f"    decode {f['tokens']} tokens: llama-bench {d['llama_bench_tokens_per_s']:.2f} / "
            f"starling {d['starling_tokens_per_s']:.2f} tok/s, ratio {d['ratio']:.3f}",
            f"    prompt {f['prompt_tokens']} tokens: llama-bench "
            f"{p['llama_bench_tokens_per_s']:.2f} / starling {p['starling_tokens_per_s']:.2f} "
            f"tok/s, ratio {p['ratio']:.3f}",
        ]
    return lines
