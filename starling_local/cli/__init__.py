"""The `starling` command. Thin: it parses arguments and calls the same functions as the TUI.

Heavy modules (llama_cpp, textual, huggingface_hub) are imported inside the commands that need
them, so `starling --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from starling_local import __version__
from starling_local.cli import ask, bench, chat, history, models, serve, tools
from starling_local.errors import StarlingError

COMMAND_MODULES = (chat, ask, serve, history, models, tools, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starling",
        description="Run the Starling-LM-7B chat models locally, template-correct to the token.",
    )
    parser.add_argument("--version", action="version", version=f"starling-local {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `starling` console script."""
    from starling_local.cli.common import check_utf8_arguments

    parser = build_parser()
    try:
        check_utf8_arguments(list(sys.argv[1:] if argv is None else argv))
    except StarlingError as exc:
        print(f"starling: error: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        args.handler = chat.run  # `starling` alone opens the app
    try:
        return int(args.handler(args) or 0)
    except StarlingError as exc:
        print(f"starling: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("starling: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`starling ask ... | head`): not an error worth a traceback.
        sys.stderr.close()
        return 0
