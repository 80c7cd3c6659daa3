"""Which CPU kernels the engine uses: the AMX probe, its cached verdict, the override, and
real loads with and without repacked weights."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from starling_local.llamacpp import cpu_kernels as ck
from starling_local.llamacpp.cpu_kernels import AMX, REPACK, ProbeResult, choose

BOTH = (AMX, REPACK)
WORKS = ProbeResult(True, "the probe ran AMX kernels", True)
DIES = ProbeResult(False, "the probe died with SIGILL", True)


@pytest.fixture(autouse=True)
def fresh_choice() -> Iterator[None]:
    """Each test decides anew, and leaves llama.cpp's full list behind."""
    ck.reset_for_tests()
    yield
    ck.reset_for_tests()


def verdict_of(result: ProbeResult, cached: bool = False) -> Callable[[], tuple[ProbeResult, bool]]:
    return lambda: (result, cached)


def never() -> tuple[ProbeResult, bool]:
    raise AssertionError("the verdict was asked for where it does not matter")


# --- the decision (fast) ---------------------------------------------------------------------


def test_where_amx_dies_repacking_stays_on_without_it() -> None:
    chosen = choose(BOTH, "auto", verdict_of(DIES))
    assert chosen.buffer_types == (REPACK,) and chosen.repack and not chosen.amx
    assert "SIGILL" in chosen.reason and not chosen.whole_list
    assert chosen.describe() == "CPU_REPACK (AMX unusable: the probe died with SIGILL (probed))"


def test_where_amx_works_it_is_used() -> None:
    chosen = choose(BOTH, "auto", verdict_of(WORKS, cached=True))
    assert chosen.buffer_types == BOTH and chosen.whole_list
    assert chosen.reason == "AMX works (cached probe)"


def test_a_build_without_amx_is_not_probed() -> None:
    chosen = choose((REPACK,), "auto", never)
    assert chosen.buffer_types == (REPACK,) and "no AMX kernels" in chosen.reason


def test_the_override_wins_in_both_directions() -> None:
    on = choose(BOTH, "on", never)
    assert on.buffer_types == BOTH and on.reason == "STARLING_CPU_EXTRA_BUFFERS=on"
    off = choose(BOTH, "off", never)
    assert off.buffer_types == () and off.model_params() == {"use_extra_bufts": False}


def test_the_environment_variable_reaches_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ck, "available_buffer_types", lambda: BOTH)
    monkeypatch.setattr(ck, "amx_verdict", verdict_of(DIES))
    monkeypatch.setenv("STARLING_CPU_EXTRA_BUFFERS", "1")
    assert ck.cpu_kernels().buffer_types == BOTH
    ck.reset_for_tests()
    monkeypatch.setenv("STARLING_CPU_EXTRA_BUFFERS", "0")
    assert ck.cpu_kernels().buffer_types == ()
    ck.reset_for_tests()
    monkeypatch.delenv("STARLING_CPU_EXTRA_BUFFERS")
    assert ck.cpu_kernels().buffer_types == (REPACK,)


# --- the probe and its cache (fast: children that exit or die on purpose) --------------------


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_killed_by_sigill_means_amx_is_unusable() -> None:
    result = ck.run_probe(child("import os, signal; os.kill(os.getpid(), signal.SIGILL)"))
    assert result == ProbeResult(False, "the probe died with SIGILL", True)


def test_a_child_that_exits_cleanly_means_amx_works() -> None:
    assert ck.run_probe(child("pass")) == WORKS


def test_a_probe_that_fails_by_itself_is_not_a_verdict() -> None:
    result = ck.run_probe(child("raise SystemExit('no room for the probe model')"))
    assert not result.usable and not result.definite
    assert "exit 1: no room for the probe model" in result.detail
    slow = ck.run_probe(child("import time; time.sleep(5)"), timeout=0.5)
    assert not slow.usable and not slow.definite and "did not finish" in slow.detail


def test_the_verdict_is_probed_once_then_read_from_the_cache(
    monkeypatch: pytest.MonkeyPatch, starling_home: Path
) -> None:
    runs: list[int] = []

    def probe() -> ProbeResult:
        runs.append(1)
        return DIES

    monkeypatch.setattr(ck, "run_probe", probe)
    assert ck.amx_verdict() == (DIES, False)
    assert ck.amx_verdict() == (DIES, True)
    assert len(runs) == 1 and ck.verdict_file().is_relative_to(starling_home)
    # Another llama.cpp build, CPU or kernel: probed again.
    monkeypatch.setattr(ck, "machine_key", lambda: "another-build")
    assert ck.amx_verdict() == (DIES, False) and len(runs) == 2


def test_a_failed_probe_is_tried_again_next_time(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[int] = []

    def probe() -> ProbeResult:
        runs.append(1)
        return ProbeResult(False, "the probe did not finish in 120 s", False)

    monkeypatch.setattr(ck, "run_probe", probe)
    ck.amx_verdict()
    ck.amx_verdict()
    assert len(runs) == 2


def test_a_damaged_cache_file_is_probed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    path = ck.verdict_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"' + ck.machine_key() + '": {"usable": ')
    monkeypatch.setattr(ck, "run_probe", lambda: WORKS)
    assert ck.amx_verdict() == (WORKS, False)
    assert ck.amx_verdict() == (WORKS, True)


def test_the_real_probe_runs_here() -> None:
    """The probe child itself: a quantized model through prompt and decode. Here (no AMX, or AMX
    that works) it exits cleanly; where AMX is disabled under a hypervisor it dies by SIGILL."""
    result = ck.run_probe()
    assert result.definite, result.detail


# --- real loads (integration) ----------------------------------------------------------------


def model_buffers(log: Path) -> list[str]:
    lines = log.read_text(errors="replace").splitlines()
    return [line.split(":")[1].split()[0] for line in lines if "model buffer size" in line]


def greedy_reply(path: Path, log: Path) -> tuple[list[int], list[str]]:
    from starling_local.chat.template import Message
    from starling_local.engine.runtime import Engine
    from starling_local.engine.types import SamplingParams
    from tests.prompting import generate

    engine = Engine(path, n_ctx=512, log_path=log)
    try:
        # A long prompt: its evaluation takes the batched (gemm) kernels, the reply the gemv ones.
        question = Message("user", "Write a long story about a llama. " * 20)
        params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
        stream = generate(engine, [question], params=params).stream
        stream.consume()
        return list(stream.token_ids), model_buffers(log)
    finally:
        engine.close()


def teacher_forced_logits(path: Path, keep: tuple[str, ...], ids: list[int] | None) -> Any:
    """Logits at every position of one prompt: evaluated as one batch (the gemm kernels) and
    the first 32 positions one token at a time (the gemv kernels decoding uses)."""
    import llama_cpp
    import numpy as np

    ck.use_buffer_types(keep)
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False)
    try:
        ids = ids or llm.tokenize(("Write a long story about a llama. " * 20).encode())[:200]
        llm.eval(ids)
        batch = np.array(llm.scores[: len(ids)])
        llm.reset()
        for token in ids[:32]:
            llm.eval([token])
        return ids, batch, np.array(llm.scores[:32])
    finally:
        llm.close()


def test_repacked_weights_round_no_more_than_batch_size_already_does(tiny_q4: Path) -> None:
    """Repacked Q4_K weights compute the same function as plain ones up to rounding, and that
    rounding is no larger than what plain weights already show between a batch and one token at
    a time. So greedy ids can differ only where the two best logits are that close: on this
    random model (near-tied logits) the first difference comes after 8 tokens; measured
    max |logit difference| 0.087 (batch) and 0.062 (decode), logits of standard deviation 1.0."""
    import numpy as np

    if REPACK not in ck.available_buffer_types():
        pytest.skip("this llama.cpp build has no CPU_REPACK buffer type")
    ids, plain, plain_one = teacher_forced_logits(tiny_q4, (), None)
    _, repacked, repacked_one = teacher_forced_logits(tiny_q4, (REPACK,), ids)
    between_batch_sizes = float(np.abs(plain[:32] - plain_one).max())
    assert float(np.abs(repacked - plain).max()) <= 2 * between_batch_sizes
    assert float(np.abs(repacked_one - plain_one).max()) <= 2 * between_batch_sizes
    top2 = np.sort(plain, axis=1)[:, -2:]
    flipped = plain.argmax(axis=1) != repacked.argmax(axis=1)
    assert (top2[flipped, 1] - top2[flipped, 0] <= 2 * between_batch_sizes).all()


def test_the_engine_loads_repacked_weights_only_when_chosen(
    tiny_q4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if REPACK not in ck.available_buffer_types():
        pytest.skip("this llama.cpp build has no CPU_REPACK buffer type")
    monkeypatch.setenv("STARLING_CPU_EXTRA_BUFFERS", "off")
    _, plain_buffers = greedy_reply(tiny_q4, tmp_path / "plain.log")
    ck.reset_for_tests()
    monkeypatch.setenv("STARLING_CPU_EXTRA_BUFFERS", "on")
    _, repacked_buffers = greedy_reply(tiny_q4, tmp_path / "repacked.log")
    assert REPACK not in plain_buffers and REPACK in repacked_buffers


def test_where_the_probe_says_amx_dies_a_real_load_repacks_without_it(
    tiny_q4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decision path end to end: a build that offers AMX and CPU_REPACK, a probe that died;
    the engine loads with CPU_REPACK, and no weight goes to an AMX buffer."""
    if REPACK not in ck.available_buffer_types():
        pytest.skip("this llama.cpp build has no CPU_REPACK buffer type")
    real = ck.available_buffer_types()
    monkeypatch.setattr(ck, "available_buffer_types", lambda: (AMX, *real))
    monkeypatch.setattr(ck, "amx_verdict", verdict_of(DIES, cached=True))
    _, buffers = greedy_reply(tiny_q4, tmp_path / "engine.log")
    assert REPACK in buffers and AMX not in buffers
    assert ck.cpu_kernels().describe().startswith("CPU_REPACK (AMX unusable")
