"""Ollama's native API on the same port as `/v1`: `/api/chat`, `/api/generate`, `/api/tags`,
`/api/show`, `/api/ps`, `/api/pull`, `/api/delete`, `/api/copy`, `/api/version` and `/`.

Another front end over the same conversation service: a chat is parsed by the same rules as
`/v1/chat/completions` (`ollama_format` translates it), replies come from the same worker, and
the model's lifetime (`keep_alive`, switching to another library model) is the server's
`ModelSlot`. Errors are Ollama's `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from starling_local.chat.service import ReplyHooks, ReplyOutcome, ReplyStart
from starling_local.chat.template import render_tokens
from starling_local.engine.types import SamplingParams
from starling_local.gguf.info import GGUFInfo, read_gguf
from starling_local.server import ollama_format as fmt
from starling_local.server.model_slot import parse_keep_alive
from starling_local.server.prepare import as_api_error, budget, chat_call, check_bias
from starling_local.server.protocol import APIError, parse_chat
from starling_local.server.responses import usage
from starling_local.server.run import Piece
from starling_local.vocab import END_OF_TURN_ID

if TYPE_CHECKING:
    from starling_local.server.app import StarlingServer

NDJSON = "application/x-ndjson"
#: `expires_at` of a model kept forever (Ollama writes a date centuries away too).
FOREVER = 10_000_000_000.0


def ollama_error(exc: Exception) -> JSONResponse:
    error = as_api_error(exc)
    return JSONResponse({"error": error.message}, status_code=error.status)


class OllamaAPI:
    """The routes, over one `StarlingServer`."""

    def __init__(self, server: StarlingServer) -> None:
        self.server = server
        self._digests: dict[tuple[str, int, int], str] = {}
        self._digest_lock = threading.Lock()

    def routes(self) -> list[Route]:
        def endpoint(handler: Callable[[Request], Awaitable[Response]]) -> Any:
            async def wrapped(request: Request) -> Response:
                try:
                    self.server.check_auth(request)
                    return await handler(request)
                except Exception as exc:
                    return ollama_error(exc)

            return wrapped

        return [
            Route("/", self.root, methods=["GET", "HEAD"]),
            Route("/api/version", endpoint(self.version), methods=["GET"]),
            Route("/api/tags", endpoint(self.tags), methods=["GET"]),
            Route("/api/ps", endpoint(self.ps), methods=["GET"]),
            Route("/api/show", endpoint(self.show), methods=["POST"]),
            Route("/api/chat", endpoint(self.chat), methods=["POST"]),
            Route("/api/generate", endpoint(self.generate), methods=["POST"]),
            Route("/api/pull", endpoint(self.pull), methods=["POST"]),
            Route("/api/delete", endpoint(self.delete), methods=["DELETE"]),
            Route("/api/copy", endpoint(self.copy), methods=["POST"]),
            Route("/api/create", endpoint(self.create), methods=["POST"]),
            Route("/api/push", endpoint(self.push), methods=["POST"]),
            Route("/api/embed", endpoint(self.embed), methods=["POST"]),
            Route("/api/embeddings", endpoint(self.embed), methods=["POST"]),
        ]

    # --- models ------------------------------------------------------------------------------

    def served_names(self) -> set[str]:
        """What the server's own model answers to (not another library model it switched to)."""
        config = self.server.config
        names = {config.model_id, "starling"}
        slot = self.server.slot
        if slot is not None:
            names.add(self.library_name(slot.default) or "")
        return {n.lower() for n in names | {fmt.ollama_name(n) for n in names if n} if n}

    def library_name(self, path: Path) -> str | None:
        from starling_local.acquire.library import ModelLibrary

        for entry in ModelLibrary().entries():
            if Path(entry.path) == path:
                return entry.name
        return None

    def resolve(self, name: Any) -> Path | None:
        """The model file a request names (None: the server's own model); 404 as Ollama says
        it for a name it does not have."""
        if not isinstance(name, str) or not name:
            raise APIError(400, "model is required")
        if name.lower() in self.served_names():
            return None
        slot = self.server.slot
        if slot is not None and slot.can_switch:
            from starling_local.acquire.library import ModelLibrary

            library = ModelLibrary()
            entry = library.find(name) or library.find(name.removesuffix(":latest"))
            if entry is not None:
                return Path(entry.path)
        raise APIError(404, f'model "{name}" not found, try pulling it first')

    def display(self, path: Path | None) -> str:
        """The name a model goes by in this API."""
        slot = self.server.slot
        if path is None or (slot is not None and path == slot.default):
            name = self.library_name(slot.default) if slot is not None else None
            return fmt.ollama_name(name or self.server.config.model_id)
        return fmt.ollama_name(self.library_name(path) or path.stem)

    def digest(self, path: Path, known: str | None = None) -> str:
        """The file's sha256 (the library's when it has one; computed once per file version)."""
        if known:
            return known
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._digest_lock:
            if key in self._digests:
                return self._digests[key]
        from starling_local.acquire.hub import sha256_of

        value = sha256_of(path)
        with self._digest_lock:
            self._digests[key] = value
        return value

    def describe(self, name: str, path: Path, sha: str | None, added: str) -> dict[str, Any]:
        info = read_gguf(path)
        modified = added or fmt.iso(path.stat().st_mtime)
        return {
            "name": name,
            "model": name,
            "modified_at": modified,
            "size": info.size,
            "digest": self.digest(path, sha),
            "details": fmt.details(info),
        }

    def listed(self) -> list[dict[str, Any]]:
        from starling_local.acquire.library import ModelLibrary

        slot = self.server.slot
        served = slot.default if slot is not None else None
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        if served is not None and served.is_file():
            out.append(self.describe(self.display(None), served, None, ""))
            seen.add(str(served))
        for entry in ModelLibrary().entries():
            if not entry.exists or entry.path in seen:
                continue
            name = fmt.ollama_name(entry.name)
            out.append(self.describe(name, Path(entry.path), entry.sha256, entry.added))
        return out

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": await run_in_threadpool(self.listed)})

    async def ps(self, request: Request) -> Response:
        slot = self.server.slot
        engine = self.server.service.engine
        if slot is None or slot.path is None or engine is None:
            return JSONResponse({"models": []})

        def entry() -> dict[str, Any]:
            assert slot.path is not None
            card = self.describe(self.display(slot.path), slot.path, None, "")
            expires = slot.expires_at
            return {
                **card,
                "expires_at": fmt.iso(expires if expires is not None else FOREVER),
                "size_vram": 0 if engine.backend == "CPU" else card["size"],
                "context_length": engine.n_ctx,
            }

        return JSONResponse({"models": [await run_in_threadpool(entry)]})

    async def show(self, request: Request) -> Response:
        body = await self.server.body(request)
        name = body.get("model") or body.get("name")
        path = self.resolve(name)
        slot = self.server.slot
        file = path or (slot.default if slot is not None else None)
        engine = self.server.service.engine
        if file is None or not file.is_file():
            raise APIError(404, f'model "{name}" not found')
        info: GGUFInfo = await run_in_threadpool(read_gguf, file)
        serving = path is None or (slot is not None and slot.path == path)
        n_ctx = engine.n_ctx if serving and engine is not None else info.context_length or 0
        modified = fmt.iso(file.stat().st_mtime)
        return JSONResponse(
            {
                "license": "",
                "modelfile": fmt.modelfile(self.display(path), str(file), n_ctx),
                "parameters": fmt.parameters(n_ctx),
                "template": fmt.TEMPLATE,
                "details": fmt.details(info),
                "model_info": fmt.model_info(info),
                "capabilities": ["completion"],
                "modified_at": modified,
            }
        )

    # --- replies -----------------------------------------------------------------------------

    def _keep_alive(self, body: dict[str, Any]) -> float | str | None:
        if "keep_alive" not in body or body["keep_alive"] is None:
            return "default"
        try:
            return parse_keep_alive(body["keep_alive"])
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    async def _load_only(
        self,
        path: Path | None,
        keep: float | str | None,
        shape: str,
        name: str,
        request_body: dict[str, Any],
    ) -> Response:
        """An empty request: load the model (`done_reason` load), or with `keep_alive` 0
        unload it (`unload`)."""
        unloading = keep is not None and not isinstance(keep, str) and keep <= 0
        if unloading:
            slot = self.server.slot
            if slot is not None and (path is None or slot.path == path):
                await run_in_threadpool(slot.unload)
        else:
            async with self.server.leased(path, fmt.num_ctx(request_body), keep):
                pass
        body: dict[str, Any] = {"model": name, "created_at": fmt.now()}
        body |= (
            {"message": {"role": "assistant", "content": ""}}
            if shape == "chat"
            else {"response": ""}
        )
        return JSONResponse(
            {**body, "done": True, "done_reason": "unload" if unloading else "load"}
        )

    async def chat(self, request: Request) -> Response:
        started = time.perf_counter_ns()
        body = await self.server.body(request)
        path = self.resolve(body.get("model"))
        name = str(body["model"])
        keep = self._keep_alive(body)
        if not body.get("messages"):
            fmt.refuse_unsupported(body, name)
            return await self._load_only(path, keep, "chat", name, body)
        req = parse_chat(fmt.chat_body(body, name), self.server.config.settings)
        async with self.server.leased(path, fmt.num_ctx(body), keep) as scope:
            engine = self.server.engine()
            tool_call = req.wants_call
            call = chat_call(
                self.server.service, engine, req, request, save=self.server.config.save
            )
            run = scope.start(request, call)
        timings = fmt.Timings(started, scope.lease.load_ns)
        stream = body.get("stream") is not False

        def message(outcome: ReplyOutcome | None, text: str) -> dict[str, Any]:
            out: dict[str, Any] = {"role": "assistant", "content": text}
            if outcome is not None and tool_call:
                out |= {"content": "", "tool_calls": fmt.tool_calls(outcome)}
            return out

        return await self._reply(
            request, run, stream, name, "chat", message, timings, engine,
            tool_call=tool_call, logprobs=req.generation.logprobs is not None,
        )  # fmt: skip

    async def generate(self, request: Request) -> Response:
        started = time.perf_counter_ns()
        body = await self.server.body(request)
        path = self.resolve(body.get("model"))
        name = str(body["model"])
        keep = self._keep_alive(body)
        fmt.refuse_unsupported(body, name)
        if not body.get("prompt"):
            return await self._load_only(path, keep, "generate", name, body)
        context = body.get("context") or []
        if not isinstance(context, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in context
        ):
            raise APIError(400, "'context' must be a list of token ids")
        openai = {"model": name, "messages": fmt.generate_messages(body), **fmt.options_body(body)}
        if body.get("logprobs"):
            openai |= {"logprobs": True, "top_logprobs": body.get("top_logprobs")}
        req = parse_chat(openai, self.server.config.settings)
        async with self.server.leased(path, fmt.num_ctx(body), keep) as scope:
            engine = self.server.engine()
            if any(not 0 <= t < engine.vocab_size for t in context):
                raise APIError(400, "'context' holds a token id that is not in the vocabulary")
            check_bias(req.generation, engine.vocab_size)
            budget(req.generation, engine.n_ctx)
            s = req.generation.settings
            if body.get("raw"):
                tokens = await run_in_threadpool(
                    engine.tokenize, str(body["prompt"]), bos=not context, special=True
                )
            else:
                rendered = await run_in_threadpool(
                    render_tokens, req.messages, engine.tokenize_text, s.system, s.style
                )
                tokens = rendered[1:] if context else rendered  # one BOS, at the very start
            prompt = [*context, *tokens]
            if len(prompt) >= engine.n_ctx:
                raise APIError(
                    400, f"the prompt is {len(prompt)} tokens; the context window is {engine.n_ctx}"
                )
            sampling: SamplingParams = s.sampling
            stop = req.generation.stop

            def call(hooks: ReplyHooks, cancel: threading.Event) -> ReplyOutcome:
                return self.server.service.complete(
                    prompt, sampling, hooks=hooks, cancel=cancel, stop=stop
                )

            run = scope.start(request, call)
        timings = fmt.Timings(started, scope.lease.load_ns)
        stream = body.get("stream") is not False

        def response(outcome: ReplyOutcome | None, text: str) -> dict[str, Any]:
            out: dict[str, Any] = {"response": text}
            if outcome is not None:
                ended = [END_OF_TURN_ID] if outcome.stats.stop_reason == "end_of_turn" else []
                out["context"] = [*prompt, *outcome.token_ids, *ended]
            return out

        return await self._reply(
            request, run, stream, name, "generate", response, timings, engine,
            logprobs=req.generation.logprobs is not None,
        )  # fmt: skip

    async def _reply(
        self,
        request: Request,
        run: Any,
        stream: bool,
        name: str,
        shape: str,
        content: Callable[[ReplyOutcome | None, str], dict[str, Any]],
        timings: fmt.Timings,
        engine: Any,
        *,
        tool_call: bool = False,
        logprobs: bool = False,
    ) -> Response:
        """The reply as one object, or as NDJSON lines: one per piece of text, then the last
        with `done_reason` and the durations. A demanded tool call is sent whole, parsed, in
        the last line."""
        events = run.events()
        started = await anext(events)
        assert isinstance(started, ReplyStart)
        key = "message" if shape == "chat" else None

        def wrap(part: dict[str, Any]) -> dict[str, Any]:
            return {key: part} if key else part

        def last(outcome: ReplyOutcome, text: str) -> dict[str, Any]:
            request.state.usage = usage(outcome)  # the request log's figures
            if outcome.stats.stop_reason == "cancelled":
                raise APIError(503, "the reply was cancelled", kind="server_error")
            reason = fmt.done_reason(outcome)
            request_usage = fmt.durations(outcome, timings, time.perf_counter_ns())
            return {
                "model": name,
                "created_at": fmt.now(),
                **wrap(content(outcome, text)),
                "done": True,
                "done_reason": reason,
                **request_usage,
            }

        if not stream:
            outcome: ReplyOutcome | None = None
            async for item in events:
                if isinstance(item, ReplyOutcome):
                    outcome = item
            assert outcome is not None
            return JSONResponse(last(outcome, outcome.text))

        async def lines() -> AsyncIterator[str]:
            try:
                async for item in events:
                    if isinstance(item, ReplyOutcome):
                        yield json.dumps(last(item, "")) + "\n"
                    elif isinstance(item, Piece) and item.text and not tool_call:
                        chunk = {"model": name, "created_at": fmt.now(),
                                 **wrap(content(None, item.text)), "done": False}  # fmt: skip
                        if logprobs:
                            chunk["logprobs"] = self._logprobs(item, engine)
                        yield json.dumps(chunk) + "\n"
            except Exception as exc:  # after the headers: the error is the last line
                yield json.dumps({"error": as_api_error(exc).message}) + "\n"
            finally:
                await events.aclose()

        return StreamingResponse(lines(), media_type=NDJSON)

    def _logprobs(self, piece: Piece, engine: Any) -> list[dict[str, Any]]:
        def text(token: int) -> str:
            return bytes(engine.token_bytes(token)).decode("utf-8", "backslashreplace")

        return [
            {
                "token": text(lp.token),
                "logprob": lp.logprob,
                "top_logprobs": [{"token": text(t), "logprob": p} for t, p in lp.top],
            }
            for lp in piece.logprobs
        ]

    # --- the library -------------------------------------------------------------------------

    async def pull(self, request: Request) -> Response:
        body = await self.server.body(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "model is required")
        spec = name.removesuffix(":latest")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()

        def put(item: dict[str, Any] | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            from starling_local.acquire.pull import pull

            put({"status": "pulling manifest"})

            class Bar:
                def __init__(self, label: str) -> None:
                    self.digest = "sha256:" + hashlib.sha256(label.encode()).hexdigest()

                def __call__(self, done: int, total: int, detail: str = "", /) -> None:
                    put({"status": f"pulling {self.digest[7:19]}", "digest": self.digest,
                         "total": total, "completed": done})  # fmt: skip

                def close(self, message: str = "") -> None:
                    return None

            try:
                entry = pull(spec, progress_factory=Bar)
            except BaseException as exc:
                put(exc)
                return
            put({"status": "verifying sha256 digest"})
            put({"status": "writing manifest"})
            put({"status": "success", "model": fmt.ollama_name(entry.name)})
            put(None)

        threading.Thread(target=work, name="ollama-pull", daemon=True).start()
        if body.get("stream") is False:
            last: dict[str, Any] = {}
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                last = item
            return JSONResponse({"status": last.get("status", "success")})

        async def lines() -> AsyncIterator[str]:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    yield json.dumps({"error": as_api_error(item).message}) + "\n"
                    return
                if isinstance(item, BaseException):
                    yield json.dumps({"error": "the pull was interrupted"}) + "\n"
                    return
                yield json.dumps(item) + "\n"

        return StreamingResponse(lines(), media_type=NDJSON)

    async def delete(self, request: Request) -> Response:
        from starling_local.acquire.library import ModelLibrary

        body = await self.server.body(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "model is required")
        library = ModelLibrary()
        entry = library.find(name) or library.find(name.removesuffix(":latest"))
        slot = self.server.slot
        if name.lower() in self.served_names() or (
            entry is not None and slot is not None and Path(entry.path) == slot.default
        ):
            raise APIError(400, f"model '{name}' is the one this server serves; stop it first")
        if entry is None:
            raise APIError(404, f"model '{name}' not found")
        if slot is not None and slot.path == Path(entry.path):
            await run_in_threadpool(slot.unload)
        await run_in_threadpool(library.remove, entry.name)
        return Response(status_code=200)

    async def copy(self, request: Request) -> Response:
        from dataclasses import replace

        from starling_local.acquire.library import ModelLibrary, now_iso

        body = await self.server.body(request)
        source, destination = body.get("source"), body.get("destination")
        if not isinstance(source, str) or not isinstance(destination, str) or not destination:
            raise APIError(400, "'source' and 'destination' are required")
        library = ModelLibrary()
        path = self.resolve(source)
        slot = self.server.slot
        file = path or (slot.default if slot is not None else None)
        entry = next((e for e in library.entries() if file and Path(e.path) == file), None)
        if entry is None:
            if file is None:
                raise APIError(404, f"model '{source}' not found")
            await run_in_threadpool(
                library.register, file, name=destination.removesuffix(":latest"), source="local"
            )
        else:
            copy = replace(entry, name=destination.removesuffix(":latest"), source="copy",
                           added=now_iso())  # fmt: skip
            await run_in_threadpool(library.add, copy)
        return Response(status_code=200)

    async def create(self, request: Request) -> Response:
        raise APIError(
            501,
            "starling-local does not create models from Modelfiles: convert a checkpoint with "
            "`starling convert`, or register a GGUF with `starling pull ./file.gguf`",
        )

    async def push(self, request: Request) -> Response:
        raise APIError(501, "starling-local does not push models to a registry")

    async def embed(self, request: Request) -> Response:
        raise APIError(501, "starling-local serves no embeddings: Starling is a chat model")

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": fmt.OLLAMA_VERSION})

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")
