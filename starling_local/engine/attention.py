"""Flash attention and the KV cache type: the defaults per backend, chosen from
`starling bench --long-context` (the README's Speed section has the figures)."""

from __future__ import annotations

from dataclasses import dataclass

#: KV cache element types offered (llama.cpp's ggml type ids); q8_0 halves the cache and the
#: KV state files, and needs flash attention.
KV_TYPES = {"f16": 1, "q8_0": 8}


@dataclass(frozen=True)
class AttentionChoice:
    flash_attn: bool
    kv_type: str


def default_attention(backend_name: str, speculate: bool) -> AttentionChoice:
    """Flash attention and KV cache type, chosen from `starling bench --long-context`.

    CPU: flash attention off, for long conversations: decode at depth 2,048 / 4,096 / 7,936
    ran 1.34x / 1.55x / 1.81x faster without it (0.5B shape, 2 cores; the 7B shape at 2,048:
    5.44 vs 3.92 tok/s), for 10% at depth 0. The KV cache stays f16: q8_0 decoded no faster
    and evaluated prompts 5x slower on the CPU at depth 7,936 (9.9 vs 48.8 tok/s).
    GPUs: on (CUDA, 7B: 253 vs 220 tok/s at depth 0, 184 vs 154 at 7,936).

    Speculative decoding needs a verified batch's logits to be bit for bit a single token's.
    On the CPU that takes flash attention with a q8_0 KV cache: without flash attention the
    attention products of a batch go through another GEMM than one token's (0.3-0.8 apart),
    and with an f16 cache llama.cpp splits one token's attention across threads once the
    cache passes 256 tokens (0.5-1.0 apart). With q8_0 both take the same kernel at any depth
    (`scripts/batch_logits.py`: 0 difference at 221 to 3,000 cached tokens)."""
    if backend_name == "CPU":
        return AttentionChoice(flash_attn=speculate, kv_type="q8_0" if speculate else "f16")
    return AttentionChoice(flash_attn=True, kv_type="f16")
