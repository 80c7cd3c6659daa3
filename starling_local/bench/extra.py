"""The benchmark sections behind `--speculative`, `--cost-shapes` and `--long-context`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starling_local.bench.kernels import format_kernels, kernel_figures
from starling_local.bench.long_context import CONFIGS, depth_figures, format_depths
from starling_local.bench.prompts import default_prompts, load_prompts
from starling_local.bench.speculative import (
    curve_figures,
    expected_speedups,
    format_speculative,
    speculative_figures,
)
from starling_local.errors import UsageError

#: Per-token acceptances for the "acceptance x cost curve -> expected speedup" table.
ACCEPTANCES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def run_extra(
    model: Path | None,
    *,
    speculative: bool,
    prompts: Path | None,
    tokens: int,
    cost_shapes: tuple[str, ...],
    long_context: tuple[str, ...] | None,
    depths: tuple[int, ...],
    n_gpu_layers: int | None,
    configs: tuple[str, ...] = tuple(CONFIGS),
    kernels: tuple[str, ...] = (),
    llama_bench: Path | None = None,
) -> dict[str, Any]:
    from starling_local.bench.runner import synthetic_model

    figures: dict[str, Any] = {}
    if speculative:
        if model is None:
            raise UsageError("--speculative needs --model PATH (a trained GGUF, e.g. SmolLM2)")
        chosen = load_prompts(prompts) if prompts else default_prompts()
        figures["speculative"] = speculative_figures(
            model,
            chosen,
            max_tokens=max(tokens, 64),
            n_gpu_layers=n_gpu_layers,
            custom=prompts is not None,
        )
    curves: dict[str, Any] = {}
    for shape in cost_shapes:
        curves[shape] = curve_figures(synthetic_model(shape), n_gpu_layers, tokens=min(tokens, 64))
    if speculative:
        curves[Path(figures["speculative"]["model"]).name] = figures["speculative"]["batch_cost"]
    if curves:
        figures["batch_cost"] = {
            name: curve | {"expected": expected_speedups(curve, ACCEPTANCES)}
            for name, curve in curves.items()
        }
    if long_context is not None:
        figures["long_context"] = {
            shape: depth_figures(
                synthetic_model(shape), depths, n_gpu_layers=n_gpu_layers, configs=configs
            )
            for shape in long_context
        }
    if kernels:
        figures["kernels"] = {
            shape: kernel_figures(
                synthetic_model(shape),
                llama_bench,
                tokens=tokens,
                rounds=5,
                n_gpu_layers=n_gpu_layers,
            )
            for shape in kernels
        }
    return figures


def format_extra(f: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "speculative" in f:
        lines += format_speculative(f["speculative"])
    if "batch_cost" in f:
        lines += [
            "",
            "batch cost (ms per llama_decode of k tokens) -> expected speedup by acceptance",
        ]
        header = "  model                      k=1/2/4/8/16 ms          exact" + "".join(
            f"   p={p:<4}" for p in ACCEPTANCES
        )
        lines.append(header)
        for name, c in f["batch_cost"].items():
            ms = "/".join(f"{v:.1f}" for v in c["ms"])
            gains = "".join(f"   {e['speedup']:>5.2f}x" for e in c["expected"])
            exact = c.get("exact_batch", "?")
            lines.append(f"  {name[:26]:<26} {ms:<24} {exact:>5}{gains}")
        lines.append("  (exact: the largest batch computed bit for bit as single tokens)")
        for name, c in f["batch_cost"].items():
            if "no_match" in c:
                n = c["no_match"]
                vs = (
                    f"; vs plain under the default settings "
                    f"{n['default_plain_tokens_per_s']:.1f} tok/s, {n['ratio_vs_default']:.3f}"
                    if "ratio_vs_default" in n
                    else ""
                )
                lines.append(
                    f"  {name}: no drafts match (random weights): speculative / plain decode "
                    f"{n['speculative_tokens_per_s']:.1f} / {n['plain_tokens_per_s']:.1f} tok/s, "
                    f"ratio {n['ratio']:.3f} (median of paired rounds){vs}"
                )
    for shape_figures in f.get("long_context", {}).values():
        lines += format_depths(shape_figures)
    if "kernels" in f:
        lines += format_kernels(f["kernels"])
    return lines
