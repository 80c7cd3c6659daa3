"""`starling serve`: the token-exact Starling behind an OpenAI-compatible HTTP API (Starlette).

One more front end of the conversation service: requests are parsed (`protocol`), rendered by
the service with Starling's template, and answered one at a time through the one engine, with a
bounded queue in front (429 with Retry-After when full). A client that goes away cancels its
generation, also while its prompt is still being evaluated.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from starling_local.chat.service import (
    ConversationService,
    ReplyHooks,
    ReplyOutcome,
    ReplyStart,
    ServiceClosedError,
)
from starling_local.chat.settings import ConversationSettings
from starling_local.chat.template import Mode, render_tokens
from starling_local.engine.interface import EngineLike
from starling_local.engine.remote import RemoteEngine
from starling_local.errors import StarlingError
from starling_local.server import responses_api
from starling_local.server.guard import BrowserGuard, RequestLog
from starling_local.server.model_slot import Lease, ModelSlot
from starling_local.server.ollama import OllamaAPI
from starling_local.server.prepare import (
    as_api_error,
    budget,
    chat_call,
    check_bias,
    check_finished,
    error_response,
    log_fields,
)
from starling_local.server.protocol import (
    MAX_BODY_BYTES,
    APIError,
    CompletionRequest,
    Generation,
    invalid,
    parse_chat,
    parse_completion,
    parse_json,
)
from starling_local.server.responses import ChatFormatter, CompletionFormatter, Formatter, usage
from starling_local.server.responses_api import ResponseWriter
from starling_local.server.run import Call, Piece, WorkerReply

OWNER = "starling-local"
#: Browser origins on a loopback address, any port (what `guard.BrowserGuard` lets through).
LOOPBACK_ORIGIN = r"https?://(localhost|[\w-]+\.localhost|127(\.\d{1,3}){3}|\[::1\])(:\d+)?"
#: The most token ids a request may send (a prompt, /detokenize), and characters to tokenize:
#: past them 413. Tokenizing and detokenizing run off the event loop, in linear time.
MAX_IDS = 1 << 16
MAX_CHARS = 1 << 21


@dataclass
class ServerConfig:
    """How the server answers."""

    model_id: str = "starling"
    """The name clients use (`/v1/models`); `<id>:code` selects code mode."""
    api_key: str | None = None
    max_queue: int = 8
    """Requests that may wait for the engine; more get 429."""
    save: bool = False
    """Keep served conversations in the history."""
    settings: ConversationSettings = field(default_factory=ConversationSettings)
    loopback: bool = True
    """Bound to a loopback address: a `Host` that is not a loopback name is refused."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins that may call the API (`*`: any); loopback origins always may."""
    log_requests: bool = True
    debug: bool = False
    """Log each request's parsed fields too."""


class StarlingServer:
    """The HTTP layer: auth, admission, streaming; everything else is the service's."""

    def __init__(self, service: ConversationService, config: ServerConfig) -> None:
        self.service = service
        self.config = config
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.created = int(time.time())
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self.stopping = False
        self.slot: ModelSlot | None = None
        """The model's lifetime (keep-alive, switching); None: loaded once, kept."""
        self.known_n_ctx = 0

    def stop(self) -> None:
        """Take no more requests, cancel the running and queued replies (a saved one keeps its
        partial text, marked cancelled), and free the model."""
        self.stopping = True
        if self.slot is not None:
            self.slot.close()
        self.service.close()

    # --- the model ---------------------------------------------------------------------------

    async def lease(self, path: Path | None = None, n_ctx: int | None = None) -> Lease:
        """Hold the model a request runs on (None: the server's own), loading it first when
        the keep-alive freed it or another model is loaded; `unlease` lets go."""
        if self.stopping:
            raise APIError(503, "the server is shutting down", kind="server_error", code="shutdown")
        if not self.ready.is_set():
            raise APIError(503, "the model is still loading", kind="server_error", code="loading")
        slot = self.slot
        if slot is None:
            return Lease(Path(), 0)
        try:
            lease = await run_in_threadpool(slot.acquire, path, n_ctx)
        except ServiceClosedError:
            raise APIError(
                503, "the server is shutting down", kind="server_error", code="shutdown"
            ) from None
        except StarlingError as exc:
            message = f"the model could not be loaded: {exc}"
            raise APIError(500, message, kind="server_error") from None
        engine = self.service.engine
        if engine is not None:
            self.known_n_ctx = engine.n_ctx
        return lease

    def unlease(self, keep_alive: float | str | None = "default") -> None:
        if self.slot is not None:
            self.slot.release(keep_alive)

    @contextlib.asynccontextmanager
    async def leased(
        self,
        path: Path | None = None,
        n_ctx: int | None = None,
        keep_alive: float | str | None = "default",
    ) -> AsyncIterator[LeaseScope]:
        """`lease` for a block: let go at its end, unless a started reply took the lease over
        (then it is let go when the reply ends), the model kept `keep_alive` more seconds."""
        scope = LeaseScope(self, await self.lease(path, n_ctx), keep_alive)
        try:
            yield scope
        finally:
            if not scope.handed:
                self.unlease(scope.keep_alive)

    # --- plumbing ------------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # Headers arrive as latin-1 text: back to their bytes, compared with the key's UTF-8
        # (comparing str fails on non-ASCII characters).
        sent = token.strip().encode("latin-1", errors="replace")
        if scheme.lower() != "bearer" or not secrets.compare_digest(sent, key.encode()):
            raise APIError(
                401,
                "missing or wrong API key (send Authorization: Bearer KEY)",
                kind="authentication_error",
                code="invalid_api_key",
            )

    async def body(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"the body is over {MAX_BODY_BYTES} bytes")
        return parse_json(bytes(raw))

    def engine(self) -> EngineLike:
        engine = self.service.engine
        if not self.ready.is_set() or engine is None:
            raise APIError(503, "the model is still loading", kind="server_error", code="loading")
        return engine

    def mode_of(self, model: str) -> Mode | None:
        """The mode a model name asks for. Every name is this server's model (its id, its
        library name, `starling`, or whatever a client sends by default, as llama-server
        answers any name); `NAME:code` asks for code mode."""
        return Mode.CODE if model.endswith(":code") else None

    def admit(self) -> None:
        if self.stopping:
            raise APIError(503, "the server is shutting down", kind="server_error", code="shutdown")
        with self._admit_lock:
            if self._admitted > self.config.max_queue:
                raise APIError(
                    429,
                    "the server is busy: too many requests are waiting; retry shortly",
                    kind="rate_limit_error",
                    code="queue_full",
                )
            self._admitted += 1

    def release(self) -> None:
        with self._admit_lock:
            self._admitted -= 1

    def start(
        self, request: Request, call: Call, after: Callable[[], None] | None = None
    ) -> WorkerReply:
        """Admit a request (or 429) and start its generation in a worker thread; `after` runs
        in that thread when the generation is over."""
        self.admit()

        def done() -> None:
            self.release()
            if after is not None:
                after()

        try:
            return WorkerReply(request, call, done)
        except BaseException:
            self.release()
            raise


@dataclass
class LeaseScope:
    """A request's lease on the model, for one block (see `StarlingServer.leased`)."""

    server: StarlingServer
    lease: Lease
    keep_alive: float | str | None = "default"
    handed: bool = False

    def start(self, request: Request, call: Call) -> WorkerReply:
        """Start the reply; it lets go of the lease when it ends."""
        run = self.server.start(request, call, after=lambda: self.server.unlease(self.keep_alive))
        self.handed = True
        return run


#: Characters that `str.splitlines` (and so many SSE clients, httpx's `iter_lines` among them)
#: takes for line ends, which JSON leaves raw inside strings: escaped, an event stays one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _head(server: StarlingServer, generation: Generation, prefix: str) -> dict[str, Any]:
    return {
        "id": prefix + secrets.token_hex(12),
        "created": int(time.time()),
        "model": server.config.model_id,  # the served model, whatever name was sent
    }


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


def _cap_ids(ids: list[int], what: str) -> None:
    if len(ids) > MAX_IDS:
        raise APIError(413, f"{what}: at most {MAX_IDS} token ids", code="too_many_tokens")


def _check_vocab(ids: list[int], vocab_size: int, what: str) -> None:
    """Every id must be a token before it reaches llama.cpp (which aborts the process on one
    that is not, e.g. when detokenizing an echoed prompt)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(
            f"'{what}': token id {bad} is not in the vocabulary (0-{vocab_size - 1})", what
        )


def _cap_text(text: str, what: str) -> None:
    if len(text) > MAX_CHARS:
        raise APIError(413, f"{what}: at most {MAX_CHARS} characters", code="text_too_long")


def make_app(server: StarlingServer) -> Starlette:
    """The ASGI application."""

    def endpoint(
        handler: Callable[[Request], Any], *, public: bool = False
    ) -> Callable[[Request], Any]:
        async def wrapped(request: Request) -> Response:
            try:
                if not public:
                    server.check_auth(request)
                response: Response = await handler(request)
                return response
            except Exception as exc:  # every error is an OpenAI error object, never a 500 page
                return error_response(as_api_error(exc))

        return wrapped

    async def health(request: Request) -> Response:
        if server.load_error:
            return JSONResponse({"status": "error", "error": server.load_error}, status_code=503)
        if not server.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    def model_cards() -> list[dict[str, Any]]:
        engine = server.service.engine
        n_ctx = engine.n_ctx if engine is not None else server.known_n_ctx
        if not server.ready.is_set() or not n_ctx:
            server.engine()  # 503 while the model loads
        return [
            {
                "id": name,
                "object": "model",
                "created": server.created,
                "owned_by": OWNER,
                "context_length": n_ctx,
                "max_model_len": n_ctx,
            }
            for name in (server.config.model_id, f"{server.config.model_id}:code")
        ]

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": model_cards()})

    async def model(request: Request) -> Response:
        wanted = request.path_params["model"]
        for card in model_cards():
            if card["id"] == wanted:
                return JSONResponse(card)
        server.mode_of(wanted)  # 404 for another model's name
        return JSONResponse({**model_cards()[0], "id": wanted})  # the file's own name

    async def chat(request: Request) -> Response:
        req = parse_chat(await server.body(request), server.config.settings)
        async with server.leased() as scope:
            engine = server.engine()
            mode = server.mode_of(req.generation.model)
            if mode is not None:
                req.generation.settings = replace(req.generation.settings, mode=mode)
            tool_call = req.wants_call
            call = chat_call(server.service, engine, req, request, save=server.config.save)
            formatter = ChatFormatter(
                _head(server, req.generation, "chatcmpl-"),
                engine.token_bytes,
                tool_call=tool_call,
                include_usage=req.generation.include_usage,
                logprobs=req.generation.logprobs is not None,
            )
            return await _respond(scope, request, req.generation, call, formatter)

    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse_completion(
            await server.body(request), server.config.settings
        )
        async with server.leased() as scope:
            engine = server.engine()
            server.mode_of(req.generation.model)
            check_bias(req.generation, engine.vocab_size)
            grammar = req.generation.settings.sampling.grammar
            check = getattr(engine, "check_grammar", None)  # a remote engine checks its own
            if grammar is not None and grammar.kind == "gbnf" and check is not None:
                try:
                    check(grammar)
                except StarlingError as exc:
                    raise invalid(str(exc), "structured_outputs", "bad_grammar") from None
            if req.prompt_ids is not None:
                _cap_ids(req.prompt_ids, "prompt")
                _check_vocab(req.prompt_ids, engine.vocab_size, "prompt")
                tokens = req.prompt_ids
            else:
                text = req.prompt_text or ""
                _cap_text(text, "prompt")
                tokens = await run_in_threadpool(engine.tokenize, text, bos=True, special=True)
            budget(req.generation, engine.n_ctx)
            log_fields(request, req.generation, prompt_tokens=len(tokens), echo=req.echo)

            def call(hooks: ReplyHooks, cancel: threading.Event) -> ReplyOutcome:
                return server.service.complete(
                    tokens,
                    req.generation.settings.sampling,
                    hooks=hooks,
                    cancel=cancel,
                    stop=req.generation.stop,
                    stop_ids=req.stop_token_ids,
                )

            echo = None
            if req.echo and isinstance(engine, RemoteEngine):
                raise invalid(
                    "'echo' is not supported when a remote engine generates (--remote)", "echo"
                )
            if req.echo:
                echo = req.prompt_text
                if echo is None:
                    echo = await run_in_threadpool(engine.detokenize, tokens)
            formatter = CompletionFormatter(
                _head(server, req.generation, "cmpl-"),
                engine.token_bytes,
                tokens,
                token_ids=req.return_token_ids,
                include_usage=req.generation.include_usage,
                logprobs=req.generation.logprobs is not None,
                echo=echo,
                tokens_as_ids=req.tokens_as_ids,
            )
            return await _respond(scope, request, req.generation, call, formatter)

    async def responses(request: Request) -> Response:
        body = await server.body(request)
        req = parse_chat(responses_api.chat_body(body), server.config.settings)
        async with server.leased() as scope:
            engine = server.engine()
            writer = ResponseWriter(server.config.model_id, body, req.wants_call)
            call = chat_call(server.service, engine, req, request, save=server.config.save)
            run = scope.start(request, call)
        events = run.events()
        started = await anext(events)  # errors before the reply starts keep their status
        assert isinstance(started, ReplyStart)
        if not req.generation.stream:
            return JSONResponse(writer.whole(await _whole(request, events)))

        async def stream() -> AsyncIterator[str]:
            try:
                for event in writer.first():
                    yield event
                async for item in events:
                    if isinstance(item, ReplyOutcome):
                        request.state.usage = usage(item)
                        check_finished(item)
                        for event in writer.last(item):
                            yield event
                    elif isinstance(item, Piece):
                        delta = writer.piece(item.text)
                        if delta is not None:
                            yield delta
            except Exception as exc:  # after the headers: the error goes in the stream
                yield writer.error(as_api_error(exc).message)
            finally:
                await events.aclose()

        return _event_stream(stream())

    async def tokenize(request: Request) -> Response:
        body = await server.body(request)
        async with server.leased():
            engine = server.engine()
            if isinstance(body.get("messages"), list):
                chat_req = parse_chat(
                    {**body, "model": body.get("model", "")}, server.config.settings
                )
                s = chat_req.generation.settings
                _cap_text("".join(m.content for m in chat_req.messages), "messages")
                tokens = await run_in_threadpool(
                    render_tokens, chat_req.messages, engine.tokenize_text, s.system, s.style
                )
            else:
                text = body.get("content", body.get("prompt"))
                if not isinstance(text, str):
                    raise invalid(
                        "send 'content' (or 'prompt') as a string, or 'messages'", "content"
                    )
                _cap_text(text, "content")
                special = body.get("add_special", body.get("add_special_tokens", False))
                tokens = await run_in_threadpool(
                    engine.tokenize, text, bos=bool(special), special=True
                )
            return JSONResponse(
                {"tokens": tokens, "count": len(tokens), "max_model_len": engine.n_ctx}
            )

    async def detokenize(request: Request) -> Response:
        body = await server.body(request)
        async with server.leased():
            engine = server.engine()
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in tokens
            ):
                raise invalid("'tokens' must be a list of token ids", "tokens")
            _cap_ids(tokens, "tokens")
            _check_vocab(tokens, engine.vocab_size, "tokens")
            text = await run_in_threadpool(engine.detokenize, tokens)
            return JSONResponse({"content": text, "prompt": text})

    routes = [Route("/health", endpoint(health, public=True), methods=["GET"])]
    routes += OllamaAPI(server).routes()
    # Every API route also answers without the /v1 prefix, as llama-server's do.
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/models", endpoint(models), methods=["GET"]),
            Route(f"{prefix}/models/{{model:path}}", endpoint(model), methods=["GET"]),
            Route(f"{prefix}/chat/completions", endpoint(chat), methods=["POST"]),
            Route(f"{prefix}/completions", endpoint(completions), methods=["POST"]),
            Route(f"{prefix}/responses", endpoint(responses), methods=["POST"]),
        ]
    routes += [
        Route("/tokenize", endpoint(tokenize), methods=["POST"]),
        Route("/detokenize", endpoint(detokenize), methods=["POST"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            response = error_response(APIError(405, message, code="method_not_allowed"))
            response.headers.update(exc.headers or {})  # Allow: the methods it takes
            return response
        message = f"no such route: {request.method} {request.url.path}"
        return error_response(APIError(exc.status_code, message, code="not_found"))

    config = server.config
    middleware = []
    if config.log_requests:
        middleware.append(Middleware(RequestLog, debug=config.debug))
    middleware.append(
        Middleware(BrowserGuard, loopback=config.loopback, origins=config.cors_origins)
    )
    # Browsers: loopback origins on any port always (as Ollama allows them), and the
    # --cors-origin ones; preflights answered and Access-Control-Allow-Origin on replies.
    middleware.append(
        Middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_origin_regex=LOOPBACK_ORIGIN,
            allow_methods=["GET", "HEAD", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    )
    return Starlette(
        routes=routes, exception_handlers={HTTPException: http_error}, middleware=middleware
    )


async def _whole(request: Request, events: AsyncIterator[Any]) -> ReplyOutcome:
    """The finished reply of a request answered in one body (an error if it failed or was
    cancelled), its usage noted for the request log."""
    outcome: ReplyOutcome | None = None
    async for item in events:
        if isinstance(item, ReplyOutcome):
            outcome = item
    assert outcome is not None
    request.state.usage = usage(outcome)
    check_finished(outcome)
    return outcome


async def _respond(
    scope: LeaseScope,
    request: Request,
    generation: Generation,
    call: Call,
    formatter: Formatter,
) -> Response:
    run = scope.start(request, call)
    events = run.events()
    # The request may wait for its turn; once the prompt is accepted (it fits the context...)
    # generation starts. Errors before that are answered with their status, not in a stream.
    started = await anext(events)
    assert isinstance(started, ReplyStart)

    if not generation.stream:
        return JSONResponse(formatter.whole(await _whole(request, events)))

    async def stream() -> AsyncIterator[str]:
        try:
            for first in formatter.first():
                yield _sse(first)
            async for item in events:
                if isinstance(item, ReplyOutcome):
                    request.state.usage = usage(item)
                    check_finished(item)  # else an error event, and no finish_reason
                    for last in formatter.last(item):
                        yield _sse(last)
                elif isinstance(item, Piece):
                    chunk = formatter.piece(item)
                    if chunk is not None:
                        yield _sse(chunk)
            yield "data: [DONE]\n\n"
        except Exception as exc:  # after the headers: the error goes in the stream
            yield _sse(as_api_error(exc).body())
        finally:
            await events.aclose()

    return _event_stream(stream())


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, unbuffered by proxies."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
