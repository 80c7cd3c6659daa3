"""`starling history`: list, show, search, export, import and remove saved conversations."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from starling_local.errors import UsageError


def register(sub: Any) -> None:
    h = sub.add_parser(
        "history", help="saved conversations: list, show, search, export, import, rm"
    )
    hs = h.add_subparsers(dest="history_command", metavar="ACTION")
    lst = hs.add_parser("list", help="conversations, newest first")
    lst.add_argument("--json", action="store_true")
    lst.add_argument("--limit", type=int, default=None)
    show = hs.add_parser("show", help="print a conversation")
    show.add_argument("id", type=int)
    find = hs.add_parser("search", help="full-text search of titles and messages")
    find.add_argument("text")
    find.add_argument("--json", action="store_true")
    exp = hs.add_parser("export", help="export a conversation as Markdown or JSON")
    exp.add_argument("id", type=int)
    exp.add_argument("--format", choices=["md", "json"], default="md")
    exp.add_argument("--output", "-o", type=Path, help="write to a file instead of stdout")
    rm = hs.add_parser("rm", help="delete a conversation")
    rm.add_argument("id", type=int)
    imp = hs.add_parser(
        "import",
        help="import conversations: a starling-local export, a ChatGPT conversations.json, "
        "or a JSON list of {role, content} messages",
    )
    imp.add_argument("file", type=Path)
    fork = hs.add_parser("fork", help="branch a conversation: a new one with its first N messages")
    fork.add_argument("id", type=int)
    fork.add_argument("--at", type=int, metavar="N", help="1-based message number (default: all)")
    fork.add_argument("--json", action="store_true")
    hs.add_parser("backup", help="back the history up now (one is made each day anyway)")
    hs.add_parser("backups", help="the backups, newest first")
    res = hs.add_parser(
        "restore", help="put a backup in place of the history (the current file is kept aside)"
    )
    res.add_argument("file", type=Path, nargs="?", help="a backup (default: the newest)")
    h.set_defaults(handler=run, history_parser=h)


def run(args: argparse.Namespace) -> int:
    from starling_local.chat.service import ConversationService
    from starling_local.store.conversations import ConversationStore

    action = args.history_command or "list"
    if action == "list" and not hasattr(args, "limit"):
        args.json, args.limit = False, None
    if action in ("backups", "restore"):  # these work on a damaged database too
        return _backups(action, args)
    service = ConversationService(ConversationStore())
    try:
        return _run(service, action, args)
    finally:
        service.close()


def _run(service: Any, action: str, args: argparse.Namespace) -> int:
    from starling_local.chat.transcripts import to_json, to_markdown

    store = service.store
    if action == "list":
        convs = store.conversations(args.limit)
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "id": c.id,
                            "title": c.title,
                            "updated": c.updated,
                            "mode": c.mode,
                            "model": c.model,
                        }
                        for c in convs
                    ],
                    indent=2,
                )
            )
        else:
            for c in convs:
                print(f"{c.id:>5}  {c.updated[:16].replace('T', ' ')}  {c.title or '(untitled)'}")
            if not convs:
                print("no saved conversations yet")
        return 0
    if action == "show":
        sys.stdout.write(to_markdown(store.get(args.id)) + "\n")
        return 0
    if action == "search":
        found = store.search(args.text)
        if args.json:
            print(
                json.dumps(
                    [
                        {"id": c.id, "title": c.title, "updated": c.updated, "snippet": snip}
                        for c, snip in found
                    ],
                    indent=2,
                )
            )
        else:
            for c, snip in found:
                print(f"{c.id:>5}  {c.title}\n       {snip}")
        return 0
    if action == "export":
        if args.format == "json":
            text = json.dumps(to_json(store.get(args.id)), indent=2, ensure_ascii=False)
        else:
            text = to_markdown(store.get(args.id))
        if args.output:
            args.output.write_text(text + "\n", encoding="utf-8")
        else:
            sys.stdout.write(text + "\n")
        return 0
    if action == "rm":
        service.delete(args.id)
        print(f"deleted conversation {args.id}")
        return 0
    if action == "import":
        for conv in service.import_file(args.file):
            print(f"imported as conversation {conv.id}: {conv.title}")
        return 0
    if action == "fork":
        branch = service.fork(args.id, args.at)
        print(json.dumps({"conversation_id": branch.id}) if args.json else branch.id)
        return 0
    if action == "backup":
        from starling_local.store.backups import make_backup

        print(make_backup(service.store.path))
        return 0
    raise UsageError(f"unknown history action {action!r}")


def _backups(action: str, args: argparse.Namespace) -> int:
    from starling_local.files import human_bytes
    from starling_local.paths import get_paths
    from starling_local.store.backups import backups, restore

    database = get_paths().database
    if action == "backups":
        found = backups(database)
        if not found:
            print(f"no backups yet (they go to {database.parent / 'backups'})")
        for b in found:
            print(f"{b.made:%Y-%m-%d %H:%M:%S}  {human_bytes(b.size):>10}  {b.path}")
        return 0
    done = restore(database, args.file)
    for path, why in done.passed_over:
        print(f"passed over {path.name}: {why}", file=sys.stderr)
    print(f"restored {done.used}")
    if done.aside is not None:
        print(f"the previous file is kept as {done.aside}", file=sys.stderr)
    return 0
