"""`starling chat` (also what `starling` alone runs): the TUI."""

from __future__ import annotations

import argparse
from typing import Any

from starling_local.cli.common import (
    add_model_option,
    add_remote_options,
    add_speculate_option,
    engine_spec,
)


def register(sub: Any) -> None:
    c = sub.add_parser("chat", help="the chat app (also what `starling` alone opens)")
    add_model_option(c)
    c.add_argument("--conversation", type=int, metavar="ID", help="open saved conversation ID")
    c.add_argument("--ctx", type=int, default=None, help="context window in tokens (default 8192)")
    add_speculate_option(c)
    add_remote_options(c, ("--api-key", "--remote-api-key"))
    c.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from starling_local.tui.app import run_app

    conversation = getattr(args, "conversation", None)
    if conversation is not None:
        _check_conversation(conversation)  # one line and exit 2, before the app takes the screen
    run_app(engine_spec(args), conversation_id=conversation)
    return 0


def _check_conversation(conversation_id: int) -> None:
    """NotFoundError (a usage error) for an id the history does not have."""
    from starling_local.store.conversations import ConversationStore

    store = ConversationStore()
    try:
        store.get(conversation_id)
    finally:
        store.close()
