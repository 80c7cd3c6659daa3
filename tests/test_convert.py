"""The converter and quantizer, proven against an independent reference forward pass."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from starling_local import files
from starling_local.acquire import convert as convert_module
from starling_local.acquire.convert import ConvertError, OutType, convert_checkpoint
from starling_local.acquire.quantize import quantize
from starling_local.errors import StarlingError, UsageError
from starling_local.gguf.header import read_header
from starling_local.gguf.info import OPENCHAT_TEMPLATE, read_gguf
from tests.cards import CARD_MULTI
from tests.reference_mistral import forward

# A multi-turn prompt plus a code-mode prefix: every kind of token the template produces.
PROMPT = [*CARD_MULTI[:19], 7596, 1247]


def llama_logits(gguf: Path, tokens: list[int]) -> np.ndarray:
    """All-position logits from llama.cpp, KV cache in F32 so nothing is rounded to F16."""
    llm = llama_cpp.Llama(
        str(gguf), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=2
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def test_converted_f32_logits_match_reference(tiny_checkpoint: Path, tiny_f32: Path) -> None:
    expected = forward(tiny_checkpoint, PROMPT)
    got = llama_logits(tiny_f32, PROMPT)
    assert np.abs(expected).max() > 1.0  # logits of a meaningful size, not all near zero
    assert np.abs(got - expected).max() < 1e-3


def test_wrong_qk_permutation_fails_the_reference_check(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(convert_module, "permute_qk", lambda w, n: w)
    broken = convert_checkpoint(tiny_checkpoint, tmp_path / "broken.gguf", OutType.F32)
    diff = np.abs(llama_logits(broken, PROMPT) - forward(tiny_checkpoint, PROMPT)).max()
    assert diff > 1e-2


def test_metadata_and_vocabulary(tiny_f16: Path) -> None:
    info = read_gguf(tiny_f16)
    assert info.architecture == "llama"
    assert info.vocab_size == 32002
    assert info.bos_id == 1 and info.eos_id == 32000
    assert info.special_tokens[32000] == ("<|end_of_turn|>", "CONTROL")
    assert info.special_tokens[32001] == ("<|pad_0|>", "CONTROL")
    assert info.chat_template == OPENCHAT_TEMPLATE
    assert info.problems() == []
    header = read_header(tiny_f16)
    f = header.fields
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.add_eos_token"] is False
    assert f["llama.rope.dimension_count"] == 128
    assert f["llama.context_length"] == 8192
    types = {t.name: t.ggml_type for t in header.tensors}
    assert types["blk.0.attn_norm.weight"] == 0  # norms stay F32
    assert types["blk.0.attn_q.weight"] == 1  # F16
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= set(types)
    assert len(types) == 2 + 1 + 2 * 9


def test_quantized_file_has_k_quants(tiny_q4: Path) -> None:
    info = read_gguf(tiny_q4)
    assert info.quant == "Q4_K_M"
    assert "Q4_K" in info.tensor_types and "Q6_K" in info.tensor_types
    assert info.size < read_gguf(tiny_q4.with_name("tiny-f16.gguf")).size / 2


def test_bf16_outtype(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = convert_checkpoint(tiny_checkpoint, tmp_path / "t.gguf", OutType.BF16)
    assert read_gguf(out).quant == "BF16"
    got = llama_logits(out, PROMPT[:5])
    assert np.abs(got - forward(tiny_checkpoint, PROMPT[:5])).max() < 0.5


def test_interrupted_conversion_leaves_no_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"

    def interrupt(done: int, total: int, name: str) -> None:
        if done > total // 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tiny_checkpoint, out, OutType.F16, progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_is_refused_up_front(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk cannot be made here cheaply; the free-space probe reports 10 MiB instead.
    monkeypatch.setattr(files, "free_bytes", lambda directory: 10 << 20)
    with pytest.raises(files.DiskSpaceError, match="not enough disk space"):
        convert_checkpoint(tiny_checkpoint, tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    src = tmp_path / "gemma"
    src.mkdir()
    (src / "config.json").write_text('{"architectures": ["GemmaForCausalLM"]}')
    with pytest.raises(UsageError, match="unsupported architecture 'GemmaForCausalLM'"):
        convert_checkpoint(src, tmp_path / "x.gguf")


def test_unreadable_checkpoint_is_a_clear_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    src = tmp_path / "broken"
    src.mkdir()
    for name in ("config.json", "tokenizer.model", "added_tokens.json", "tokenizer_config.json"):
        (src / name).write_bytes((tiny_checkpoint / name).read_bytes())
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConvertError, match="not a safetensors file"):
        convert_checkpoint(src, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_quantize_refuses_non_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(StarlingError, match="not a GGUF file"):
        quantize(bogus, tmp_path / "out.gguf", "Q4_K_M")
    with pytest.raises(UsageError, match="unknown quantization"):
        quantize(bogus, tmp_path / "out.gguf", "Q9_Z")
