"""What one `llama_decode` of k tokens costs on this machine, relative to one token.

Speculative decoding pays only where verifying k drafted tokens costs little more than decoding
one: on a GPU or Apple Silicon (memory-bound) a batch of 8 costs about one token, on a small
CPU 4-5 tokens. The engine measures the curve once per machine and model and keeps it in the
cache directory.
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


@dataclass(frozen=True)
class BatchCost:
    """Seconds per `llama_decode` of each of `SIZES` tokens (logits for all of them)."""

    seconds: tuple[float, ...]

    def relative(self, limit: int = 17) -> list[float]:
        """`r[n]`: a batch of n tokens relative to one (n = 0..limit, `r[1]` = 1),
        interpolated between the measured sizes and never decreasing."""
        base = self.seconds[0]
        points = [(size, s / base) for size, s in zip(SIZES, self.seconds, strict=True)]
        out = [0.0, 1.0]
        for n in range(2, limit + 1):
            value = points[-1][1] * n / points[-1][0]  # past the last size: linear from 0
            for (a, ra), (b, rb) in itertools.pairwise(points):
                if a <= n <= b:
                    value = ra + (rb - ra) * (n - a) / (b - a)
                    break
            out.append(max(value, out[-1]))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "k": list(SIZES),
            "ms": [round(s * 1000, 3) for s in self.seconds],
            "relative": [round(s / self.seconds[0], 3) for s in self.seconds],
        }


def measure(llm: Any, adapter: Any, repeats: int = _REPEATS) -> BatchCost:
    """Time a decode of each of `SIZES` tokens after `_CONTEXT` cached ones, the sizes taken
    in turn `repeats` times (machine noise hits all alike; the best time of each counts); the
    cache is empty afterwards."""
    tokens = [100 + i % 1000 for i in range(_CONTEXT + max(SIZES))]
    best = [float("inf")] * len(SIZES)
    adapter.clear_cache(llm)
    try:
        adapter.decode(llm, tokens[:_CONTEXT])
        for size in SIZES:  # a first decode of each size sets up its compute graph: not timed
            adapter.truncate_cache(llm, _CONTEXT)
            adapter.decode(llm, tokens[_CONTEXT : _CONTEXT + size], outputs=size)
        for _ in range(repeats):
            for i, size in enumerate(SIZES):
                adapter.truncate_cache(llm, _CONTEXT)
                start = time.perf_counter()
                adapter.decode(llm, tokens[_CONTEXT : _CONTEXT + size], outputs=size)
                best[i] = min(best[i], time.perf_counter() - start)
    finally:
        adapter.clear_cache(llm)
    return BatchCost(tuple(best))


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
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if len(seconds) != len(SIZES) or min(seconds) <= 0:
        return None
    return BatchCost(seconds)


def save_cached(path: Path, key: str, cost: BatchCost) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = {"seconds": list(cost.seconds), "measured": time.time()}
    try:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    except OSError:
        pass  # a read-only or full disk: measured again next time
