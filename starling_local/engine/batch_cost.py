"""What one `llama_decode` of k tokens costs on this machine, relative to one token, and up to
which k its logits are exactly those of decoding the k tokens one at a time.

Speculative decoding pays only where verifying k drafted tokens costs little more than decoding
one: on a GPU or Apple Silicon (memory-bound) a batch of 8 costs about one token, on a small
CPU 4-5 tokens. And it is exact only where a batch's logits are bit for bit a single token's:
llama.cpp picks its kernels by batch size (on x86, repacked Q4_K weights go through a 4-row
GEMM from 4 rows on, K-quants through a tiled GEMM from 8, F16 weights through llamafile's
GEMM from 2), so the limit depends on the machine, the build and the model's quant types.
The engine measures both once per machine and model and keeps them in the cache directory.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starling_local.files import atomic_output

#: The batch sizes measured (the rest are interpolated).
SIZES = (1, 2, 4, 8, 16)
#: Tokens in the cache while measuring (attention over nothing would flatter big batches).
_CONTEXT = 64
_REPEATS = 5
#: The largest batch checked for exactness (the pending token and 15 drafts).
MOST_EXACT = 16
#: Tokens in the cache during the exactness check: past 256, where llama.cpp's CPU attention
#: for a single token can change method (its view of the cache grows to 512).
_EXACT_CONTEXT = 260

#: Said when speculative decoding is on but `BatchCost.exact` is 1.
NO_EXACT_BATCH = (
    "speculative decoding drafted nothing: with this model on this machine, llama.cpp does not "
    "compute a batch's logits exactly as single tokens', so drafts could change the reply"
)

#: Below the largest exact batch, every size up to this one is timed too: costs are not smooth
#: between the sizes in `SIZES` (repacked Q4_K weights run batches under 4 rows one row at a
#: time: on the 7B shape a batch of 3 cost 2.4 tokens where 2 and 4 cost 1.8).
_EVERY_SIZE_UP_TO = 8


@dataclass(frozen=True)
class BatchCost:
    """Seconds per `llama_decode` of each of `sizes` tokens (logits for all of them), and the
    largest batch (up to `MOST_EXACT`) whose logits, like those of every smaller batch, are
    bit for bit those of decoding its tokens one at a time (1: no batch is)."""

    seconds: tuple[float, ...]
    exact: int = MOST_EXACT
    sizes: tuple[int, ...] = SIZES

    def relative(self, limit: int = 17) -> list[float]:
        """`r[n]`: a batch of n tokens relative to one (n = 0..limit, `r[1]` = 1),
        interpolated between the measured sizes and never decreasing."""
        base = self.seconds[0]
        points = [(size, s / base) for size, s in zip(self.sizes, self.seconds, strict=True)]
        out = [0.0, 1.0]
        for n in range(2, limit + 1):
            value = points[-1][1] * n / points[-1][0]  # past the last size: linear from 0
            for (a, ra), (b, rb) in itertools.pairwise(points):
                if a <= n <= b:
                    value = ra + (rb - ra) * (n - a) / (b - a)
                    break
            out.append(max(value, out[-1]))
        return out

    def at(self, size: int) -> float:
        """Seconds for a batch of `size` (one of `SIZES`)."""
        return self.seconds[self.sizes.index(size)]

    def as_dict(self) -> dict[str, Any]:
        """The `SIZES` figures (`k`, `ms`, `relative`), every size timed (`all_k`, `all_ms`),
        and the largest exact batch."""
        base = self.seconds[0]
        return {
            "k": list(SIZES),
            "ms": [round(self.at(k) * 1000, 3) for k in SIZES],
            "relative": [round(self.at(k) / base, 3) for k in SIZES],
            "all_k": list(self.sizes),
            "all_ms": [round(s * 1000, 3) for s in self.seconds],
            "exact_batch": self.exact,
        }


def measure(llm: Any, adapter: Any, repeats: int = _REPEATS) -> BatchCost:
    """The largest exact batch (see `exact_batch`), then the time of a decode of each of
    `SIZES` tokens and of every size up to the exact batch (at most `_EVERY_SIZE_UP_TO`),
    after `_CONTEXT` cached tokens, the sizes taken in turn `repeats` times (machine noise
    hits all alike; the best time of each counts); the cache is empty afterwards."""
    exact = exact_batch(llm, adapter)
    sizes = tuple(sorted({*SIZES, *range(1, min(exact, _EVERY_SIZE_UP_TO) + 1)}))
    tokens = [100 + i % 1000 for i in range(_CONTEXT + max(sizes))]
    best = [float("inf")] * len(sizes)
    adapter.clear_cache(llm)
    try:
        adapter.decode(llm, tokens[:_CONTEXT])
        for size in sizes:  # a first decode of each size sets up its compute graph: not timed
            adapter.truncate_cache(llm, _CONTEXT)
            adapter.decode(llm, tokens[_CONTEXT : _CONTEXT + size], outputs=size)
        for _ in range(repeats):
            for i, size in enumerate(sizes):
                adapter.truncate_cache(llm, _CONTEXT)
                start = time.perf_counter()
                adapter.decode(llm, tokens[_CONTEXT : _CONTEXT + size], outputs=size)
                best[i] = min(best[i], time.perf_counter() - start)
    finally:
        adapter.clear_cache(llm)
    return BatchCost(tuple(best), exact, sizes)


def exact_batch(llm: Any, adapter: Any, most: int = MOST_EXACT) -> int:
    """The largest n <= `most` such that decoding n tokens (and any fewer) in one batch gives
    logits bit-identical to decoding them one at a time, after `_EXACT_CONTEXT` cached
    tokens; the cache is empty afterwards."""
    most = min(most, adapter.max_batch(llm))
    tokens = [100 + (7 * i) % 1000 for i in range(_EXACT_CONTEXT + most)]
    context, probe = tokens[:_EXACT_CONTEXT], tokens[_EXACT_CONTEXT:]
    adapter.clear_cache(llm)
    try:
        for start in range(0, len(context), adapter.max_batch(llm)):
            adapter.decode(llm, context[start : start + adapter.max_batch(llm)], outputs=0)
        single = []
        for token in probe:
            adapter.decode(llm, [token], outputs=1)
            single.append(adapter.logits_bytes(llm, 0))
        exact = 1
        for n in range(2, most + 1):
            adapter.truncate_cache(llm, _EXACT_CONTEXT)
            adapter.decode(llm, probe[:n], outputs=n)
            if any(adapter.logits_bytes(llm, i) != single[i] for i in range(n)):
                break
            exact = n
    finally:
        adapter.clear_cache(llm)
    return exact


def cache_key(model_key: str, details: Sequence[object]) -> str:
    """The machine, the model and how it runs (threads, offload, backend, versions)."""
    parts = [
        platform.node(),
        platform.machine(),
        str(os.cpu_count()),
        model_key,
        *map(str, details),
    ]
    return "|".join(parts)


def load_cached(path: Path, key: str) -> BatchCost | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8")).get(key)
        seconds = tuple(float(s) for s in entry["seconds"])
        sizes = tuple(int(n) for n in entry["sizes"])
        exact = int(entry["exact"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if (
        len(seconds) != len(sizes)
        or not set(SIZES) <= set(sizes)
        or list(sizes) != sorted(set(sizes))
        or min(seconds) <= 0
        or not 1 <= exact <= MOST_EXACT
    ):
        return None
    return BatchCost(seconds, exact, sizes)


def save_cached(path: Path, key: str, cost: BatchCost) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = {
        "seconds": list(cost.seconds),
        "sizes": list(cost.sizes),
        "exact": cost.exact,
        "measured": time.time(),
    }
    try:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    except OSError:
        pass  # a read-only or full disk: measured again next time
