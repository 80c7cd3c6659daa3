"""`starling serve`: the token-exact Starling behind an OpenAI-compatible HTTP API (Starlette).

One more front end of the conversation service: requests are parsed (`protocol`), rendered by
the service with Starling's template, and answered one at a time through the one engine, with a
bounded queue in front (429 with Retry-After when full). A client that goes away cancels its
generation, also while its prompt is still being evaluated.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from starling_local.chat.context import ContextOverflowError
from starling_local.chat.service import (
    ConversationService,
    ReplyHooks,
    ReplyOutcome,
    ReplyStart,
)
from starling_local.chat.settings import ConversationSettings
from starling_local.chat.template import Mode, render_tokens
from starling_local.engine.runtime import EngineStream
from starling_local.errors import StarlingError
from starling_local.server.protocol import (
    MAX_BODY_BYTES,
    APIError,
    CompletionRequest,
    Generation,
    bad,
    parse_chat,
    parse_completion,
    parse_json,
)

OWNER = "starling-local"
FINISH = {"end_of_turn": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


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

    # --- plumbing ------------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), key):
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

    def engine(self) -> Any:
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
        self, request: Request, call: Callable[[ReplyHooks, threading.Event], ReplyOutcome]
    ) -> Run:
        """Admit a request (or 429) and start its generation in a worker thread."""
        self.admit()
        try:
            return Run(request, call, self.release)
        except BaseException:
            self.release()
            raise


class Run:
    """One generation running in a worker thread, seen from the event loop: `events()` yields
    (text, new token ids) as it streams, then the outcome. The client going away (or leaving
    `events()` early) cancels it, also while its prompt is being evaluated."""

    def __init__(
        self,
        request: Request,
        call: Callable[[ReplyHooks, threading.Event], ReplyOutcome],
        done: Callable[[], None],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancel = threading.Event()
        self._sent = 0
        self.watcher = asyncio.create_task(self._watch(request))

        def work() -> None:
            try:
                hooks = ReplyHooks(on_start=self._on_start, on_text=self._on_text)
                result: Any = call(hooks, self.cancel)
            except BaseException as exc:
                result = exc
            finally:
                done()
            self.loop.call_soon_threadsafe(self._finish, result)

        threading.Thread(target=work, name="starling-request", daemon=True).start()

    def _on_start(self, start: ReplyStart) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, start)

    def _on_text(self, text: str, stream: EngineStream) -> None:
        ids = stream.token_ids[self._sent :]
        self._sent = len(stream.token_ids)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (text, ids))

    def _finish(self, result: Any) -> None:
        self.watcher.cancel()
        self.queue.put_nowait(result)

    async def _watch(self, request: Request) -> None:
        while not self.cancel.is_set():
            if await request.is_disconnected():
                self.cancel.set()
                return
            await asyncio.sleep(0.05)

    async def events(
        self,
    ) -> AsyncGenerator[ReplyStart | tuple[str, list[int]] | ReplyOutcome, None]:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, ReplyOutcome):
                    return
        finally:
            self.cancel.set()  # a no-op when the reply is complete


def _usage(outcome: ReplyOutcome) -> dict[str, Any]:
    s = outcome.stats
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
    }


def _sse(data: Any) -> str:
    import json

    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _error_response(error: APIError) -> JSONResponse:
    headers = {}
    if error.status == 429:
        headers["Retry-After"] = "1"
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return bad(str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, StarlingError):
        return bad(str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}", kind="server_error")


def make_app(server: StarlingServer) -> Starlette:
    """The ASGI application."""

    def endpoint(
        handler: Callable[[Request], Any], *, open_: bool = False
    ) -> Callable[[Request], Any]:
        async def wrapped(request: Request) -> Response:
            try:
                if not open_:
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

    async def models(request: Request) -> Response:
        engine = server.engine()
        n_ctx = engine.n_ctx
        data = [
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
        return JSONResponse({"object": "list", "data": data})

    async def chat(request: Request) -> Response:
        req = parse_chat(await server.body(request), server.config.settings)
        engine = server.engine()
        mode = server.mode_of(req.generation.model)
        if mode is not None:
            req.generation.settings = replace(req.generation.settings, mode=mode)
        _budget(req.generation, engine.n_ctx)

        def call(hooks: ReplyHooks, cancel: threading.Event) -> ReplyOutcome:
            return server.service.respond(
                req.messages,
                req.generation.settings,
                hooks=hooks,
                cancel=cancel,
                stop=req.generation.stop,
                save=server.config.save,
            )

        return await _respond(server, request, req.generation, call, chat=True)

    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse_completion(
            await server.body(request), server.config.settings
        )
        engine = server.engine()
        server.mode_of(req.generation.model)
        tokens = req.prompt_ids or engine.tokenize(req.prompt_text or "", bos=True, special=True)
        _budget(req.generation, engine.n_ctx)

        def call(hooks: ReplyHooks, cancel: threading.Event) -> ReplyOutcome:
            return server.service.complete(
                tokens,
                req.generation.settings.sampling,
                hooks=hooks,
                cancel=cancel,
                stop=req.generation.stop,
                stop_ids=req.stop_token_ids,
            )

        return await _respond(
            server,
            request,
            req.generation,
            call,
            chat=False,
            token_ids=req.return_token_ids,
            prompt_ids=tokens,
        )

    async def tokenize(request: Request) -> Response:
        body = await server.body(request)
        engine = server.engine()
        if isinstance(body.get("messages"), list):
            chat_req = parse_chat({**body, "model": body.get("model", "")}, server.config.settings)
            s = chat_req.generation.settings
            tokens = render_tokens(chat_req.messages, engine.tokenize_text, s.system, s.style)
        else:
            text = body.get("content", body.get("prompt"))
            if not isinstance(text, str):
                raise bad("send 'content' (or 'prompt') as a string, or 'messages'", "content")
            special = body.get("add_special", body.get("add_special_tokens", False))
            tokens = engine.tokenize(text, bos=bool(special), special=True)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.n_ctx})

    async def detokenize(request: Request) -> Response:
        body = await server.body(request)
        engine = server.engine()
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise bad("'tokens' must be a list of token ids", "tokens")
        if any(not 0 <= t < engine.vocab_size for t in tokens):
            raise bad("a token id is not in the vocabulary", "tokens")
        text = engine.detokenize(tokens)
        return JSONResponse({"content": text, "prompt": text})

    routes = [
        Route("/health", endpoint(health, open_=True), methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(chat), methods=["POST"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/tokenize", endpoint(tokenize), methods=["POST"]),
        Route("/detokenize", endpoint(detokenize), methods=["POST"]),
    ]
    return Starlette(routes=routes)


def _budget(generation: Generation, n_ctx: int) -> None:
    """Without `max_tokens`, a reply may run to the end of the context window."""
    limit = generation.max_tokens or n_ctx
    generation.settings = generation.settings.with_sampling(max_tokens=limit)


async def _respond(
    server: StarlingServer,
    request: Request,
    generation: Generation,
    call: Callable[[ReplyHooks, threading.Event], ReplyOutcome],
    *,
    chat: bool,
    token_ids: bool = False,
    prompt_ids: list[int] | None = None,
) -> Response:
    ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    head = {
        "id": ident,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": generation.model or server.config.model_id,
    }
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
        if outcome.error:
            raise APIError(500, outcome.error, kind="server_error")
        choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH[outcome.stats.stop_reason]}
        if chat:
            choice["message"] = {"role": "assistant", "content": outcome.text}
        else:
            choice |= {"text": outcome.text, "logprobs": None}
            if token_ids:
                choice |= {"token_ids": outcome.token_ids, "prompt_token_ids": prompt_ids}
        return JSONResponse({**head, "choices": [choice], "usage": _usage(outcome)})

    chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    usage_null = {"usage": None} if generation.include_usage else {}

    def chunk(text: str | None, ids: list[int], finish: str | None) -> dict[str, Any]:
        if chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if token_ids:
                choice["token_ids"] = ids
        return {**chunk_head, "choices": [choice], **usage_null}

    async def stream() -> AsyncIterator[str]:
        try:
            if chat:
                first = chunk("", [], None)
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield _sse(first)
            async for item in events:
                if isinstance(item, ReplyOutcome):
                    yield _sse(chunk(None, [], FINISH[item.stats.stop_reason]))
                    if generation.include_usage:
                        yield _sse({**chunk_head, "choices": [], "usage": _usage(item)})
                elif isinstance(item, tuple):
                    text, ids = item
                    yield _sse(chunk(text, ids, None))
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
