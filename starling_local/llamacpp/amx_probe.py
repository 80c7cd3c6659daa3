"""The AMX probe: run as a child process (`python -m starling_local.llamacpp.amx_probe`).

It loads a small quantized model (Q4_0 and Q8_0 weights, both AMX types, rows a multiple of
the AMX tile) with every extra CPU buffer type llama.cpp offers, evaluates a 64-token prompt
(large enough for the tile kernels, which small batches skip) and decodes one token. Exit 0:
AMX runs here. A machine that advertises AMX without enabling it kills this process with
SIGILL, and the parent (`cpu_kernels.run_probe`) reads the signal.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HIDDEN = 256
FFN = 512
VOCAB = 96
PROMPT_TOKENS = 64


def write_probe_model(path: Path) -> Path:
    """A one-layer llama-architecture GGUF with random Q8_0 and Q4_0 weights."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("starling-amx-probe")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(HIDDEN // 2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("llama")
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"t{i}".encode() for i in range(VOCAB - 3)]
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def add(name: str, rows: int, cols: int, qtype: gguf.GGMLQuantizationType | None) -> None:
        if rows == 1:
            writer.add_tensor(name, np.ones(cols, dtype=np.float32))
            return
        values = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        if qtype is None:
            writer.add_tensor(name, values)
            return
        data = gguf.quants.quantize(values, qtype)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    q8, q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
    add("token_embd.weight", VOCAB, HIDDEN, q8)
    add("blk.0.attn_norm.weight", 1, HIDDEN, None)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        add(f"blk.0.{name}.weight", HIDDEN, HIDDEN, q8)
    add("blk.0.ffn_norm.weight", 1, HIDDEN, None)
    add("blk.0.ffn_gate.weight", FFN, HIDDEN, q4)
    add("blk.0.ffn_up.weight", FFN, HIDDEN, q4)
    add("blk.0.ffn_down.weight", HIDDEN, FFN, q4)
    add("output_norm.weight", 1, HIDDEN, None)
    add("output.weight", VOCAB, HIDDEN, q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run(path: Path) -> None:
    """Load with every extra buffer type, evaluate a prompt batch, decode a token."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=128,
        n_batch=PROMPT_TOKENS,
        n_ubatch=PROMPT_TOKENS,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
    )
    llm.eval([1] + [3 + i % (VOCAB - 3) for i in range(PROMPT_TOKENS - 1)])
    llm.eval([4])
    llm.close()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="starling-amx-probe-") as tmp:
        path = write_probe_model(Path(tmp) / "probe.gguf")
        run(path)
    sys.stdout.flush()
    # Skip interpreter teardown: llama.cpp's static destructors are not what is being probed.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
