"""What the OpenAI and Ollama front ends of the server share: a checked chat request made
into the call that replies to it, and errors turned into statuses."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from starling_local.chat.context import ContextOverflowError
from starling_local.chat.service import (
    ConversationService,
    ReplyHooks,
    ReplyOutcome,
    ServiceClosedError,
)
from starling_local.chat.tools import call_grammar, describe
from starling_local.engine.grammar import GrammarError
from starling_local.engine.interface import EngineLike
from starling_local.engine.remote import RemoteError
from starling_local.engine.types import EngineClosedError
from starling_local.errors import StarlingError, UsageError
from starling_local.server.history import respond
from starling_local.server.protocol import APIError, ChatRequest, Generation, invalid
from starling_local.server.run import Call


def chat_call(
    service: ConversationService,
    engine: EngineLike,
    req: ChatRequest,
    request: Request,
    *,
    save: bool,
) -> Call:
    """Check a parsed chat request against the engine (logit bias ids, a demanded tool call,
    the token budget) and return the call that answers it."""
    check_bias(req.generation, engine.vocab_size)
    if req.wants_call:
        with_tool_call(req)
    check_grammar(req.generation, engine)
    budget(req.generation, engine.n_ctx)
    client = request.headers.get("x-starling-client") or req.user
    log_fields(request, req.generation, tools=len(req.tools), tool_choice=req.tool_choice)

    def call(hooks: ReplyHooks, cancel: threading.Event) -> ReplyOutcome:
        return respond(
            service,
            req.messages,
            req.generation.settings,
            hooks=hooks,
            cancel=cancel,
            stop=req.generation.stop,
            save=save,
            client_id=client,
        )

    return call


def error_response(error: APIError) -> JSONResponse:
    headers = {}
    if error.status == 429:
        headers["Retry-After"] = "1"
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def as_api_error(exc: Exception) -> APIError:
    """The client's mistakes are 4xx; everything else (the engine, a remote, the store) 5xx."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ClientDisconnect):  # gone mid-body: logged as nginx logs it
        return APIError(499, "the client closed the connection", kind="client_closed")
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


def check_grammar(generation: Generation, engine: EngineLike) -> None:
    """A grammar llama.cpp will not parse is the request's 400 now, not a failed reply later
    (a remote engine checks its own)."""
    grammar = generation.settings.sampling.grammar
    check = getattr(engine, "check_grammar", None)
    if grammar is None or check is None:
        return
    try:
        check(grammar)
    except StarlingError as exc:
        raise invalid(
            f"the schema's grammar was refused: {exc}", code="unsupported_schema"
        ) from None


def check_bias(generation: Generation, vocab_size: int) -> None:
    for token, _ in generation.settings.sampling.logit_bias:
        if not 0 <= token < vocab_size:
            raise invalid(f"'logit_bias': token id {token} is not in the vocabulary", "logit_bias")


def with_tool_call(req: ChatRequest) -> None:
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


def log_fields(request: Request, generation: Generation, **extra: Any) -> None:
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


def budget(generation: Generation, n_ctx: int) -> None:
    """Without `max_tokens`, a reply may run to the end of the context window."""
    limit = n_ctx if generation.max_tokens is None else generation.max_tokens
    generation.settings = generation.settings.with_sampling(max_tokens=limit)


def check_finished(outcome: ReplyOutcome) -> None:
    """A reply that failed or was cancelled (the server is stopping) is an error, never a
    reply that looks complete."""
    if outcome.error:
        raise APIError(500, outcome.error, kind="server_error")
    if outcome.stats.stop_reason == "cancelled":
        raise APIError(503, "the reply was cancelled", kind="server_error", code="cancelled")
