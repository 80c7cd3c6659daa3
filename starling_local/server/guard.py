"""ASGI middleware in front of the API: who may call it from a browser, and a log line per
request.

A web page can make a browser send a `text/plain` POST to any address (no preflight), and a
DNS-rebinding page can make its own name resolve to 127.0.0.1. Browsers send `Origin` on
every cross-site POST and the page's host name in `Host`, so:

- a request whose `Origin` is not allowed gets 403 (allowed: none at all, as curl and SDKs
  send; loopback origins on any port; the `--cors-origin` ones, `*` for all);
- on a loopback bind, a `Host` that is not a loopback name gets 403.

Preflights and `Access-Control-Allow-*` come from Starlette's CORSMiddleware, for the
`--cors-origin` origins only.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback_name(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1 (a host name as `Host` or `Origin` give it)."""
    name = host.strip("[]").lower().rstrip(".")
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _hostname(host_header: str) -> str:
    return urlsplit(f"//{host_header}").hostname or ""


async def _forbidden(send: Send, message: str) -> None:
    error = {"message": message, "type": "invalid_request_error", "param": None}
    body = json.dumps({"error": {**error, "code": "forbidden"}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BrowserGuard:
    """403 for origins that are not allowed and, on a loopback bind, for foreign `Host`s."""

    def __init__(self, app: ASGIApp, *, loopback: bool, origins: Sequence[str] = ()) -> None:
        self.app = app
        self.loopback = loopback
        self.origins = frozenset(o.rstrip("/") for o in origins)

    def origin_allowed(self, origin: str) -> bool:
        if "*" in self.origins or origin.rstrip("/") in self.origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and is_loopback_name(parts.hostname or "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host = headers.get("host", "")
            if self.loopback and host and not is_loopback_name(_hostname(host)):
                await _forbidden(send, f"this server answers to loopback names, not {host!r}")
                return
            origin = headers.get("origin")
            if origin is not None and not self.origin_allowed(origin):
                await _forbidden(
                    send,
                    f"requests from {origin!r} are not allowed (starling serve --cors-origin)",
                )
                return
        await self.app(scope, receive, send)


class RequestLog:
    """One line per request on stderr: method, path, status, tokens, seconds. With `debug`, the
    request's parsed fields too (what the handlers put in `scope["state"]["fields"]`)."""

    def __init__(self, app: ASGIApp, *, debug: bool = False) -> None:
        self.app = app
        self.debug = debug

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 0

        async def logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.write(scope, state, status, time.perf_counter() - start)

        try:
            await self.app(scope, receive, logged)
        except BaseException:
            self.write(scope, state, status or 500, time.perf_counter() - start)
            raise

    def write(self, scope: Scope, state: dict[str, Any], status: int, seconds: float) -> None:
        usage = state.get("usage") or {}
        tokens = ""
        if usage:
            tokens = (
                f" prompt={usage.get('prompt_tokens', 0)} "
                f"completion={usage.get('completion_tokens', 0)} "
                f"cached={(usage.get('prompt_tokens_details') or {}).get('cached_tokens', 0)}"
            )
        line = f"starling: {scope['method']} {scope['path']} {status}{tokens} {seconds:.3f}s"
        if self.debug and state.get("fields"):
            line += " " + json.dumps(state["fields"], default=str, ensure_ascii=False)
        print(line, file=sys.stderr, flush=True)
