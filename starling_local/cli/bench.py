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
    b.add_argument("--json", type=Path, help="write the figures to this file")
    b.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from starling_local.acquire.library import resolve_model
    from starling_local.bench.runner import format_table, run_bench, write_json

    model = resolve_model(args.model) if args.model else None
    figures = run_bench(
        model,
        shape=args.shape,
        tokens=args.tokens,
        turns=args.turns,
        convert_shapes=tuple(args.convert),
        resume_tokens=args.resume_tokens,
        tui_tokens=args.tui_tokens,
        serve_tokens=args.serve_tokens,
        n_gpu_layers=args.gpu_layers,
    )
    print(format_table(figures))
    if args.json:
        write_json(figures, args.json)
    return 0
