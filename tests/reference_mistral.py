"""An independent numpy forward pass of a Hugging Face Mistral checkpoint.

Written from the Hugging Face semantics (transformers' MistralForCausalLM), sharing no code
with the converter: its own safetensors reading, rotate-half RoPE, grouped-query attention,
RMSNorm and the SiLU-gated MLP, in float64.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

Array = Any


def load_checkpoint(directory: Path) -> dict[str, Array]:
    tensors: dict[str, Array] = {}
    for path in sorted(directory.glob("*.safetensors")):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            start, end = spec["data_offsets"]
            chunk = raw[8 + n + start : 8 + n + end]
            assert spec["dtype"] == "BF16"
            bits = np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16
            tensors[name] = bits.view(np.float32).astype(np.float64).reshape(spec["shape"])
    return tensors


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def forward(directory: Path, tokens: list[int]) -> Array:
    """Logits [len(tokens), vocab] of the checkpoint in `directory`."""
    cfg = json.loads((directory / "config.json").read_text())
    w = load_checkpoint(directory)
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hidden = cfg["hidden_size"]
    hd = hidden // n_heads
    eps = cfg["rms_norm_eps"]
    t = len(tokens)
    inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd))
    angles = np.outer(np.arange(t), inv_freq)
    emb = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    mask = np.triu(np.full((t, t), -np.inf), k=1)

    x = w["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, n_heads, hd)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, n_kv, hd)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, n_kv, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = n_heads // n_kv
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(t, n_heads * hd)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T
