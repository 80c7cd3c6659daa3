"""Speculative (prompt-lookup) decoding against plain decoding on a real model, and the
batch-cost curves that decide whether drafting pays."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from starling_local.bench.prompts import BenchPrompt
from starling_local.engine.batch_cost import MOST_EXACT, BatchCost
from starling_local.engine.lookup import best_draft
from starling_local.engine.runtime import ChatFormat, Engine
from starling_local.engine.types import EngineError, SamplingParams
from starling_local.gguf.info import read_gguf

#: Starling's vocabulary: 32,000 Mistral tokens, `<|end_of_turn|>` and `<|pad_0|>`.
_STARLING_VOCAB = 32002


@dataclass
class PromptRun:
    title: str
    grounded: bool
    tokens: int
    speculative_tokens: int
    plain_s: float
    speculative_s: float
    plain_tokens_per_s: float
    speculative_tokens_per_s: float
    speedup: float
    draft_tokens: int
    accepted_tokens: int
    acceptance: float
    identical: bool
    first_difference: int | None
    default_plain_s: float | None = None
    """Plain decoding under the default attention settings (None where they are the same)."""
    default_tokens: int | None = None


def prompt_tokens(engine: Engine, prompt: BenchPrompt, starling: bool) -> list[int]:
    if not starling:
        return render_file_template(engine, prompt.messages)
    from starling_local.chat.prompts import fit_messages
    from starling_local.chat.settings import ConversationSettings
    from starling_local.chat.template import Message, Role

    roles: dict[str, Role] = {"system": "system", "user": "user", "assistant": "assistant"}
    messages = [Message(roles[m["role"]], m["content"]) for m in prompt.messages]
    return fit_messages(engine, messages, ConversationSettings()).tokens


def render_file_template(engine: Engine, messages: Sequence[dict[str, str]]) -> list[int]:
    """The prompt tokens of `messages` in the GGUF's own chat template, for the trained
    models that are not Starling (Starling's turns are built token-exactly by
    `chat.template`)."""
    import jinja2
    import jinja2.sandbox

    template = engine.info.chat_template
    if not template:
        raise EngineError(f"{engine.path}: the file has no chat template")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        text = env.from_string(template).render(
            messages=list(messages), add_generation_prompt=True, bos_token="", eos_token=""
        )
    except jinja2.TemplateError as exc:
        raise EngineError(f"{engine.path}: its chat template failed: {exc}") from exc
    return engine.tokenize(text, bos=True, special=True)


def _timed(engine: Engine, tokens: list[int], max_tokens: int) -> tuple[list[int], float, Any]:
    engine.clear_cache()  # both runs evaluate the whole prompt
    stream = engine.generate(tokens, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    start = time.perf_counter()
    stream.consume()
    return stream.token_ids, time.perf_counter() - start, stream.stats


#: Each prompt is decoded this many times each way, in turn; the best time of each counts (a
#: shared 2-core machine drifts by 10-20% over seconds to minutes).
ROUNDS = 2


def run_prompt(
    engine: Engine,
    prompt: BenchPrompt,
    tokens: list[int],
    max_tokens: int,
    default: tuple[Engine, list[int]] | None = None,
    rounds: int = ROUNDS,
) -> PromptRun:
    """Plain then speculative greedy decoding of one prompt (each from an empty cache), then
    plain decoding on `default` (another engine and its prompt tokens), `rounds` times."""
    plain_s = spec_s = default_s = float("inf")
    default_ids: list[int] = []
    for _ in range(rounds):
        engine.speculate = False
        plain_ids, seconds, _ = _timed(engine, tokens, max_tokens)
        plain_s = min(plain_s, seconds)
        engine.speculate = True
        spec_ids, seconds, stats = _timed(engine, tokens, max_tokens)
        spec_s = min(spec_s, seconds)
        if default is not None:
            default_ids, seconds, _ = _timed(default[0], default[1], max_tokens)
            default_s = min(default_s, seconds)
    diff = next(
        (i for i, (a, b) in enumerate(zip(plain_ids, spec_ids, strict=False)) if a != b),
        None if len(plain_ids) == len(spec_ids) else min(len(plain_ids), len(spec_ids)),
    )
    return PromptRun(
        title=prompt.title,
        grounded=prompt.grounded,
        tokens=len(plain_ids),
        speculative_tokens=len(spec_ids),
        plain_s=plain_s,
        speculative_s=spec_s,
        plain_tokens_per_s=len(plain_ids) / plain_s,
        speculative_tokens_per_s=len(spec_ids) / spec_s,
        # Throughput, not time: equal to the time ratio when the replies are identical, and
        # still meaningful when a near-tie made them differ in length.
        speedup=(len(spec_ids) / spec_s) / (len(plain_ids) / plain_s),
        draft_tokens=stats.draft_tokens,
        accepted_tokens=stats.accepted_tokens,
        acceptance=stats.acceptance,
        identical=diff is None,
        first_difference=diff,
        default_plain_s=default_s if default is not None else None,
        default_tokens=len(default_ids) if default is not None else None,
    )


def _totals(runs: list[PromptRun]) -> dict[str, Any]:
    drafted = sum(r.draft_tokens for r in runs)
    accepted = sum(r.accepted_tokens for r in runs)
    plain = sum(r.plain_s for r in runs)
    spec = sum(r.speculative_s for r in runs)
    tokens = sum(r.tokens for r in runs)
    spec_tokens = sum(r.speculative_tokens for r in runs)
    plain_rate = tokens / plain if plain else 0.0
    spec_rate = spec_tokens / spec if spec else 0.0
    default = [r for r in runs if r.default_plain_s]
    default_rate = (
        sum(r.default_tokens or 0 for r in default) / sum(r.default_plain_s or 0.0 for r in default)
        if default
        else plain_rate
    )
    return {
        "prompts": len(runs),
        "tokens": tokens,
        "plain_tokens_per_s": plain_rate,
        "speculative_tokens_per_s": spec_rate,
        "speedup": spec_rate / plain_rate if plain_rate else 0.0,
        "default_plain_tokens_per_s": default_rate,
        "speedup_vs_default": spec_rate / default_rate if default_rate else 0.0,
        "acceptance": accepted / drafted if drafted else 0.0,
        "accepted_share": accepted / spec_tokens if spec_tokens else 0.0,
        "identical": all(r.identical for r in runs),
        "identical_prompts": sum(r.identical for r in runs),
    }


def speculative_figures(
    path: Path,
    prompts: list[BenchPrompt],
    *,
    max_tokens: int = 256,
    n_gpu_layers: int | None = None,
    custom: bool = False,
) -> dict[str, Any]:
    """Every prompt plain and speculative; totals over the grounded ones (and the open ones
    apart, unless the set is the user's own: then the grounded ones are the total)."""
    starling = read_gguf(path).vocab_size == _STARLING_VOCAB
    fmt: ChatFormat = "starling" if starling else "file"
    # Constructed speculating: the attention it then uses (see `default_attention`) serves
    # both runs, so the comparison is of the decoding alone.
    engine = Engine(path, n_ctx=4096, n_gpu_layers=n_gpu_layers, chat_format=fmt, speculate=True)
    # And what a user switching `--speculate` on compares with: plain decoding under the
    # default settings, run right after each prompt's pair (machine noise drifts over minutes).
    default = Engine(path, n_ctx=4096, n_gpu_layers=n_gpu_layers, chat_format=fmt)
    defaults = {"flash_attn": default.flash_attn, "kv_type": default.kv_type}
    plain: Engine | None = default
    try:
        if (default.flash_attn, default.kv_type) == (engine.flash_attn, engine.kv_type):
            default.close()
            plain = None
        cost = engine.batch_cost(fresh=True)
        runs = []
        for p in prompts:
            other = (plain, prompt_tokens(plain, p, starling)) if plain is not None else None
            runs.append(
                run_prompt(engine, p, prompt_tokens(engine, p, starling), max_tokens, other)
            )
        figures: dict[str, Any] = {
            "model": str(path),
            "backend": engine.backend,
            "threads": engine.n_threads,
            "flash_attn": engine.flash_attn,
            "kv_type": engine.kv_type,
            "max_tokens": max_tokens,
            "batch_cost": cost.as_dict(),
            "default_settings": defaults,
            "runs": [asdict(r) for r in runs],
        }
    finally:
        engine.close()
        if plain is not None:
            plain.close()
    grounded = [r for r in runs if r.grounded]
    figures.update(_totals(grounded or runs))
    if not custom:
        figures["open"] = _totals([r for r in runs if not r.grounded])
    return figures


def curve_figures(
    path: Path, n_gpu_layers: int | None = None, tokens: int = 64, rounds: int = 3
) -> dict[str, Any]:
    """The batch-cost curve of one model, measured now, and decode speed with speculation on
    and off where drafts never match (a random-weight model): the median of `rounds` paired
    ratios, which speculation must keep near 1."""
    from starling_local.bench.decode import starling_decode

    engine = Engine(path, n_ctx=1024, n_gpu_layers=n_gpu_layers, speculate=True)
    try:
        figures = engine.batch_cost(fresh=True).as_dict() | {"backend": engine.backend}
        plain: list[float] = []
        spec: list[float] = []
        for _ in range(rounds):
            engine.speculate = False
            plain.append(starling_decode(engine, tokens))
            engine.speculate = True
            spec.append(starling_decode(engine, tokens))
        ratios = sorted(s / p for s, p in zip(spec, plain, strict=True))
        figures["no_match"] = {
            "tokens": tokens,
            "plain_tokens_per_s": max(plain),
            "speculative_tokens_per_s": max(spec),
            "ratio": ratios[len(ratios) // 2],
        }
    finally:
        engine.close()
    default = Engine(path, n_ctx=1024, n_gpu_layers=n_gpu_layers)
    try:  # plain decoding under the default attention settings (what `--speculate` changes)
        best = max(starling_decode(default, tokens) for _ in range(rounds))
        figures["no_match"]["default_plain_tokens_per_s"] = best
        figures["no_match"]["ratio_vs_default"] = max(spec) / best
    finally:
        default.close()
    return figures


def expected_speedups(
    curve: dict[str, Any], acceptances: tuple[float, ...]
) -> list[dict[str, Any]]:
    """For each per-token acceptance: the best draft length on this curve (within the largest
    exact batch, where it was measured) and its speedup."""
    cost = BatchCost(
        tuple(ms / 1000 for ms in curve.get("all_ms", curve["ms"])),
        sizes=tuple(curve.get("all_k", curve["k"])),
    ).relative()
    most = int(curve.get("exact_batch", MOST_EXACT)) - 1
    rows = []
    for p in acceptances:
        k, gain = best_draft(p, cost, most)
        rows.append({"acceptance": p, "draft": k, "speedup": round(gain, 3)})
    return rows


def format_speculative(f: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"speculative decoding (prompt lookup), {Path(f['model']).name}, {f['backend']}, "
        f"greedy, up to {f['max_tokens']} tokens",
        "  batch cost k="
        + "/".join(map(str, f["batch_cost"]["k"]))
        + ": "
        + " / ".join(f"{ms:.1f}" for ms in f["batch_cost"]["ms"])
        + " ms",
        "  prompt                                                        tokens  plain tok/s"
        "  spec tok/s  speedup  accepted/drafted  identical",
    ]
    for r in f["runs"]:
        mark = "" if r["grounded"] else " (open)"
        lines.append(
            f"  {(r['title'] + mark)[:60]:<60}  {r['tokens']:>6}  {r['plain_tokens_per_s']:>11.1f}"
            f"  {r['speculative_tokens_per_s']:>10.1f}  {r['speedup']:>7.2f}"
            f"  {r['accepted_tokens']:>8}/{r['draft_tokens']:<8}"
            f"  {'yes' if r['identical'] else 'NO'}"
        )
    lines.append(
        f"  grounded: speedup {f['speedup']:.3f}, acceptance {f['acceptance']:.2f}, "
        f"{f['accepted_share']:.0%} of tokens drafted, identical {f['identical_prompts']}/"
        f"{f['prompts']}"
    )
    d = f.get("default_settings")
    if d and "speedup_vs_default" in f:
        lines.append(
            f"  vs plain decoding under the default settings (flash attention "
            f"{'on' if d['flash_attn'] else 'off'}, KV {d['kv_type']}; speculative: "
            f"{'on' if f['flash_attn'] else 'off'}, {f.get('kv_type', 'f16')}): "
            f"{f['default_plain_tokens_per_s']:.1f} tok/s, speedup {f['speedup_vs_default']:.3f}"
        )
    if "open" in f and f["open"]["prompts"]:
        o = f["open"]
        lines.append(
            f"  open-ended: speedup {o['speedup']:.3f}, acceptance {o['acceptance']:.2f}, "
            f"identical {o['identical_prompts']}/{o['prompts']}"
        )
    return lines
