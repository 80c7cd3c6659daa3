"""The README's benchmark tables, made from the figures `starling bench --json` wrote.

Each table sits between `<!-- bench-table: NAME -->` and `<!-- /bench-table -->` in README.md
and is made here from files in `bench-results/`; nothing inside those markers is edited by
hand. After a new bench run, save its JSON under `bench-results/` and run this script.

    python scripts/readme_tables.py           rewrite the tables in README.md
    python scripts/readme_tables.py --check   exit 1, naming the stale tables, if any differ
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench-results"
README = ROOT / "README.md"

BLOCK = re.compile(
    r"(<!-- bench-table: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /bench-table -->)",
    re.DOTALL,
)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESULTS / name).read_text(encoding="utf-8"))
    return data


def n(value: float, digits: int = 1) -> str:
    """A figure with thousands separators: 7480.2 -> '7,480.2'."""
    return f"{value:,.{digits}f}"


def ms(seconds: float) -> str:
    return n(seconds * 1000)


def mib(size: float) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def multi_turn(turns: list[dict[str, Any]]) -> str:
    first, last = turns[0], turns[-1]
    later = [t["prompt_evaluated"] for t in turns[1:]]
    return (
        f"{ms(first['ttft_s'])} → {ms(last['ttft_s'])} ms "
        f"({last['ttft_s'] / first['ttft_s']:.2f}x), {first['prompt_evaluated']} then "
        f"{min(later)}–{max(later)} tokens evaluated per turn"
    )


# --- the tables ------------------------------------------------------------------------------


def cuda_decode() -> str:
    rows = []
    for label, name in (("7B-shaped Q4_K_M", "h200-cuda-7b.json"),
                        ("0.5B-shaped Q4_K_M", "h200-cuda-0.5b.json")):  # fmt: skip
        f = load(name)
        d = f["decode"]
        rows.append(
            [
                label,
                f"{n(d['raw_tokens_per_s'])} tok/s",
                f"{n(d['starling_tokens_per_s'])} tok/s",
                f"{d['ratio']:.3f}",
                multi_turn(f["multi_turn"]),
            ]
        )
    head = [
        "model",
        "raw llama.cpp decode",
        "starling decode",
        "ratio",
        "multi-turn TTFT, turn 1 → last",
    ]
    return table(head, rows)


def cpu() -> str:
    f = load("cpu-2core-0.5b.json")
    d = f["decode"]
    rows = [
        [
            f"decode, raw llama.cpp / starling ({d['tokens']} tokens, median of 5 paired rounds)",
            f"{n(d['raw_tokens_per_s'])} / {n(d['starling_tokens_per_s'])} tok/s, "
            f"ratio **{d['ratio']:.3f}**",
        ],
        [
            f"multi-turn, {len(f['multi_turn'])} turns: TTFT turn 1 → last",
            multi_turn(f["multi_turn"]),
        ],
    ]
    if "resume" in f:
        r = f["resume"]
        rows.append(
            [
                f"resume a {n(r['conversation_tokens'], 0)}-token conversation: TTFT live / "
                "reopened in a new process with its KV state file / reopened without",
                f"{ms(r['live']['ttft_s'])} / {ms(r['reopened_with_cache']['ttft_s'])} / "
                f"{ms(r['reopened_without_cache']['ttft_s'])} ms ({r['reopened_vs_live']:.2f}x "
                f"live; without the file {r['full_vs_reopened']:.1f}x slower); tokens evaluated "
                f"{r['live']['prompt_evaluated']} / {r['reopened_with_cache']['prompt_evaluated']}"
                f" / {n(r['reopened_without_cache']['prompt_evaluated'], 0)}; state file "
                f"{mib(r['state_file_bytes'])}",
            ]
        )
        w = r["live_with_state_file"]
        rows.append(
            [
                "the live turn with its KV state file on disk: state bytes read, TTFT",
                f"{w['state_bytes_read']} bytes, {ms(w['ttft_s'])} ms (loading the whole "
                f"{mib(w['before_state_bytes_read'])} file each turn: {ms(w['before_ttft_s'])} ms)",
            ]
        )
    if "branch" in f:
        b = f["branch"]
        rows.append(
            [
                f"branch a {n(b['parent_tokens'], 0)}-token conversation at message "
                f"{b['branch_at_message']}, then its first reply: TTFT with the parent's live KV "
                "cache / from the saved KV state / with no KV state; the parent's own next reply",
                f"{ms(b['branch_first']['ttft_s'])} / {ms(b['branch_from_saved_state']['ttft_s'])}"
                f" / {ms(b['branch_without_kv']['ttft_s'])} ms; "
                f"{ms(b['parent_next']['ttft_s'])} ms (fork: {ms(b['fork_s'])} ms)",
            ]
        )
    if "tui" in f:
        for shape, t in f["tui"].items():
            rows.append(
                [
                    f"TUI, a {n(t['reply_tokens'], 0)}-token streamed {shape} reply: app / `ask` "
                    "over the same tokens (`ask` run just before and after the app)",
                    f"{n(t['tui_decode_tokens_per_s'])} / {n(t['ask_tokens_per_s'])} tok/s, "
                    f"**{t['ratio_to_ask']:.3f}** ({t['redraws']} redraws; on screen "
                    f"{ms(t['render_lag_s'])} ms after the last token); interactive in "
                    f"{n(t['interactive_s'] * 1000, 0)} ms, model loaded in "
                    f"{n(t['model_loaded_s'] * 1000, 0)} ms",
                ]
            )
    if "serve" in f:
        s = f["serve"]
        evaluated = sorted({turn["evaluated"] for turn in s["alternating"][2:]})
        rows += [
            [
                "`starling serve`: streamed decode through HTTP (SSE) / `ask` in-process "
                f"({s['tokens']} tokens, median of 3 paired rounds)",
                f"{n(s['http_tokens_per_s'])} / {n(s['ask_tokens_per_s'])} tok/s, "
                f"ratio **{s['ratio']:.3f}**",
            ],
            [
                "`starling serve`: two clients alternating between two conversations, tokens "
                "evaluated per turn after the first two",
                "–".join(dict.fromkeys(str(e) for e in (evaluated[0], evaluated[-1]))),
            ],
        ]
    if "grammar" in f:
        g = f["grammar"]
        rows.append(
            [
                f"decode with a JSON-schema grammar vs without (greedy, "
                f"{g['constrained_tokens']} tokens, median of paired rounds)",
                f"{n(g['grammar_tokens_per_s'])} / {n(g['plain_tokens_per_s'])} tok/s, "
                f"ratio **{g['ratio']:.3f}**",
            ]
        )
    rows.append(["`starling --help`", f"{ms(f['help_seconds'])} ms"])
    return table(["figure", "value"], rows)


def speculative_prompts() -> str:
    s = load("cpu-2core-speculative-long-context.json")["speculative"]
    rows = []
    for r in s["runs"]:
        default = r["default_tokens"] / r["default_plain_s"] if r.get("default_plain_s") else None
        rows.append(
            [
                r["title"] + ("" if r["grounded"] else " *(open-ended)*"),
                str(r["tokens"]),
                n(r["plain_tokens_per_s"]),
                n(r["speculative_tokens_per_s"]),
                f"{r['speedup']:.2f}",
                f"{r['accepted_tokens']} / {r['draft_tokens']}",
                n(default) if default else "",
                "yes" if r["identical"] else f"from token {r['first_difference']}",
            ]
        )
    grounded = [r for r in s["runs"] if r["grounded"]]
    o = s["open"]
    rows += [
        [
            f"**{len(grounded)} grounded prompts**",
            n(s["tokens"], 0),
            n(s["plain_tokens_per_s"]),
            n(s["speculative_tokens_per_s"]),
            f"**{s['speedup']:.3f}** ({s['speedup_vs_default']:.3f} vs the default settings)",
            f"acceptance {s['acceptance']:.2f}, {s['accepted_share']:.0%} of tokens drafted",
            n(s["default_plain_tokens_per_s"]),
            f"**{s['identical_prompts']} / {s['prompts']}**",
        ],
        [
            f"{o['prompts']} open-ended prompts",
            n(o["tokens"], 0),
            n(o["plain_tokens_per_s"]),
            n(o["speculative_tokens_per_s"]),
            f"{o['speedup']:.3f} ({o['speedup_vs_default']:.3f})",
            f"acceptance {o['acceptance']:.2f}",
            n(o["default_plain_tokens_per_s"]),
            f"{o['identical_prompts']} / {o['prompts']}",
        ],
    ]
    head = ["prompt", "tokens", "plain tok/s", "speculative tok/s", "speedup", "kept / drafted",
            "plain, default settings, tok/s", "identical"]  # fmt: skip
    return table(head, rows)


def batch_cost() -> str:
    sources = [
        ("cpu-2core-speculative-long-context.json", "2-core CPU"),
        ("h100-cuda-speculative.json", "H100 CUDA"),
    ]
    names = {"0.5b": "0.5B shape (Q4_K_M)", "7b": "7B shape (Q4_K_M)"}
    rows = []
    for file, machine in sources:
        for key, c in load(file)["batch_cost"].items():
            label = names.get(key, "SmolLM2-135M (Q4_1)")
            curve = " / ".join(n(v) for v in c["ms"])
            extra = {k: v for k, v in zip(c.get("all_k", []), c.get("all_ms", []), strict=True)}
            extra = {k: v for k, v in extra.items() if k not in c["k"]}
            if extra:
                curve += " (" + ", ".join(f"k={k}: {n(v)}" for k, v in extra.items()) + ")"
            expected = [f"{e['speedup']:.2f}x (k={e['draft']})" for e in c["expected"]]
            rows.append([f"{label}, {machine}", curve, str(c.get("exact_batch", "?")), *expected])
    acceptances = [
        str(e["acceptance"]) for e in load(sources[0][0])["batch_cost"]["7b"]["expected"]
    ]
    head = ["model, machine", "k = 1 / 2 / 4 / 8 / 16 ms", "exact",
            *[f"p = {a}" if i == 0 else a for i, a in enumerate(acceptances)]]  # fmt: skip
    return table(head, rows)


def long_context() -> str:
    sources = [
        ("cpu-2core-speculative-long-context.json", "2-core CPU"),
        ("h100-cuda-speculative.json", "H100 CUDA"),
    ]
    names = {"0.5b": "0.5B shape", "7b": "7B shape"}
    rows = []
    for file, machine in sources:
        for shape, lc in load(file)["long_context"].items():
            configs: dict[tuple[bool, str], dict[int, dict[str, Any]]] = {}
            for row in lc["rows"]:
                configs.setdefault((row["flash_attn"], row["kv_type"]), {})[row["depth"]] = row
            depths = sorted({row["depth"] for row in lc["rows"]})
            for (flash, kv), by_depth in configs.items():
                cells = []
                for depth in depths:
                    row = by_depth[depth]
                    speed = n(row["decode_tokens_per_s"])
                    cells.append(speed if depth == 0 else f"{speed} ({row['vs_depth_0']:.2f}x)")
                prompts = [by_depth[d]["prompt_tokens_per_s"] for d in depths if d]
                rows.append(
                    [
                        f"{names[shape]}, {machine}",
                        f"{'on' if flash else 'off'}, {kv}",
                        *cells,
                        f"{n(prompts[0])} / {n(prompts[-1])}",
                    ]
                )
    head = ["model, machine", "flash attention, KV", "depth 0", "2,048", "4,096", "7,936",
            "prompt tok/s at 2,048 / 7,936"]  # fmt: skip
    return table(head, rows)


def cpu_kernels() -> str:
    figures = load("cpu-2core-kernels.json")["kernels"]
    names = {"0.5b": "0.5B shape", "7b": "7B shape"}
    rows = []
    for shape, f in figures.items():
        d, p = f["decode"], f["prompt"]
        rows.append(
            [
                f"{names.get(shape, shape)}, Q4_K_M",
                f["kernels"],
                f"{n(d['llama_bench_tokens_per_s'])} / {n(d['starling_tokens_per_s'])} tok/s",
                f"**{d['ratio']:.3f}**",
                f"{n(p['llama_bench_tokens_per_s'])} / {n(p['starling_tokens_per_s'])} tok/s",
                f"**{p['ratio']:.3f}**",
            ]
        )
    tokens = next(iter(figures.values()))["tokens"]
    head = ["model", "CPU kernels (why)", f"decode, llama-bench / starling ({tokens} tokens)",
            "ratio", "prompt (512 tokens), llama-bench / starling", "ratio"]  # fmt: skip
    return table(head, rows)


TABLES: dict[str, Callable[[], str]] = {
    "cuda-decode": cuda_decode,
    "cpu": cpu,
    "speculative-prompts": speculative_prompts,
    "batch-cost": batch_cost,
    "long-context": long_context,
    "cpu-kernels": cpu_kernels,
}


def render(text: str) -> tuple[str, list[str]]:
    """`text` with every table made again, and the names of those that changed."""
    changed: list[str] = []
    found: set[str] = set()

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"readme_tables: README.md has an unknown table {name!r}")
        found.add(name)
        body = TABLES[name]()
        if body != match["body"]:
            changed.append(name)
        return match.group(1) + body + match.group(4)

    out = BLOCK.sub(fill, text)
    missing = set(TABLES) - found
    if missing:
        raise SystemExit(f"readme_tables: README.md lacks the table {sorted(missing)[0]!r}")
    return out, changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a table is stale")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    out, changed = render(text)
    if args.check:
        if changed:
            print(
                f"readme_tables: stale in README.md: {', '.join(changed)} "
                "(run python scripts/readme_tables.py)",
                file=sys.stderr,
            )
            return 1
        return 0
    README.write_text(out, encoding="utf-8")
    print(f"README.md: {len(changed)} of {len(TABLES)} tables rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
