"""A remote engine: generation on another machine, from token ids rendered here.

For users who outgrow one machine: vLLM (multi-GPU, multi-node), llama.cpp's llama-server, or
another `starling serve`. The conversation, history, template and KV bookkeeping stay local;
the server gets the exact token ids of the prompt, so whatever chat template it has is never
used. Tokenizing needs no model file: Starling's vocabulary ships with the package.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx2 as httpx

from starling_local.engine.logprobs import TokenLogprob
from starling_local.engine.runtime import Engine
from starling_local.engine.types import (
    EngineError,
    EngineStream,
    GenerationStats,
    KVSnapshot,
    ReplyDecoder,
    SamplingParams,
)
from starling_local.vocab import BOS_ID, END_OF_TURN, END_OF_TURN_ID, EOS_ID, packaged_vocabulary

RemoteKind = Literal["openai", "llama-server"]
END_IDS = frozenset({END_OF_TURN_ID, EOS_ID})
#: Tokenized by the server and here: a vocabulary check (another model's tokenizer differs).
PROBE = "Starling naïve café 12345 \t\n GPT4 Correct User: 東京 Code Assistant:"
TIMEOUT = httpx.Timeout(30.0, read=600.0)


class RemoteError(EngineError):
    """The remote engine cannot be used (the message says why, in one line)."""


class RemoteEngine:
    """Duck-types `Engine` for the conversation service; generation happens over HTTP."""

    def __init__(
        self,
        url: str,
        *,
        kind: str = "auto",
        model: str | None = None,
        api_key: str | None = None,
        vocab: Engine | None = None,
    ) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT)
        self._owns_vocab = vocab is None
        self._vocab = vocab or Engine(packaged_vocabulary(), vocab_only=True)
        self._lock = threading.Lock()  # one generation at a time, as with a local engine
        self._active: threading.Event | None = None
        self._closed = False
        try:
            self.kind: RemoteKind = self._detect() if kind == "auto" else _kind(kind)
            self.model, self.n_ctx = self._describe(model)
            self._check_vocabulary()
        except BaseException:
            self.close()
            raise
        self.backend = f"remote {'llama-server' if self.kind == 'llama-server' else 'OpenAI API'}"
        self.path = Path(f"{self.url}/{self.model}")
        self.model_key = "remote"
        self.cpu_threads = 0  # generation runs elsewhere
        self.speculate = False  # the remote server decides how it decodes
        self.vocab_size = self._vocab.vocab_size

    # --- connecting -----------------------------------------------------------------------

    def _get(self, path: str) -> httpx.Response:
        try:
            r = self._http.get(path)
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach the remote engine at {self.url}: {exc}") from exc
        if r.status_code in (401, 403):
            raise RemoteError(f"{self.url} refused the API key (HTTP {r.status_code})")
        return r

    def _detect(self) -> RemoteKind:
        """llama-server answers `/props`; vLLM and `starling serve` do not."""
        r = self._get("/props")
        if r.status_code == 200 and "default_generation_settings" in _json(r):
            return "llama-server"
        return "openai"

    def _describe(self, wanted: str | None) -> tuple[str, int]:
        if self.kind == "llama-server":
            props = _json(self._get("/props"))
            settings = props.get("default_generation_settings") or {}
            n_ctx = int(settings.get("n_ctx") or props.get("n_ctx") or 0)
            return wanted or str(props.get("model_path", "llama-server")), n_ctx or 4096
        r = self._get("/v1/models")
        if r.status_code != 200:
            raise RemoteError(f"{self.url}/v1/models answered HTTP {r.status_code}")
        models = _json(r).get("data") or []
        if not models:
            raise RemoteError(f"{self.url} serves no model")
        found = next((m for m in models if m.get("id") == wanted), None) if wanted else models[0]
        if found is None:
            names = ", ".join(str(m.get("id")) for m in models)
            raise RemoteError(f"{self.url} has no model {wanted!r} (it has: {names})")
        n_ctx = int(found.get("max_model_len") or found.get("context_length") or 8192)
        return str(found["id"]), n_ctx

    def _check_vocabulary(self) -> None:
        """The server's vocabulary is Starling's when our ids for a probe text read back as
        that text there, and `<|end_of_turn|>` is id 32000 there. Compared by ids, since only
        ids are sent: tokenizers disagree on text (transformers drops SentencePiece's leading
        space without a `tokenizer.json`), not on what an id stands for."""
        ids = self._vocab.tokenize(PROBE)
        model = {} if self.kind == "llama-server" else {"model": self.model}
        text = self._post("/detokenize", {**model, "tokens": ids})
        read = text.get("content", text.get("prompt"))
        eot = self._post(
            "/tokenize",
            {**model, "content": END_OF_TURN, "prompt": END_OF_TURN, "add_special": False,
             "add_special_tokens": False, "parse_special": True},
        )  # fmt: skip
        theirs = [t if isinstance(t, int) else t.get("id") for t in eot.get("tokens", [])]
        if (
            not isinstance(read, str)
            or _squash(read) != _squash(PROBE)
            or theirs != [END_OF_TURN_ID]
        ):
            raise RemoteError(
                f"{self.url} serves a model with another vocabulary than Starling's "
                f"({self.model}): its text for Starling's token ids differs"
            )

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach the remote engine at {self.url}: {exc}") from exc
        if r.status_code != 200:
            raise RemoteError(f"{self.url}{path} answered HTTP {r.status_code}")
        return _json(r)

    # --- the engine interface -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def tokenize_text(self, text: str) -> list[int]:
        return self._vocab.tokenize_text(text)

    def tokenize(self, text: str, *, bos: bool = False, special: bool = False) -> list[int]:
        return self._vocab.tokenize(text, bos=bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._vocab.detokenize(tokens)

    def token_bytes(self, token: int) -> bytes:
        return self._vocab.token_bytes(token)

    def cached_prefix(self, tokens: Sequence[int]) -> int:
        return 0  # the remote server keeps its own cache (`cache_prompt`, prefix caching)

    @property
    def cached_tokens(self) -> int:
        return 0

    def snapshot(self) -> KVSnapshot | None:
        return None

    def restore(self, snapshot: KVSnapshot) -> int:
        return 0

    def save_state(self, path: Path) -> int:
        return 0

    def load_state(self, path: Path) -> int:
        return 0

    def state_tokens(self, path: Path) -> list[int]:
        return []

    def generate(
        self,
        tokens: Sequence[int],
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
        *,
        stop_ids: Iterable[int] = (),
        raw: bool = False,
    ) -> EngineStream:
        params = params or SamplingParams()
        if self._closed:
            raise EngineError("the remote engine has been closed")
        stream = EngineStream.starting(tokens, self.n_ctx)
        # The same end ids as the local engine: `<|end_of_turn|>`, and `</s>` should a fine-tune
        # emit it.
        ends = frozenset() if params.ignore_eos else END_IDS
        stops = frozenset(stop_ids) | ends
        stream._chunks = self._run(
            list(tokens), params, cancel or threading.Event(), stream, stops, raw
        )
        return stream

    def _request(
        self, tokens: list[int], params: SamplingParams, stops: frozenset[int]
    ) -> tuple[str, dict[str, Any]]:
        budget = min(params.max_tokens, self.n_ctx - len(tokens))
        sampling = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "min_p": params.min_p,
            "stream": True,
        }
        if params.seed is not None:
            sampling["seed"] = params.seed
        sampling["frequency_penalty"] = params.frequency_penalty
        sampling["presence_penalty"] = params.presence_penalty
        grammar = params.grammar
        if self.kind == "llama-server":
            # An id list gets no BOS from llama-server: ours is the first id already.
            assert tokens[0] == BOS_ID
            body = {
                **sampling,
                "prompt": tokens,
                "n_predict": budget,
                "cache_prompt": True,
                "return_tokens": True,
                "repeat_penalty": params.repeat_penalty,
                "ignore_eos": params.ignore_eos,
            }
            if params.logit_bias:
                body["logit_bias"] = [[t, b] for t, b in params.logit_bias]
            if grammar is not None:
                # Our GBNF (it allows the space Starling writes first) in llama-server's field.
                body["grammar"] = grammar.gbnf
            if params.logprobs is not None:
                body["n_probs"] = max(params.logprobs, 1)
            return "/completion", body
        body = {
            **sampling,
            "model": self.model,
            "prompt": tokens,
            "max_tokens": budget,
            "stop_token_ids": sorted(stops),
            "ignore_eos": params.ignore_eos,
            "skip_special_tokens": True,
            "return_token_ids": True,
            "repetition_penalty": params.repeat_penalty,
            "stream_options": {"include_usage": True},
        }
        if params.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in params.logit_bias}
        if grammar is not None:
            # vLLM's structured-output field (also accepted by `starling serve`), with the
            # grammar made here from the schema: the same documents as the local engine. Sent
            # as `json`, vLLM's grammar allows any amount of whitespace between tokens, and a
            # model can pad the document until its budget runs out (the reply is validated
            # against the schema here either way).
            body["structured_outputs"] = {"grammar": grammar.gbnf}
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
            body["return_tokens_as_token_ids"] = True
        return "/v1/completions", body

    def _run(
        self,
        tokens: list[int],
        params: SamplingParams,
        cancel: threading.Event,
        stream: EngineStream,
        stops: frozenset[int],
        raw: bool,
    ) -> Iterator[str]:
        stats = stream.stats
        if params.prompt_logprobs is not None:
            raise RemoteError("prompt logprobs (echo) are not passed on to a remote engine")
        path, body = self._request(tokens, params, stops)
        decoder = ReplyDecoder(self._vocab.token_bytes, raw)
        with self._lock:
            if self._closed:
                raise EngineError("the remote engine has been closed")
            self._active = cancel
            t0 = time.perf_counter()
            stats.stop_reason = "length"
            try:
                with self._http.stream("POST", path, json=body) as response:
                    if response.status_code != 200:
                        response.read()
                        raise RemoteError(
                            f"{self.url}{path} answered HTTP {response.status_code}: "
                            f"{response.text[:200]}"
                        )
                    for event in _events(response):
                        if cancel.is_set():
                            stats.stop_reason = "cancelled"
                            break
                        ids, text, finish = self._parse(event, stats)
                        scores = _logprobs(event, self.kind) if params.logprobs is not None else []
                        for i, token in enumerate(ids):
                            if token in stops:
                                # `</s>` ends a turn here as it does in the local engine.
                                ended = token in END_IDS and not params.ignore_eos
                                stats.stop_reason = "end_of_turn" if ended else "stop"
                                finish = "done"
                                break
                            if stats.completion_tokens == 0:
                                stats.ttft_s = time.perf_counter() - t0
                            stats.completion_tokens += 1
                            stats.decode_s = time.perf_counter() - t0 - stats.ttft_s
                            stream.token_ids.append(token)
                            if i < len(scores):
                                stream.logprobs.append(scores[i])
                            piece = decoder.push(token)
                            if piece:
                                yield piece
                        if not ids and text:  # a server that sends no ids: its text
                            yield text
                        if finish:
                            if finish == "stop" and stats.stop_reason == "length":
                                stats.stop_reason = "end_of_turn"
                            break
                    else:
                        if not cancel.is_set():
                            raise RemoteError(
                                f"the remote engine at {self.url} ended its stream before the "
                                "reply was finished"
                            )
            except httpx.HTTPError as exc:
                raise RemoteError(f"the remote engine at {self.url} failed: {exc}") from exc
            self._active = None
            tail = decoder.flush()
            if tail:
                yield tail

    def _parse(self, event: dict[str, Any], stats: GenerationStats) -> tuple[list[int], str, str]:
        """(new token ids, text, finish reason or "") of one streamed event."""
        if self.kind == "llama-server":
            ids = [int(t) for t in event.get("tokens") or []]
            finish = ""
            if event.get("stop"):
                finish = "length" if event.get("stop_type") == "limit" else "stop"
                cached = (event.get("timings") or {}).get("cache_n")
                if isinstance(cached, int):
                    stats.prompt_evaluated = stats.prompt_tokens - cached
            return ids, str(event.get("content") or ""), finish
        usage = event.get("usage")
        if usage:
            details = usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens")
            if isinstance(cached, int):
                stats.prompt_evaluated = stats.prompt_tokens - cached
        choices = event.get("choices") or []
        if not choices:
            return [], "", ""
        choice = choices[0]
        ids = [int(t) for t in choice.get("token_ids") or []]
        return ids, str(choice.get("text") or ""), str(choice.get("finish_reason") or "")

    def close(self) -> None:
        """As the local engine's: cancel a running generation, wait for it to end, then free
        the connection and the vocabulary. Safe to call twice, and from any thread."""
        if self._closed and self._http.is_closed:
            return
        self._closed = True
        active = self._active
        if active is not None:
            active.set()
        if not self._lock.acquire(timeout=2.0):
            self._http.close()  # a read waiting for the server's next token ends now
            self._lock.acquire(timeout=10.0)
        try:
            self._http.close()
            if self._owns_vocab:
                self._vocab.close()
        finally:
            if self._lock.locked():
                self._lock.release()


def _kind(value: str) -> RemoteKind:
    if value not in ("openai", "llama-server"):
        raise RemoteError(f"unknown remote kind {value!r}: choose auto, openai or llama-server")
    return value  # type: ignore[return-value]


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream (`data: {...}` lines)."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            event = json.loads(payload)
        except ValueError:
            continue
        if isinstance(event, dict):
            if "error" in event and "choices" not in event and "content" not in event:
                message = event["error"].get("message") if isinstance(event["error"], dict) else ""
                raise RemoteError(f"the remote engine failed: {message or event['error']}")
            yield event


def _squash(text: str) -> str:
    """Text without its whitespace (detokenizers differ in the spaces they put back)."""
    return "".join(text.split())


def _token_id(value: Any) -> int | None:
    """A token as vLLM's `return_tokens_as_token_ids` writes it ("token_id:123")."""
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.startswith("token_id:"):
        with contextlib.suppress(ValueError):
            return int(value.removeprefix("token_id:"))
    return None


def _logprobs(event: dict[str, Any], kind: RemoteKind) -> list[TokenLogprob]:
    """The token logprobs of one streamed event (llama-server's `completion_probabilities`, or
    an OpenAI-style legacy `logprobs` object with token ids)."""
    out: list[TokenLogprob] = []
    if kind == "llama-server":
        for p in event.get("completion_probabilities") or []:
            top = tuple(
                (int(t["id"]), float(t["logprob"]))
                for t in p.get("top_logprobs") or []
                if "id" in t and "logprob" in t
            )
            if "id" in p and "logprob" in p:
                out.append(TokenLogprob(int(p["id"]), float(p["logprob"]), top))
        return out
    choices = event.get("choices") or []
    legacy = (choices[0].get("logprobs") if choices else None) or {}
    tokens = legacy.get("tokens") or []
    values = legacy.get("token_logprobs") or []
    tops = legacy.get("top_logprobs") or []
    for i, (token, value) in enumerate(zip(tokens, values, strict=False)):
        tid = _token_id(token)
        if tid is None or value is None:
            continue
        alternatives = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        top = tuple(
            (t, float(v))
            for k, v in alternatives.items()
            if (t := _token_id(k)) is not None and v is not None
        )
        out.append(TokenLogprob(tid, float(value), tuple(sorted(top, key=lambda x: -x[1]))))
    return out
