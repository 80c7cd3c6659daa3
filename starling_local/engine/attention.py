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
    """Flash attention and KV cache type, chosen from `starling bench --long-context` (the
    README's Speed section has the figures).

    CPU: flash attention off, for long conversations: without it decode gets faster the
    deeper the conversation, for a small cost at depth 0. The KV cache stays f16: q8_0
    decoded no faster and evaluated long prompts several times slower. GPUs: on, faster at
    every depth measured.

    Speculative decoding needs a verified batch's logits to be bit for bit a single token's.
    On the CPU that takes flash attention with a q8_0 KV cache: without flash attention the
    attention products of a batch go through another GEMM than one token's, and with an f16
    cache llama.cpp splits one token's attention across threads once the cache grows. With
    q8_0 both take the same kernel at any depth (`scripts/batch_logits.py` checks it)."""
    if backend_name == "CPU":
        return AttentionChoice(flash_attn=speculate, kv_type="q8_0" if speculate else "f16")
    return AttentionChoice(flash_attn=True, kv_type="f16")
