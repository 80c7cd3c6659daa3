"""`starling serve`: the token-exact Starling behind an OpenAI-compatible HTTP API (Starlette).

One more front end of the conversation service: requests are parsed (`protocol`), rendered by
the service with Starling's template, and answered one at a time through the one engine, with a
bounded queue in front (429 with Retry-After when full). A client that goes away cancels its
generation, also while its prompt is still being evaluated.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from starling_local.chat.context import ContextOverflowError
from starling_local.chat.service import (
    ConversationService,
    ReplyHooks,
    ReplyOutcome,
    ReplyStart,
    ServiceClosedError,
)
from starling_local.chat.settings import ConversationSettings
from starling_local.chat.template import Mode, render_tokens
from starling_local.chat.tools import call_grammar, describe
from starling_local.engine.grammar import GrammarError
from starling_local.engine.interface import EngineLike
from starling_local.engine.remote import RemoteError
from starling_local.engine.types import EngineClosedError
from starling_local.errors import StarlingError, UsageError
from starling_local.server.guard import BrowserGuard, RequestLog
from starling_local.server.history import respond
from starling_local.server.protocol import (
    MAX_BODY_BYTES,
    APIError,
    ChatRequest,
    CompletionRequest,
    Generation,
    invalid,
    parse_chat,
    parse_completion,
    parse_json,
)
from starling_local.server.responses import ChatFormatter, CompletionFormatter, Formatter, usage
from starling_local.server.run import Call, Piece, WorkerReply

OWNER = "starling-local"
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

    def stop(self) -> None:
        """Take no more requests, cancel the running and queued replies (a saved one keeps its
        partial text, marked cancelled), and free the model."""
        self.stopping = True
        self.service.close()

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
        """The mode a model name asks for; APIError if it is not this server's model."""
        names = {self.config.model_id: None, f"{self.config.model_id}:code": Mode.CODE}
        names[self.service.model_name] = None
        if model in ("", *names):
            return names.get(model)
        raise APIError(
            404,
            f"the model {model!r} does not exist here; this server has {self.config.model_id!r}",
            code="model_not_found",
            param="model",
        )

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

    def start(self, request: Request, call: Call) -> WorkerReply:
        """Admit a request (or 429) and start its generation in a worker thread."""
        self.admit()
        try:
            return WorkerReply(request, call, self.release)
        except BaseException:
            self.release()
            raise


#: Characters that `str.splitlines` (and so many SSE clients, httpx's `iter_lines` among them)
#: takes for line ends, which JSON leaves raw inside strings: escaped, an event stays one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


def _error_response(error: APIError) -> JSONResponse:
    headers = {}
    if error.status == 429:
        headers["Retry-After"] = "1"
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _as_api_error(exc: Exception) -> APIError:
    """The client's mistakes are 4xx; everything else (the engine, a remote, the store) 5xx."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return invalid(str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, UsageError | GrammarError):
        return invalid(str(exc))
    if isinstance(exc, ServiceClosedError | EngineClosedError):
        return APIError(503, "the server is shutting down", kind="server_error", code="shutdown")
    if isinstance(exc, RemoteError):
        return APIError(502, str(exc), kind="server_error", code="remote_engine")
    if isinstance(exc, StarlingError):
        return APIError(500, str(exc), kind="server_error")
    return APIError(500, f"internal error: {type(exc).__name__}", kind="server_error")


def _cap_ids(ids: list[int], what: str) -> None:
    if len(ids) > MAX_IDS:
        raise APIError(413, f"{what}: at most {MAX_IDS} token ids", code="too_many_tokens")


def _cap_text(text: str, what: str) -> None:
    if len(text) > MAX_CHARS:
        raise APIError(413, f"{what}: at most {MAX_CHARS} characters", code="text_too_long")


def _check_bias(generation: Generation, vocab_size: int) -> None:
    for token, _ in generation.settings.sampling.logit_bias:
        if not 0 <= token < vocab_size:
            raise invalid(f"'logit_bias': token id {token} is not in the vocabulary", "logit_bias")


def _with_tool_call(req: ChatRequest) -> None:
    """A demanded call: the functions described in the system prompt, a grammar for one call."""
    functions = req.called_functions()
    settings = req.generation.settings
    if settings.sampling.grammar is not None:
        raise invalid(
            "'response_format' and a demanded tool call cannot be combined", "tool_choice"
        )
    try:
        grammar = call_grammar(functions)
    except GrammarError as exc:
        raise invalid(str(exc), "tools", "unsupported_schema") from None
    system = "\n\n".join(s for s in (settings.system, describe(functions)) if s)
    req.generation.settings = replace(settings, system=system).with_sampling(grammar=grammar)


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
                return _error_response(_as_api_error(exc))

        return wrapped

    async def health(request: Request) -> Response:
        if server.load_error:
            return JSONResponse({"status": "error", "error": server.load_error}, status_code=503)
        if not server.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    def model_cards() -> list[dict[str, Any]]:
        n_ctx = server.engine().n_ctx
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
        engine = server.engine()
        mode = server.mode_of(req.generation.model)
        if mode is not None:
            req.generation.settings = replace(req.generation.settings, mode=mode)
        _check_bias(req.generation, engine.vocab_size)
        tool_call = req.wants_call
        if tool_call:
            _with_tool_call(req)
        _budget(req.generation, engine.n_ctx)

        client = request.headers.get("x-starling-client") or req.user
        _log_fields(request, req.generation, tools=len(req.tools), tool_choice=req.tool_choice)

        def call(hooks: ReplyHooks, cancel: threading.Event) -> ReplyOutcome:
            return respond(
                server.service,
                req.messages,
                req.generation.settings,
                hooks=hooks,
                cancel=cancel,
                stop=req.generation.stop,
                save=server.config.save,
                client_id=client,
            )

        formatter = ChatFormatter(
            _head(server, req.generation, "chatcmpl-"),
            engine.token_bytes,
            tool_call=tool_call,
            include_usage=req.generation.include_usage,
            logprobs=req.generation.logprobs is not None,
        )
        return await _respond(server, request, req.generation, call, formatter)

    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse_completion(
            await server.body(request), server.config.settings
        )
        engine = server.engine()
        server.mode_of(req.generation.model)
        _check_bias(req.generation, engine.vocab_size)
        grammar = req.generation.settings.sampling.grammar
        check = getattr(engine, "check_grammar", None)  # a remote engine checks its own
        if grammar is not None and grammar.kind == "gbnf" and check is not None:
            try:
                check(grammar)
            except StarlingError as exc:
                raise invalid(str(exc), "structured_outputs", "bad_grammar") from None
        if req.prompt_ids is not None:
            _cap_ids(req.prompt_ids, "prompt")
            tokens = req.prompt_ids
        else:
            text = req.prompt_text or ""
            _cap_text(text, "prompt")
            tokens = await run_in_threadpool(engine.tokenize, text, bos=True, special=True)
        _budget(req.generation, engine.n_ctx)
        _log_fields(request, req.generation, prompt_tokens=len(tokens), echo=req.echo)

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
        return await _respond(server, request, req.generation, call, formatter)

    async def tokenize(request: Request) -> Response:
        body = await server.body(request)
        engine = server.engine()
        if isinstance(body.get("messages"), list):
            chat_req = parse_chat({**body, "model": body.get("model", "")}, server.config.settings)
            s = chat_req.generation.settings
            _cap_text("".join(m.content for m in chat_req.messages), "messages")
            tokens = await run_in_threadpool(
                render_tokens, chat_req.messages, engine.tokenize_text, s.system, s.style
            )
        else:
            text = body.get("content", body.get("prompt"))
            if not isinstance(text, str):
                raise invalid("send 'content' (or 'prompt') as a string, or 'messages'", "content")
            _cap_text(text, "content")
            special = body.get("add_special", body.get("add_special_tokens", False))
            tokens = await run_in_threadpool(engine.tokenize, text, bos=bool(special), special=True)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.n_ctx})

    async def detokenize(request: Request) -> Response:
        body = await server.body(request)
        engine = server.engine()
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise invalid("'tokens' must be a list of token ids", "tokens")
        _cap_ids(tokens, "tokens")
        if any(not 0 <= t < engine.vocab_size for t in tokens):
            raise invalid("a token id is not in the vocabulary", "tokens")
        text = await run_in_threadpool(engine.detokenize, tokens)
        return JSONResponse({"content": text, "prompt": text})

    routes = [Route("/health", endpoint(health, public=True), methods=["GET"])]
    # Every API route also answers without the /v1 prefix, as llama-server's do.
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/models", endpoint(models), methods=["GET"]),
            Route(f"{prefix}/models/{{model:path}}", endpoint(model), methods=["GET"]),
            Route(f"{prefix}/chat/completions", endpoint(chat), methods=["POST"]),
            Route(f"{prefix}/completions", endpoint(completions), methods=["POST"]),
        ]
    routes += [
        Route("/tokenize", endpoint(tokenize), methods=["POST"]),
        Route("/detokenize", endpoint(detokenize), methods=["POST"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            return _error_response(APIError(405, message, code="method_not_allowed"))
        message = f"no such route: {request.method} {request.url.path}"
        return _error_response(APIError(exc.status_code, message, code="not_found"))

    config = server.config
    middleware = []
    if config.log_requests:
        middleware.append(Middleware(RequestLog, debug=config.debug))
    middleware.append(
        Middleware(BrowserGuard, loopback=config.loopback, origins=config.cors_origins)
    )
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                expose_headers=["Retry-After"],
                max_age=600,
            )
        )
    return Starlette(
        routes=routes, exception_handlers={HTTPException: http_error}, middleware=middleware
    )


def _log_fields(request: Request, generation: Generation, **extra: Any) -> None:
    """What `--log-level debug` shows of a request (see `guard.RequestLog`)."""
    s = generation.settings.sampling
    request.state.fields = {
        "model": generation.model,
        "stream": generation.stream,
        "max_tokens": generation.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "seed": s.seed,
        "stop": generation.stop,
        "grammar": s.grammar.kind if s.grammar else None,
        "logprobs": s.logprobs,
        **extra,
    }


def _head(server: StarlingServer, generation: Generation, prefix: str) -> dict[str, Any]:
    return {
        "id": prefix + secrets.token_hex(12),
        "created": int(time.time()),
        "model": generation.model or server.config.model_id,
    }


def _budget(generation: Generation, n_ctx: int) -> None:
    """Without `max_tokens`, a reply may run to the end of the context window."""
    limit = n_ctx if generation.max_tokens is None else generation.max_tokens
    generation.settings = generation.settings.with_sampling(max_tokens=limit)


def _check_finished(outcome: ReplyOutcome) -> None:
    """A reply that failed or was cancelled (the server is stopping) is an error, never a
    reply that looks complete."""
    if outcome.error:
        raise APIError(500, outcome.error, kind="server_error")
    if outcome.stats.stop_reason == "cancelled":
        raise APIError(503, "the reply was cancelled", kind="server_error", code="cancelled")


async def _respond(
    server: StarlingServer,
    request: Request,
    generation: Generation,
    call: Call,
    formatter: Formatter,
) -> Response:
    run = server.start(request, call)
    events = run.events()
    # The request may wait for its turn; once the prompt is accepted (it fits the context...)
    # generation starts. Errors before that are answered with their status, not in a stream.
    started = await anext(events)
    assert isinstance(started, ReplyStart)

    if not generation.stream:
        outcome: ReplyOutcome | None = None
        async for item in events:
            if isinstance(item, ReplyOutcome):
                outcome = item
        assert outcome is not None
        request.state.usage = usage(outcome)
        _check_finished(outcome)
        return JSONResponse(formatter.whole(outcome))

    async def stream() -> AsyncIterator[str]:
        try:
            for first in formatter.first():
                yield _sse(first)
            async for item in events:
                if isinstance(item, ReplyOutcome):
                    request.state.usage = usage(item)
                    _check_finished(item)  # else an error event, and no finish_reason
                    for last in formatter.last(item):
                        yield _sse(last)
                elif isinstance(item, Piece):
                    chunk = formatter.piece(item)
                    if chunk is not None:
                        yield _sse(chunk)
            yield "data: [DONE]\n\n"
        except Exception as exc:  # after the headers: the error goes in the stream
            yield _sse(_as_api_error(exc).body())
        finally:
            await events.aclose()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
