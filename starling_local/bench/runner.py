"""`starling bench`: every figure in one run, printed as a table and optionally as JSON."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

from starling_local.bench.conversation import multi_turn
from starling_local.bench.decode import compare_decode, starling_decode
from starling_local.engine.runtime import Engine
from starling_local.files import human_bytes
from starling_local.paths import ensure, get_paths

# numpy is imported only inside the functions that need it, after llama.cpp has loaded its
# model: with some numpy builds (scipy-openblas64 on CUDA machines), importing numpy before
# llama.cpp loads a model onto the GPU crashes the load.


def synthetic_model(shape: str, quant: str = "Q4_K_M", directory: Path | None = None) -> Path:
    """A quantized synthetic model of `shape`, built once and kept in the cache."""
    import llama_cpp  # noqa: F401  (before numpy: see the note at the top)

    from starling_local.acquire.quantize import quantize
    from starling_local.acquire.synthetic import SHAPES, make_gguf

    folder = ensure(directory or get_paths().cache / "bench")
    final = folder / f"synthetic-{shape}-{quant.lower()}.gguf"
    if not final.exists():
        f16 = folder / f"synthetic-{shape}-f16.gguf"
        if not f16.exists():  # written atomically: if it exists, it is complete
            make_gguf(f16, SHAPES[shape])
        try:
            quantize(f16, final, quant)
        finally:
            f16.unlink(missing_ok=True)
    return final


def long_ask_figure(path: Path, n_gpu_layers: int | None, tokens: int, shape: str) -> float:
    """`ask`'s decode tokens/s over a `tokens`-long reply of a TUI text shape."""
    from starling_local.bench.tui import Replay, markdown_document

    engine = Engine(path, n_ctx=4096, n_gpu_layers=n_gpu_layers)
    try:
        if shape == "markdown":
            Replay.install(engine, markdown_document())
        return starling_decode(engine, tokens)
    finally:
        engine.close()


def run_bench(
    model: Path | None,
    *,
    shape: str = "0.5b",
    tokens: int = 128,
    turns: int = 10,
    convert_shapes: tuple[str, ...] = (),
    n_gpu_layers: int | None = None,
    resume_tokens: int = 2000,
    branch_tokens: int = 2000,
    tui_tokens: int = 2000,
    serve_tokens: int = 256,
    grammar_tokens: int = 128,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the benchmark sections and return the figures."""
    import tempfile

    from starling_local.bench.resume import resume_figures
    from starling_local.bench.system import conversion_peak, help_seconds

    path = model or synthetic_model(shape)
    engine = Engine(path, n_ctx=4096, n_gpu_layers=n_gpu_layers)
    figures: dict[str, Any] = {
        "model": str(path),
        "model_bytes": path.stat().st_size,
        "shape": None if model else shape,
        "backend": engine.backend,
        "n_gpu_layers": engine.n_gpu_layers,
        "threads": engine.n_threads,
        "machine": platform.processor() or platform.machine(),
    }
    decode = compare_decode(engine, n=tokens)
    figures["decode"] = asdict(decode)
    figures["multi_turn"] = [asdict(t) for t in multi_turn(engine, turns=turns)]
    if serve_tokens:
        from starling_local.bench.serve import serve_figures

        figures["serve"] = serve_figures(
            path, lambda n: starling_decode(engine, n), tokens=serve_tokens
        )
    if grammar_tokens:
        from starling_local.bench.grammar import grammar_figures

        figures["grammar"] = grammar_figures(engine, grammar_tokens)
    engine.close()
    if resume_tokens:
        figures["resume"] = resume_figures(path, resume_tokens)
    if branch_tokens:
        from starling_local.bench.branch import branch_figures

        figures["branch"] = branch_figures(path, branch_tokens)
    if tui_tokens:
        from starling_local.bench.tui import SHAPES, tui_figures

        figures["tui"] = {}
        for shape in SHAPES:
            # The TUI's reply is long, and decoding slows as the context grows: compare it with
            # the `ask` path over the same length and text, run just before and just after it
            # (this machine's speed drifts by a few percent over minutes).
            before = long_ask_figure(path, n_gpu_layers, tui_tokens, shape)
            with tempfile.TemporaryDirectory() as tmp:
                tui = tui_figures(path, tui_tokens, Path(tmp) / "bench.db", shape)
            after = long_ask_figure(path, n_gpu_layers, tui_tokens, shape)
            reference = (before + after) / 2
            tui["ask_tokens_per_s_before_after"] = [before, after]
            tui["ask_tokens_per_s"] = reference
            tui["ratio_to_ask"] = (tui.get("tui_decode_tokens_per_s") or 0.0) / reference
            figures["tui"][shape] = tui
    figures["help_seconds"] = help_seconds()
    figures["conversion"] = {s: conversion_peak(s) for s in convert_shapes}
    figures.update(extra or {})
    return figures


def format_table(f: dict[str, Any]) -> str:
    d = f["decode"]
    lines = [
        f"model     {f['model']} ({human_bytes(f['model_bytes'])}), {f['backend']}, "
        f"{f['threads']} threads, gpu layers {f['n_gpu_layers']}",
        "",
        "decode (greedy, tokens/s)       raw llama.cpp   starling   ratio",
        f"  {d['tokens']} tokens                    {d['raw_tokens_per_s']:>10.1f}"
        f"   {d['starling_tokens_per_s']:>8.1f}   {d['ratio']:.3f}",
        "",
        "multi-turn   turn  prompt  evaluated  new   TTFT ms",
    ]
    for t in f["multi_turn"]:
        lines.append(
            f"             {t['turn']:>4}  {t['prompt_tokens']:>6}  {t['prompt_evaluated']:>9}"
            f"  {t['new_tokens']:>4}  {t['ttft_s'] * 1000:>8.1f}"
        )
    turns = f["multi_turn"]
    if len(turns) > 1 and turns[0]["ttft_s"] > 0:
        lines.append(
            f"  TTFT turn {turns[-1]['turn']} / turn 1: "
            f"{turns[-1]['ttft_s'] / turns[0]['ttft_s']:.2f}"
        )
    if "grammar" in f:
        g = f["grammar"]
        lines += [
            "",
            "JSON-schema grammar (greedy, decode tokens/s)   plain   grammar   ratio",
            f"  {g['constrained_tokens']} tokens{'':<34}{g['plain_tokens_per_s']:>7.1f}"
            f"   {g['grammar_tokens_per_s']:>7.1f}   {g['ratio']:.3f}",
        ]
    if "resume" in f:
        r = f["resume"]
        lines += [
            "",
            f"resume a {r['conversation_tokens']}-token conversation (TTFT ms, evaluated tokens)",
            f"  live                      {r['live']['ttft_s'] * 1000:>8.1f}"
            f"  {r['live']['prompt_evaluated']:>6}",
            f"  reopened, KV state file   {r['reopened_with_cache']['ttft_s'] * 1000:>8.1f}"
            f"  {r['reopened_with_cache']['prompt_evaluated']:>6}"
            f"   ({r['reopened_vs_live']:.2f}x live; state {human_bytes(r['state_file_bytes'])})",
            f"  reopened, full evaluation {r['reopened_without_cache']['ttft_s'] * 1000:>8.1f}"
            f"  {r['reopened_without_cache']['prompt_evaluated']:>6}"
            f"   ({r['full_vs_reopened']:.1f}x the cached reopen)",
        ]
        w = r.get("live_with_state_file")
        if w:
            lines.append(
                f"  live, state file on disk  {w['ttft_s'] * 1000:>8.1f}"
                f"  {w['prompt_evaluated']:>6}"
                f"   ({human_bytes(w['state_bytes_read'])} of state read; loading the whole "
                f"file each turn: {w['before_ttft_s'] * 1000:.1f} ms, "
                f"{human_bytes(w['before_state_bytes_read'])})"
            )
    if "branch" in f:
        b = f["branch"]
        lines += [
            "",
            f"branch a {b['parent_tokens']}-token conversation at message "
            f"{b['branch_at_message']} (TTFT ms from the fork, evaluated tokens)",
        ]
        for key, label in (
            ("parent_next", "the parent's next reply  "),
            ("branch_first", "branch, parent's live KV "),
            ("branch_from_saved_state", "branch, saved KV state   "),
            ("branch_without_kv", "branch, no KV state      "),
        ):
            lines.append(
                f"  {label}{b[key]['ttft_s'] * 1000:>8.1f}  {b[key]['prompt_evaluated']:>6}"
            )
    if "tui" in f:
        t = f["tui"]["paragraph"]
        lines += [
            "",
            f"TUI: interactive {t['interactive_s'] * 1000:.0f} ms, model loaded "
            f"{t['model_loaded_s'] * 1000:.0f} ms",
        ]
        for shape, t in f["tui"].items():
            lines.append(
                f"  {shape:<9} streamed {t['reply_tokens']} tokens at "
                f"{t['tui_decode_tokens_per_s']:.1f} tok/s, {t['ratio_to_ask']:.3f} of `ask` "
                f"over the same text ({t['ask_tokens_per_s']:.1f}: "
                f"{' before, '.join(f'{x:.1f}' for x in t['ask_tokens_per_s_before_after'])} "
                f"after); {t['redraws']} redraws, "
                f"render lag after the last token {(t['render_lag_s'] or 0) * 1000:.0f} ms, "
                f"{t['rendered_chars']}/{t['reply_chars']} chars on screen"
            )
    if "serve" in f:
        s = f["serve"]
        lines += [
            "",
            f"starling serve: streamed decode through HTTP {s['http_tokens_per_s']:.1f} tok/s vs "
            f"ask {s['ask_tokens_per_s']:.1f} ({s['tokens']} tokens; ratio {s['ratio']:.3f}, "
            "median of 3 paired rounds)",
            "  two clients alternating   client  turn  prompt  evaluated",
        ]
        for row in s["alternating"]:
            lines.append(
                f"                            {row['client']:>6}  {row['turn']:>4}"
                f"  {row['prompt_tokens']:>6}  {row['evaluated']:>9}"
            )
    lines += ["", f"starling --help: {f['help_seconds'] * 1000:.0f} ms"]
    for shape, c in f["conversion"].items():
        lines.append(
            f"convert {shape}: peak RSS {human_bytes(c['peak_rss_bytes'])} for a "
            f"{human_bytes(c['checkpoint_bytes'])} checkpoint ({c['seconds']:.1f} s)"
        )
    return "\n".join(lines)


def write_json(figures: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(figures, indent=2))
