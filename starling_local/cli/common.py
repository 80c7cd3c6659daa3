"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse

from starling_local.errors import UsageError


def add_model_option(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--model",
        "-m",
        metavar="MODEL",
        help="a GGUF path or a model name (default: $STARLING_MODEL, then the library's default)",
        required=required,
    )


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--ctx", type=int, default=None, help="context window in tokens (default 8192)"
    )
    group.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: physical cores)"
    )
    group.add_argument(
        "--gpu-layers",
        type=int,
        default=None,
        help="layers to offload to the GPU (default: all when the build supports it)",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def read_stdin_text(what: str) -> str:
    import sys

    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError(f"no {what} given (pass it as an argument or on standard input)")
    return sys.stdin.read()
