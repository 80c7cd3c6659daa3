"""`starling ask` (one-shot reply) and `starling render` (show the exact prompt)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from starling_local.chat.template import Message, Mode, PromptStyle, SystemPolicy
from starling_local.cli.common import (
    add_engine_options,
    add_model_option,
    positive_int,
    read_stdin_text,
    resolve_model,
)
from starling_local.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("ask", help="one-shot reply, streamed to stdout")
    p.add_argument("prompt", nargs="?", help="the message (default or '-': read standard input)")
    add_model_option(p)
    _add_style_options(p)
    p.add_argument("--max-tokens", type=positive_int, default=1024)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
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
    p.set_defaults(handler=run_ask)

    r = sub.add_parser(
        "render",
        help="print the exact prompt for a JSON list of messages read on stdin",
        description='Reads [{"role": "user", "content": "..."}, ...] on standard input.',
    )
    _add_style_options(r)
    r.add_argument("--tokens", action="store_true", help="print token ids (needs --model)")
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


def _style(args: argparse.Namespace, base: PromptStyle | None = None) -> PromptStyle:
    base = base or PromptStyle()
    return PromptStyle(
        Mode(args.mode) if args.mode else base.mode,
        SystemPolicy(args.system_policy) if args.system_policy else base.policy,
    )


def run_ask(args: argparse.Namespace) -> int:
    from starling_local.acquire.library import display_name
    from starling_local.chat.conversation import (
        ReplyRecorder,
        params_dict,
        style_of,
        to_messages,
    )
    from starling_local.chat.session import start_reply
    from starling_local.engine.runtime import Engine, SamplingParams

    text = args.prompt if args.prompt not in (None, "-") else read_stdin_text("prompt")
    if not text.strip():
        raise UsageError("the prompt is empty")
    if args.temperature < 0:
        raise UsageError("--temperature must be >= 0")
    store = None if args.no_save else _store()
    conversation = None
    if store is not None and (args.continue_ or args.conversation is not None):
        conversation = store.latest() if args.continue_ else store.get(args.conversation)
        if conversation is None:
            raise UsageError("no saved conversation to continue")
    style = _style(args, style_of(conversation) if conversation else None)
    system = (
        args.system if args.system is not None else (conversation.system if conversation else "")
    )
    model = resolve_model(args.model or (conversation.model if conversation else None) or None)
    engine = Engine(model, n_ctx=args.ctx, n_threads=args.threads, n_gpu_layers=args.gpu_layers)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    history = to_messages(conversation) if conversation else []
    messages = [*history, Message("user", text)]
    recorder = None
    if store is not None:
        settings = {
            "mode": style.mode.value,
            "system": system,
            "model": display_name(model),
            "params": params_dict(params, style),
        }
        if conversation is None:
            conversation = store.create(**settings)
        else:
            store.update(conversation.id, **settings)
    cancel = threading.Event()
    kv = None
    if store is not None and conversation is not None:
        from starling_local.chat.kv_cache import ConversationCache

        kv = ConversationCache(engine)
    conv_id = conversation.id if conversation is not None else 0

    def resume(tokens: list[int]) -> None:
        if kv is not None and history:
            kv.restore(conv_id, tokens)

    reply = start_reply(
        engine, messages, system=system, style=style, params=params, cancel=cancel, resume=resume
    )
    if store is not None and conversation is not None:
        store.add_message(conversation.id, "user", text)  # committed before generation starts
        recorder = ReplyRecorder(store, conversation.id)
    if reply.prompt.dropped_messages:
        print(
            f"starling: note: {reply.prompt.dropped_messages} older messages did not fit "
            f"the {engine.n_ctx}-token context and were left out of the prompt",
            file=sys.stderr,
        )
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        for chunk in reply.stream:
            if recorder is not None:
                recorder.feed(chunk)
            if not args.json:
                sys.stdout.write(chunk)
                sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
        if recorder is not None:
            recorder.finish(reply.stream)
        if kv is not None:
            kv.save(conv_id)  # the next `--continue` starts from this cache
    stats = reply.stream.stats
    if args.json:
        out = _ask_json(reply, str(model))
        out["conversation_id"] = conversation.id if store is not None and conversation else None
        print(json.dumps(out, ensure_ascii=False))
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


def _store() -> Any:
    from starling_local.store.conversations import ConversationStore

    return ConversationStore()


def _ask_json(reply: Any, model: str) -> dict[str, Any]:
    s = reply.stream.stats
    return {
        "reply": reply.stream.text,
        "stop_reason": s.stop_reason,
        "prompt_tokens": s.prompt_tokens,
        "prompt_evaluated": s.prompt_evaluated,
        "completion_tokens": s.completion_tokens,
        "ttft_s": round(s.ttft_s, 6),
        "decode_tokens_per_s": round(s.decode_tokens_per_s, 3),
        "dropped_messages": reply.prompt.dropped_messages,
        "model": model,
    }


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
    from starling_local.chat.template import render_segments, segments_to_text, segments_to_tokens

    messages = parse_messages(read_stdin_text("messages"))
    style = _style(args)
    segments = render_segments(
        messages,
        mode=style.mode,
        system=args.system or "",
        policy=style.policy,
        add_generation_prompt=not messages or messages[-1].role != "assistant",
        exact=False,
    )
    if not args.tokens:
        sys.stdout.write(segments_to_text(segments) + "\n")
        return 0
    from starling_local.engine.runtime import Engine

    engine = Engine(resolve_model(args.model), vocab_only=True)
    print(json.dumps(segments_to_tokens(segments, engine.tokenize_text)))
    return 0
