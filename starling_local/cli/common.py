"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from starling_local.errors import UsageError

if TYPE_CHECKING:
    from starling_local.chat.engines import EngineSpec


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
    group.add_argument(
        "--flash-attn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="llama.cpp's flash attention (default: off on a CPU, where long conversations "
        "decode faster without it; on on a GPU and with --speculate)",
    )
    group.add_argument(
        "--kv-type",
        choices=["f16", "q8_0"],
        default=None,
        help="KV cache element type; q8_0 halves the cache and needs flash attention "
        "(default: f16; q8_0 with --speculate on a CPU)",
    )
    add_speculate_option(group)


def add_speculate_option(parser: Any) -> None:
    parser.add_argument(
        "--speculate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="speculative decoding: tokens drafted from the conversation, verified by the model "
        "in one batch, faster where the reply repeats its context (code edits, quotes, "
        "reformatting). On a CPU it turns on flash attention and a q8_0 KV cache, the "
        "settings under which llama.cpp computes a batch exactly as single tokens: the reply "
        "is then token for token that of --no-speculate --flash-attn --kv-type q8_0 "
        "(default: off, or the app's saved choice)",
    )


def add_remote_options(parser: argparse.ArgumentParser, key_flags: tuple[str, ...]) -> None:
    group = parser.add_argument_group(
        "remote engine", "generate on another machine; history and template stay here"
    )
    group.add_argument(
        "--remote",
        metavar="URL",
        default=None,
        help="vLLM, llama-server or starling serve URL (default: $STARLING_REMOTE)",
    )
    group.add_argument("--remote-kind", choices=["auto", "openai", "llama-server"], default="auto")
    group.add_argument("--remote-model", metavar="NAME", help="the remote model (default: first)")
    group.add_argument(
        *key_flags,
        dest="remote_api_key",
        metavar="KEY",
        help="the remote engine's API key (default: $STARLING_REMOTE_API_KEY)",
    )


def engine_spec(args: argparse.Namespace, model: str | None = None) -> EngineSpec:
    """The engine the command line asks for (see `chat.engines.EngineSpec`)."""
    from starling_local.chat.engines import EngineSpec

    return EngineSpec(
        model=model if model is not None else getattr(args, "model", None),
        n_ctx=getattr(args, "ctx", None),
        n_threads=getattr(args, "threads", None),
        n_gpu_layers=getattr(args, "gpu_layers", None),
        remote=getattr(args, "remote", None),
        remote_kind=getattr(args, "remote_kind", "auto"),
        remote_model=getattr(args, "remote_model", None),
        remote_api_key=getattr(args, "remote_api_key", None),
        speculate=getattr(args, "speculate", None),
        flash_attn=getattr(args, "flash_attn", None),
        kv_type=getattr(args, "kv_type", None),
    ).with_env()


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
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = data[exc.start : exc.start + 1]
        raise UsageError(f"standard input is not UTF-8 text (byte {exc.start}: {byte!r})") from None


def check_utf8_arguments(argv: list[str]) -> None:
    """Refuse, in one line, command-line text that is not UTF-8 (Python hands such bytes over
    as lone surrogates, which no UTF-8 text can hold)."""
    for i, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise UsageError(f"argument {i} ({shown!r}) is not UTF-8 text") from None
