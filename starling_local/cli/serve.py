"""`starling serve`: the OpenAI-compatible API on this machine."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from starling_local.chat.template import SystemPolicy
from starling_local.cli.common import (
    add_engine_options,
    add_model_option,
    add_remote_options,
    engine_spec,
    positive_int,
)
from starling_local.config import environment


def register(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible API (/v1/chat/completions, ...)",
    )
    add_model_option(s)
    s.add_argument("--host", default=None, help="address to bind (default: loopback)")
    s.add_argument("--port", type=port, default=None, help="port (default 8000; 0: any free one)")
    s.add_argument(
        "--ollama",
        action="store_true",
        help="listen where Ollama would: $OLLAMA_HOST, else 127.0.0.1:11434 (tools set up for "
        "Ollama then need no change; the OpenAI API stays on /v1)",
    )
    s.add_argument(
        "--keep-alive",
        type=keep_alive,
        default=DEFAULT_KEEP_ALIVE,
        metavar="DURATION",
        help="free the model after this long without requests, load it again on the next "
        "(Ollama's keep_alive: 5m, 1h, 30s, -1 = never; default 5m); requests may set their own",
    )
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default: $STARLING_API_KEY, else none)",
    )
    s.add_argument(
        "--max-queue",
        type=positive_int,
        default=8,
        help="requests that may wait for the model; more get 429 (default 8)",
    )
    s.add_argument("--save", action="store_true", help="keep served conversations in history")
    s.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin that may call the API, e.g. http://localhost:3000 (more than "
        "once allowed; '*': any). Other origins get 403; loopback origins always may.",
    )
    s.add_argument("--quiet", action="store_true", help="no log line per request")
    s.add_argument(
        "--log-level",
        choices=["info", "debug"],
        default="info",
        help="debug: each request's parsed fields in its log line too",
    )
    s.add_argument(
        "--system-policy",
        choices=[p.value for p in SystemPolicy],
        default=SystemPolicy.NATIVE.value,
        help="where system messages go (default native: '<s>{system}<|end_of_turn|>')",
    )
    add_engine_options(s)
    add_remote_options(s, ("--remote-api-key",))
    s.set_defaults(handler=run_serve)


DEFAULT_KEEP_ALIVE = 300.0


def keep_alive(text: str) -> float | None:
    from starling_local.server.model_slot import parse_keep_alive

    try:
        return parse_keep_alive(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def listen_address(args: argparse.Namespace) -> tuple[str, int]:
    """--host/--port, or with --ollama Ollama's address ($OLLAMA_HOST: `host`, `host:port`,
    `:port` or a URL; default 127.0.0.1:11434)."""
    host, number = "127.0.0.1", 8000
    if args.ollama:
        number = 11434
        value = os.environ.get("OLLAMA_HOST", "").strip()
        value = value.split("://", 1)[-1].rstrip("/")
        if value:
            name, sep, tail = value.rpartition(":")
            if sep and tail.isdigit() and "]" not in tail:
                host, number = name.strip("[]") or host, int(tail)
            else:
                host = value.strip("[]")
    return (args.host or host, args.port if args.port is not None else number)


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text}")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def served_name(display: str, path: Path) -> str:
    """What clients call the model: the library name without its quant, else the file stem."""
    if display != str(path):
        return display.split(":", 1)[0]
    return path.stem


def run_serve(args: argparse.Namespace) -> int:
    from starling_local.acquire.library import display_name, resolve_model
    from starling_local.chat.engines import open_engine
    from starling_local.chat.service import ConversationService
    from starling_local.chat.settings import ConversationSettings
    from starling_local.engine.interface import EngineLike
    from starling_local.errors import StarlingError
    from starling_local.server.app import ServerConfig, StarlingServer, make_app
    from starling_local.server.http import make_server
    from starling_local.server.model_slot import ModelSlot
    from starling_local.store.conversations import ConversationStore

    host, port_number = listen_address(args)
    key = args.api_key or environment().api_key
    if not is_loopback(host) and key is None:
        print(
            f"starling: warning: serving on {host} without an API key: anyone who can reach "
            "this port can use the model (set --api-key or STARLING_API_KEY)",
            file=sys.stderr,
        )
    spec = engine_spec(args)
    if spec.remote:
        model, display = Path(spec.remote), spec.remote_model or "starling"
    else:
        model = resolve_model(args.model)  # an unknown model fails before the port is bound
        display = display_name(model)
    service = ConversationService(ConversationStore() if args.save else None)
    config = ServerConfig(
        model_id=served_name(display, model),
        api_key=key,
        max_queue=args.max_queue,
        save=args.save,
        settings=ConversationSettings(policy=SystemPolicy(args.system_policy)),
        loopback=is_loopback(host),
        cors_origins=tuple(args.cors_origin),
        log_requests=not args.quiet,
        debug=args.log_level == "debug",
    )
    server = StarlingServer(service, config)

    def opener(path: Path, n_ctx: int | None) -> tuple[EngineLike, str]:
        return open_engine(replace(spec, model=str(path), n_ctx=n_ctx or spec.n_ctx))

    server.slot = ModelSlot(service, None if spec.remote else opener, model, args.keep_alive)
    uv = make_server(make_app(server), host=host, port=port_number, on_stop=server.stop)
    failed: list[StarlingError] = []

    def load() -> None:
        try:
            engine, name = open_engine(replace(spec, model=str(model)))
        except StarlingError as exc:
            server.load_error = str(exc)
            failed.append(exc)
            uv.should_exit = True
            return
        if service.attach_engine(engine, name):
            assert server.slot is not None
            server.slot.attached(model, engine.n_ctx)
            server.known_n_ctx = engine.n_ctx
            server.ready.set()
            port = _bound_port(uv) or port_number
            print(
                f"starling: serving {config.model_id} ({engine.backend}, {engine.n_ctx}-token "
                f"context) at http://{host}:{port}/v1 (Ollama's API at http://{host}:{port})",
                file=sys.stderr,
                flush=True,
            )
        else:
            engine.close()

    threading.Thread(target=load, name="load-model", daemon=True).start()
    try:
        uv.run()
    finally:
        server.stop()
    if failed:
        raise failed[0]
    if uv.stopped_by is not None:
        print("starling: stopped", file=sys.stderr)
    return 0


def _bound_port(uv: Any) -> int | None:
    for server in getattr(uv, "servers", []) or []:
        for sock in server.sockets:
            return int(sock.getsockname()[1])
    return None
