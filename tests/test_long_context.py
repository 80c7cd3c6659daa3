"""The long-context benchmark: each depth's prompt is evaluated once, and every attention
configuration continues from that cache, converted to its own layout by `kv_layout`."""

from __future__ import annotations

import ctypes
import json
import struct
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from starling_local.bench import kv_layout
from starling_local.bench.long_context import _decode, _load, _state, n_head_kv
from starling_local.engine.runtime import Engine
from tests.cli_helpers import starling

PROMPT = [1, *range(300, 560)]
OTHER = [1, *range(20000, 20260)]


def _logits(ctx: object, engine: Engine) -> np.ndarray:

    row = llama_cpp.llama_get_logits_ith(ctx, -1)
    return np.ctypeslib.as_array(
        ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), (engine.vocab_size,)
    ).copy()


def _next_logits(engine: Engine, state: bytes | None, prompt: list[int]) -> np.ndarray:
    """The logits after `prompt[-1]`, with the cache before it evaluated here (`state` None) or
    loaded from `state`."""
    with engine.raw_context() as ctx:
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        if state is None:
            _decode(ctx, prompt[:-1])
        else:
            _load(ctx, state)
        _decode(ctx, prompt[-1:])
        return _logits(ctx, engine)


@pytest.mark.parametrize(("flash_attn", "kv_type"), [(False, "f16"), (True, "q8_0")])
def test_a_converted_cache_continues_as_one_evaluated_in_place(
    distinct_q8: Path, flash_attn: bool, kv_type: str
) -> None:

    source = Engine(distinct_q8, n_ctx=512, flash_attn=True, kv_type="f16")
    try:
        with source.raw_context() as ctx:
            _decode(ctx, PROMPT[:-1])
            state = _state(ctx)
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            _decode(ctx, OTHER[:-1])
            other_state = _state(ctx)  # another conversation
            heads = n_head_kv(ctx)
    finally:
        source.close()
    converted = kv_layout.convert(state, kv_type=kv_type, flash_attn=flash_attn, n_head_kv=heads)
    target = Engine(distinct_q8, n_ctx=512, flash_attn=flash_attn, kv_type=kv_type)
    try:
        own = _next_logits(target, None, PROMPT)
        loaded = _next_logits(target, converted, PROMPT)
        wrong = kv_layout.convert(
            other_state, kv_type=kv_type, flash_attn=flash_attn, n_head_kv=heads
        )
        shifted = _next_logits(target, wrong, PROMPT)
    finally:
        target.close()
    # Same keys and values, up to the target type's rounding and the attention kernel: the
    # same next token, logits within a hundredth of their spread.
    spread = float(own.max() - own.min())
    assert int(loaded.argmax()) == int(own.argmax())
    assert float(np.abs(loaded - own).max()) < 0.01 * spread
    # A cache of other tokens is far off: the comparison can fail.
    assert float(np.abs(shifted - own).max()) > 10 * float(np.abs(loaded - own).max())
    if kv_type == "q8_0":
        assert len(converted) < 0.6 * len(state)  # 34 bytes a block of 32, against 64


def test_only_an_f16_flash_attention_cache_converts(distinct_q8: Path) -> None:
    engine = Engine(distinct_q8, n_ctx=256, flash_attn=True, kv_type="q8_0")
    try:
        with engine.raw_context() as ctx:
            _decode(ctx, PROMPT[:20])
            q8 = _state(ctx)
    finally:
        engine.close()
    with pytest.raises(kv_layout.LayoutError, match="not f16"):
        kv_layout.convert(q8, kv_type="f16", flash_attn=False, n_head_kv=1)
    with pytest.raises(kv_layout.LayoutError, match="sequence state"):
        kv_layout.convert(b"GGUF" + bytes(60), kv_type="f16", flash_attn=False, n_head_kv=1)
    with pytest.raises(kv_layout.LayoutError, match="needs flash attention"):
        kv_layout.convert(q8, kv_type="q8_0", flash_attn=False, n_head_kv=1)
    empty = struct.pack("<IiII", kv_layout.MAGIC, 0, 1, 0)
    assert kv_layout.convert(empty, kv_type="q8_0", flash_attn=True, n_head_kv=1) == empty


def test_q8_0_blocks_round_as_llama_cpp_does() -> None:
    rows = np.array([[0.0] * 32, [127.0, -63.5, 0.5, *([1.0] * 29)]], dtype=np.float16)
    blocks = np.frombuffer(kv_layout._q8_0(rows), dtype=kv_layout._Q8_BLOCK)
    assert float(blocks["d"][0]) == 0.0 and not blocks["q"][0].any()
    assert float(blocks["d"][1]) == 1.0
    # roundf: halves away from zero (-63.5 -> -64, 0.5 -> 1)
    assert blocks["q"][1][:4].tolist() == [127, -64, 1, 1]


def test_bench_long_context_reports_every_configuration_at_every_depth(tmp_path: Path) -> None:
    out = tmp_path / "long.json"
    r = starling(
        "bench", "--long-context", "tiny", "--depths", "0,300,700", "--json", out, timeout=600
    )
    assert r.returncode == 0, r.stderr
    figures = json.loads(out.read_text())["long_context"]["tiny"]
    assert figures["prompt_evaluated_once_in"] == "fa-f16"
    rows = {(row["flash_attn"], row["kv_type"], row["depth"]): row for row in figures["rows"]}
    assert set(rows) == {
        (fa, kv, depth)
        for fa, kv in [(True, "f16"), (False, "f16"), (True, "q8_0")]
        for depth in (0, 300, 700)
    }
    for (_, _, depth), row in rows.items():
        assert row["decode_tokens_per_s"] > 0
        assert (row["prompt_tokens_per_s"] is None) == (depth == 0)
        if depth == 0:
            assert row["vs_depth_0"] == 1.0
    assert "prompt" in r.stdout and "q8_0" in r.stdout
