"""`starling ask` (one-shot reply) and `starling render` (show the exact prompt)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starling_local.chat.template import Message, Mode, SystemPolicy
from starling_local.cli.common import (
    add_engine_options,
    add_model_option,
    add_remote_options,
    engine_spec,
    positive_int,
    read_stdin_text,
)
from starling_local.config import environment
from starling_local.errors import StarlingError, UsageError

if TYPE_CHECKING:  # the chat layer is imported when a command runs: `starling --help` stays fast
    from starling_local.chat.service import ReplyStart
    from starling_local.chat.settings import ConversationSettings
    from starling_local.store.models import Conversation


def register(sub: Any) -> None:
    p = sub.add_parser("ask", help="one-shot reply, streamed to stdout")
    p.add_argument("prompt", nargs="?", help="the message (default or '-': read standard input)")
    add_model_option(p)
    _add_style_options(p)
    sampling = p.add_argument_group(
        "sampling", "default: the conversation's saved settings; given ones are saved with it"
    )
    sampling.add_argument("--max-tokens", type=positive_int, default=None, help="default 1024")
    sampling.add_argument("--temperature", type=float, default=None, help="default 0.7")
    sampling.add_argument("--top-p", type=float, default=None, help="default 0.95")
    sampling.add_argument("--top-k", type=int, default=None, help="default 40")
    sampling.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    sampling.add_argument(
        "--repeat-penalty", type=float, default=None, help="llama.cpp's (default 1.0: off)"
    )
    sampling.add_argument(
        "--frequency-penalty", type=float, default=None, help="-2 to 2, as OpenAI's (default 0)"
    )
    sampling.add_argument(
        "--presence-penalty", type=float, default=None, help="-2 to 2, as OpenAI's (default 0)"
    )
    sampling.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID=BIAS",
        help="add BIAS (-100 to 100) to token ID's logit (more than once allowed)",
    )
    shape = p.add_mutually_exclusive_group()
    shape.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="json: the reply is one JSON object (grammar-constrained); stdout is the JSON alone",
    )
    shape.add_argument(
        "--json-schema",
        type=Path,
        metavar="FILE",
        help="the reply validates against this JSON schema (grammar-constrained); stdout is "
        "the JSON alone",
    )
    p.add_argument(
        "--file",
        "-f",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="put a text file into the message as a code block (more than once allowed)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--stats", action="store_true", help="print timing figures on stderr")
    saved = p.add_mutually_exclusive_group()
    saved.add_argument(
        "--continue",
        "-c",
        dest="continue_",
        action="store_true",
        help="continue the most recent saved conversation",
    )
    saved.add_argument(
        "--conversation", type=int, metavar="ID", help="continue saved conversation ID"
    )
    saved.add_argument("--no-save", action="store_true", help="do not save this exchange")
    add_engine_options(p)
    add_remote_options(p, ("--api-key", "--remote-api-key"))
    p.set_defaults(handler=run_ask)

    r = sub.add_parser(
        "render",
        help="print the exact prompt for a JSON list of messages read on stdin",
        description='Reads [{"role": "user", "content": "..."}, ...] on standard input.',
    )
    _add_style_options(r)
    r.add_argument("--tokens", action="store_true", help="print token ids")
    add_model_option(r)
    r.set_defaults(handler=run_render)


def _add_style_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=None,
        help="chat (GPT4 Correct) or code (default: chat, or the conversation's)",
    )
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--system-policy",
        choices=[s.value for s in SystemPolicy],
        default=None,
        help="native: '<s>{system}<|end_of_turn|>' (OpenChat); hub: 'GPT4 Correct System: ...'",
    )


def _settings(args: argparse.Namespace, base: ConversationSettings) -> ConversationSettings:
    """The saved (or default) settings with the options given on this command line."""
    from starling_local.chat.settings import with_flags

    return with_flags(
        base,
        mode=args.mode,
        system=args.system,
        system_policy=args.system_policy,
        **{
            name: getattr(args, name, None)
            for name in (
                "max_tokens",
                "temperature",
                "top_p",
                "top_k",
                "seed",
                "repeat_penalty",
                "frequency_penalty",
                "presence_penalty",
            )
        },
    )


def _request_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """What applies to this reply only and is never saved: the output format, logit bias."""
    from starling_local.engine.grammar import GrammarError, json_object_grammar, schema_grammar

    out: dict[str, Any] = {}
    bias = []
    for item in args.logit_bias:
        token, _, value = item.partition("=")
        try:
            pair = (int(token), float(value))
        except ValueError:
            raise UsageError(f"--logit-bias {item!r}: expected ID=BIAS, e.g. 32000=-100") from None
        if not -100 <= pair[1] <= 100:
            raise UsageError(f"--logit-bias {item!r}: the bias must be from -100 to 100")
        bias.append(pair)
    if bias:
        out["logit_bias"] = tuple(bias)
    if args.json_schema is not None:
        try:
            schema = json.loads(args.json_schema.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{args.json_schema}: no such file") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UsageError(f"{args.json_schema}: not a JSON schema ({exc})") from None
        try:
            out["grammar"] = schema_grammar(schema)
        except GrammarError as exc:
            raise UsageError(f"{args.json_schema}: {exc}") from None
    elif args.format == "json":
        out["grammar"] = json_object_grammar()
    return out


def run_ask(args: argparse.Namespace) -> int:
    from starling_local.chat.attachments import read_text_file
    from starling_local.chat.engines import open_engine
    from starling_local.chat.service import ConversationService, ReplyHooks
    from starling_local.chat.settings import ConversationSettings, settings_of
    from starling_local.store.conversations import ConversationStore

    for path in args.file:  # refused before anything is loaded or saved
        read_text_file(path)
    if args.prompt in (None, "-") and args.file and (sys.stdin is None or sys.stdin.isatty()):
        text = ""  # the files are the message
    else:
        text = args.prompt if args.prompt not in (None, "-") else read_stdin_text("prompt")
    if not text.strip() and not args.file:
        raise UsageError("the prompt is empty")
    if args.temperature is not None and args.temperature < 0:
        raise UsageError("--temperature must be >= 0")
    for flag in ("frequency_penalty", "presence_penalty"):
        value = getattr(args, flag)
        if value is not None and not -2 <= value <= 2:
            raise UsageError(f"--{flag.replace('_', '-')} must be from -2 to 2")
    per_request = _request_sampling(args)
    structured = "grammar" in per_request
    store = None if args.no_save else ConversationStore()
    conversation = None
    if store is not None and (args.continue_ or args.conversation is not None):
        conversation = store.latest() if args.continue_ else store.get(args.conversation)
        if conversation is None:
            store.close()
            raise UsageError("no saved conversation to continue")
    settings = _settings(
        args, settings_of(conversation) if conversation else ConversationSettings()
    )
    try:
        chosen = args.model or environment().model or _saved_model(conversation)
        engine, name = open_engine(engine_spec(args, chosen))
    except BaseException:
        if store is not None:
            store.close()
        raise
    service = ConversationService(store, engine, model_name=name)
    if args.file:
        from starling_local.chat.attachments import with_files

        try:
            text = with_files(
                text,
                args.file,
                count_tokens=lambda block: len(engine.tokenize_text(block)),
                n_ctx=engine.n_ctx,
            )
        except BaseException:
            service.close()
            raise

    def started(start: ReplyStart) -> None:
        if start.dropped_messages:
            print(
                f"starling: note: {start.dropped_messages} older messages did not fit "
                f"the {start.n_ctx}-token context and were left out of the prompt",
                file=sys.stderr,
            )

    def show(chunk: str, _stats: object) -> None:
        if not args.json and not structured:  # structured output is printed whole
            sys.stdout.write(chunk)
            sys.stdout.flush()

    hooks = ReplyHooks(on_start=started, on_text=show)
    # Ctrl-C, `kill` and a closed terminal all stop the reply the same way: it is saved with
    # its stop reason and KV state before the command ends.
    stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda *_: service.stop()) for sig in stopping}
    try:
        if store is None:
            once = settings.with_sampling(**per_request) if per_request else settings
            outcome = service.answer([Message("user", text)], once, hooks=hooks)
        else:
            cid = conversation.id if conversation else None

            def waiting() -> None:
                print(
                    f"starling: waiting for another starling process replying in "
                    f"conversation {cid}",
                    file=sys.stderr,
                )

            with service.writing(cid, on_wait=waiting):
                conv = service.send(cid, text, settings)
                outcome = service.reply(conv.id, hooks=hooks, overrides=per_request)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.close()
    for warning in outcome.warnings:
        print(f"starling: warning: {warning}", file=sys.stderr)
    if outcome.error:
        raise StarlingError(f"the reply stopped: {outcome.error}")
    stats = outcome.stats
    if getattr(args, "speculate", None) and stats.completion_tokens and not stats.draft_limit:
        from starling_local.engine.batch_cost import NO_EXACT_BATCH

        print(f"starling: note: {NO_EXACT_BATCH}", file=sys.stderr)
    if args.json:
        out = {
            "reply": outcome.text,
            **stats.as_dict(),
            "dropped_messages": outcome.dropped_messages,
            "model": name,
            "conversation_id": outcome.conversation_id,
            "warnings": outcome.warnings,
        }
        print(json.dumps(out, ensure_ascii=False))
    elif structured:
        if stats.stop_reason != "end_of_turn":
            raise StarlingError(
                f"the reply stopped ({stats.stop_reason}) before its JSON was complete"
                + (": raise --max-tokens" if stats.stop_reason == "length" else "")
            )
        sys.stdout.write(outcome.text.strip() + "\n")
    else:
        sys.stdout.write("\n")
    if args.stats:
        print(
            f"prompt {stats.prompt_tokens} tokens ({stats.prompt_evaluated} evaluated), "
            f"reply {stats.completion_tokens} tokens, TTFT {stats.ttft_s * 1000:.0f} ms, "
            f"{stats.decode_tokens_per_s:.1f} tokens/s, stop: {stats.stop_reason}",
            file=sys.stderr,
        )
    return 130 if stats.stop_reason == "cancelled" and not args.json else 0


def _saved_model(conversation: Conversation | None) -> str | None:
    """The model a continued conversation was saved with, when it is here; else None (the
    default model), with a note (an imported ChatGPT conversation names `gpt-4o`)."""
    if conversation is None or not conversation.model or " @ " in conversation.model:
        return None
    from starling_local.acquire.library import resolve_model

    try:
        resolve_model(conversation.model)
    except StarlingError:
        print(
            f"starling: note: conversation {conversation.id} was saved with "
            f"{conversation.model!r}, which is not here: using the default model",
            file=sys.stderr,
        )
        return None
    return conversation.model


def parse_messages(raw: str) -> list[Message]:
    """A JSON list of {"role", "content"} objects -> messages, with one-line errors."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"standard input is not JSON: {exc.msg} (line {exc.lineno})") from exc
    if not isinstance(data, list):
        raise UsageError('expected a JSON list of {"role": ..., "content": ...} objects')
    messages = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise UsageError(f"message {i}: needs a string 'content'")
        role = item.get("role")
        if role not in ("system", "user", "assistant"):
            raise UsageError(f"message {i}: role must be system, user or assistant, not {role!r}")
        messages.append(Message(role, item["content"]))
    return messages


def run_render(args: argparse.Namespace) -> int:
    from starling_local.chat.settings import ConversationSettings
    from starling_local.chat.template import render_text, render_tokens

    messages = parse_messages(read_stdin_text("messages"))
    settings = _settings(args, ConversationSettings())
    if not args.tokens:
        sys.stdout.write(render_text(messages, settings.system, settings.style) + "\n")
        return 0
    from starling_local.acquire.library import resolve_model
    from starling_local.engine.runtime import Engine
    from starling_local.vocab import packaged_vocabulary

    # Starling's vocabulary ships with starling-local: no model file is needed to tokenize.
    engine = Engine(
        resolve_model(args.model) if args.model else packaged_vocabulary(), vocab_only=True
    )
    try:
        tokens = render_tokens(messages, engine.tokenize_text, settings.system, settings.style)
    finally:
        engine.close()
    print(json.dumps(tokens))
    return 0
