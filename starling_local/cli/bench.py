"""`starling bench`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    b = sub.add_parser("bench", help="benchmark against raw llama.cpp on synthetic or real models")
    b.add_argument("--model", "-m", help="a real GGUF (default: a synthetic model of --shape)")
    b.add_argument("--shape", default="0.5b", choices=["tiny", "0.5b", "1b", "7b"])
    b.add_argument("--tokens", type=int, default=128, help="tokens decoded per speed run")
    b.add_argument("--turns", type=int, default=10)
    b.add_argument(
        "--convert",
        nargs="*",
        default=[],
        metavar="SHAPE",
        help="also measure converter peak memory on these shapes",
    )
    b.add_argument("--gpu-layers", type=int, default=None)
    b.add_argument(
        "--resume-tokens",
        type=int,
        default=2000,
        help="conversation size for the resume figures (0 skips)",
    )
    b.add_argument(
        "--branch-tokens",
        type=int,
        default=2000,
        help="parent conversation size for the branch figures (0 skips)",
    )
    b.add_argument(
        "--tui-tokens",
        type=int,
        default=2000,
        help="reply length for the TUI streaming figures (0 skips)",
    )
    b.add_argument(
        "--serve-tokens",
        type=int,
        default=256,
        help="reply length for the starling serve figures (0 skips)",
    )
    b.add_argument(
        "--grammar-tokens",
        type=int,
        default=128,
        help="reply length for the JSON-schema grammar figures (0 skips)",
    )
    b.add_argument(
        "--speculative",
        action="store_true",
        help="speculative vs plain decoding on --model (any llama-architecture GGUF, prompts in "
        "its own chat template): speedup, acceptance, identical ids",
    )
    b.add_argument(
        "--prompts",
        type=Path,
        help='with --speculative: a JSON list of {"messages": [...], "grounded": true|false}',
    )
    b.add_argument(
        "--cost-shapes",
        nargs="*",
        default=[],
        metavar="SHAPE",
        help="batch-cost curves (k = 1, 2, 4, 8, 16) of these synthetic shapes",
    )
    b.add_argument(
        "--long-context",
        nargs="*",
        metavar="SHAPE",
        help="decode and prompt speed at --depths on these shapes (default: --shape), flash "
        "attention on/off, KV cache f16/q8_0",
    )
    b.add_argument(
        "--depths",
        type=depth_list,
        default=(0, 2048, 4096, 7936),
        help="comma-separated depths for --long-context (at most the context window less "
        "the decoded tokens: Starling's window is 8192)",
    )
    b.add_argument(
        "--attention",
        default="fa-f16,nofa-f16,fa-q8_0",
        help="comma-separated configurations for --long-context: fa-f16, nofa-f16, fa-q8_0",
    )
    b.add_argument(
        "--kernels",
        nargs="*",
        default=[],
        choices=["tiny", "0.5b", "1b", "7b"],
        metavar="SHAPE",
        help="decode and prompt speed on these synthetic shapes against llama.cpp's llama-bench "
        "(same file, same run), with the CPU kernels the AMX probe chose",
    )
    b.add_argument(
        "--llama-bench",
        type=Path,
        help="the llama-bench binary for --kernels (default: the one "
        "scripts/build_llama_server.sh built for this llama-cpp-python)",
    )
    b.add_argument(
        "--all",
        action="store_true",
        help="with --speculative/--long-context/--cost-shapes/--kernels: also the other sections",
    )
    b.add_argument("--json", type=Path, help="write the figures to this file")
    b.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from starling_local.acquire.library import resolve_model
    from starling_local.bench.runner import format_table, run_bench, write_json

    model = resolve_model(args.model) if args.model else None
    if args.speculative or args.long_context is not None or args.cost_shapes or args.kernels:
        from starling_local.bench.extra import format_extra, run_extra

        extra = run_extra(
            model,
            speculative=args.speculative,
            prompts=args.prompts,
            tokens=args.tokens,
            cost_shapes=tuple(args.cost_shapes),
            long_context=None
            if args.long_context is None
            else tuple(args.long_context or [args.shape]),
            depths=args.depths,
            n_gpu_layers=args.gpu_layers,
            configs=attention_configs(args.attention),
            kernels=tuple(args.kernels),
            llama_bench=args.llama_bench,
        )
        if not args.all:
            print("\n".join(format_extra(extra)).strip("\n"))
            if args.json:
                write_json(extra, args.json)
            return 0
    else:
        extra = {}
    figures = run_bench(
        model,
        shape=args.shape,
        tokens=args.tokens,
        turns=args.turns,
        convert_shapes=tuple(args.convert),
        resume_tokens=args.resume_tokens,
        branch_tokens=args.branch_tokens,
        tui_tokens=args.tui_tokens,
        serve_tokens=args.serve_tokens,
        grammar_tokens=args.grammar_tokens,
        n_gpu_layers=args.gpu_layers,
        extra=extra,
    )
    print(format_table(figures))
    if args.json:
        write_json(figures, args.json)
    return 0


def attention_configs(text: str) -> tuple[str, ...]:
    from starling_local.bench.long_context import CONFIGS
    from starling_local.errors import UsageError

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise UsageError(f"--attention: choose from {', '.join(CONFIGS)}")
    return names


def depth_list(text: str) -> tuple[int, ...]:
    """`0,2048,4096`: token depths, none negative."""
    try:
        depths = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None
    if not depths or min(depths) < 0:
        raise argparse.ArgumentTypeError(f"depths must be 0 or more: {text!r}")
    return depths
