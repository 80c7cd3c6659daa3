"""The engine used from several threads, and closed while it works (real llama.cpp)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from starling_local.chat.template import Message
from starling_local.engine import llama_adapter
from starling_local.engine.runtime import Engine
from starling_local.engine.types import EngineClosedError, SamplingParams
from tests.prompting import generate

LONG = SamplingParams(temperature=0.0, max_tokens=100_000)  # until the window is full
SHORT = SamplingParams(temperature=0.0, max_tokens=12)


def test_close_while_another_thread_generates(tiny_q4: Path) -> None:
    engine = Engine(tiny_q4, n_ctx=4096)
    reply = generate(engine, [Message("user", "Go on")], params=LONG)
    started = threading.Event()
    chunks: list[str] = []

    def consume() -> None:
        for chunk in reply.stream:
            chunks.append(chunk)
            started.set()

    worker = threading.Thread(target=consume)
    worker.start()
    assert started.wait(30)
    engine.close()  # cancels, waits for the generation to leave llama.cpp, then frees it
    worker.join(10)
    assert not worker.is_alive()
    assert reply.stream.stats.stop_reason == "cancelled"
    assert 0 < reply.stream.stats.completion_tokens < 4000
    assert engine.closed
    with pytest.raises(EngineClosedError):
        engine.tokenize_text("hello")
    with pytest.raises(EngineClosedError):
        generate(engine, [Message("user", "again")], params=SHORT)
    engine.close()  # twice is fine


def test_close_with_an_abandoned_stream(tiny_q4: Path) -> None:
    """A stream that was started and then left (nobody iterates it) must not keep close()
    waiting forever: the engine closes the suspended generation itself."""
    engine = Engine(tiny_q4, n_ctx=1024)
    reply = generate(engine, [Message("user", "Hi")], params=LONG)
    next(iter(reply.stream))
    done = threading.Event()
    closer = threading.Thread(target=lambda: (engine.close(), done.set()))
    closer.start()
    assert done.wait(10), "close() hung on a suspended generation"
    assert list(reply.stream) == []  # the stream has ended
    assert reply.stream.stats.stop_reason == "cancelled"


def test_generations_from_two_threads_run_one_after_the_other(engine: Engine) -> None:
    prompts = ["The first one", "The second one"]
    alone = [generate(engine, [Message("user", p)], params=SHORT).stream.consume() for p in prompts]
    results: dict[str, list[str]] = {p: [] for p in prompts}

    def run(prompt: str) -> None:
        text = generate(engine, [Message("user", prompt)], params=SHORT).stream.consume()
        results[prompt].append(text)  # every thread's reply is checked, not the last one

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Never interleaved in one KV cache: all six replies are the ones each prompt gets alone.
    assert [results[p] for p in prompts] == [[a] * 3 for a in alone]


def test_tokenizing_does_not_wait_for_a_generation(tiny_q4: Path, vocab: Engine) -> None:
    engine = Engine(tiny_q4, n_ctx=4096)
    cancel = threading.Event()
    reply = generate(engine, [Message("user", "Go on")], params=LONG, cancel=cancel)
    it = iter(reply.stream)
    next(it)  # the generation holds the context now
    start = time.perf_counter()
    tokens = engine.tokenize_text("Hello world")
    assert tokens == vocab.tokenize_text("Hello world")
    assert time.perf_counter() - start < 5  # it did not wait for 4,000 tokens
    cancel.set()
    list(it)
    engine.close()


class _OldLlama:
    """A stand-in for a llama-cpp-python `Llama` whose private attributes were renamed."""

    def __init__(self) -> None:
        self.context = None
        self._batch = None
        self._model = None
        self._seed = 0
        self.n_tokens = 0
        self.input_ids = None


def test_a_llama_cpp_python_without_the_private_parts_is_refused_in_one_line() -> None:
    assert llama_adapter.missing_parts() == []  # the installed one has them all
    assert llama_adapter.missing_parts(_OldLlama) == ["Llama._ctx"]
    with pytest.raises(llama_adapter.IncompatibleLlamaError) as info:
        llama_adapter.check_compatible(_OldLlama)
    message = str(info.value)
    assert "\n" not in message and "llama-cpp-python>=0.3.36,<0.4" in message


def test_the_cli_says_which_llama_cpp_python_it_needs(tiny_q4: Path) -> None:
    code = (
        "import sys, llama_cpp.llama_cpp as low\n"
        "del low.llama_state_seq_set_data\n"  # as if an upgrade had renamed it
        "from starling_local.cli import main\n"
        f"sys.exit(main(['ask', 'hi', '--model', {str(tiny_q4)!r}, '--no-save']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"starling: error: starling-local needs llama-cpp-python >=0.3.36,<0.4 (installed: "
        f"{llama_adapter.version()}, which has no llama_state_seq_set_data): "
        "pip install 'llama-cpp-python>=0.3.36,<0.4'"
    ]


class _CancelAfter(threading.Event):
    """An event that reads as set from its `n`-th check on: a client leaving mid-prefill."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.checks = 0
        self.n = n

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks >= self.n or super().is_set()


def test_cancel_during_a_long_prompt_evaluation(
    tiny_q4: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prompt is evaluated a chunk at a time with a cancel check between chunks: a client
    that goes away stops the evaluation, not only the decoding."""
    monkeypatch.setattr("starling_local.engine.runtime.PREFILL_CHUNK", 64)
    engine = Engine(tiny_q4, n_ctx=2048)
    long_prompt = [Message("user", "llamas and alpacas " * 150)]
    cancel = _CancelAfter(3)
    reply = generate(engine, long_prompt, params=SHORT, cancel=cancel)
    assert reply.stream.consume() == ""
    assert reply.stream.stats.stop_reason == "cancelled"
    assert reply.stream.stats.completion_tokens == 0
    prompt = len(reply.prompt.tokens)
    evaluated = engine.cached_tokens
    assert prompt > 600 and 0 < evaluated <= 2 * 64  # stopped after two chunks
    # The next reply continues from what was evaluated.
    again = generate(engine, long_prompt, params=SHORT)
    again.stream.consume()
    assert again.stream.stats.prompt_evaluated == prompt - evaluated
    assert again.stream.stats.completion_tokens == SHORT.max_tokens
    engine.close()


def test_every_decode_runs_on_one_compute_thread(
    tiny_q4: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libgomp keeps a thread pool per thread that ever decoded; two pools on two cores make
    it stop spinning and decoding ran at 0.87x. Whatever thread asks, llama.cpp computes on one."""
    import llama_cpp._internals

    seen: set[str] = set()
    real_decode = llama_cpp._internals.LlamaContext.decode

    def decode(self: object, batch: object) -> None:
        seen.add(threading.current_thread().name)
        real_decode(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(llama_cpp._internals.LlamaContext, "decode", decode)
    engine = Engine(tiny_q4, n_ctx=1024)
    try:
        texts: list[str] = []

        def ask() -> None:
            reply = generate(engine, [Message("user", "Hi")], params=SHORT)
            texts.append(reply.stream.consume())

        ask()
        for _ in range(2):
            worker = threading.Thread(target=ask)
            worker.start()
            worker.join(60)
        assert len(texts) == 3 and texts[0] == texts[1] == texts[2]
        assert len(seen) == 1 and next(iter(seen)).startswith("starling-compute")
    finally:
        engine.close()


def test_an_error_on_the_compute_thread_reaches_the_caller() -> None:
    from starling_local.engine.compute import on_compute_thread

    def fail() -> None:
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        on_compute_thread(fail)
    # Called from the compute thread itself, it runs there at once (no deadlock).
    assert on_compute_thread(lambda: on_compute_thread(threading.current_thread)).name.startswith(
        "starling-compute"
    )
