"""Does llama.cpp compute a batch's logits as it computes one token's? (speculative exactness)

python scripts/batch_logits.py MODEL.gguf [--k 8] [--prompts 221,241,251,261,471]
                               [--no-flash-attn] [--kv-type f16|q8_0] [--ctx 1024]

After a prompt of each length, the same k tokens are decoded one at a time and then as one batch
(the verification step of speculative decoding); printed per position: the largest difference
between the two logits vectors (0: bit-identical). On a CPU with flash attention and an f16 KV
cache, positions from 256 on differ: llama.cpp then splits a single token's attention across
threads. With a q8_0 KV cache they do not (0 at 221 to 3,000 cached tokens on SmolLM2); the
weights' GEMMs set the batch size up to which rows agree (repacked Q4_K: 3, other K-quants: 7,
Q8_0 and Q4_1: 16 or more, F16: 1), which the engine measures for itself (`batch_cost`).
"""

from __future__ import annotations

import argparse
import ctypes
from pathlib import Path

import llama_cpp

from starling_local.engine import llama_adapter as adapter
from starling_local.engine.runtime import Engine


def logits_at(ctx: object, index: int, n_vocab: int) -> list[float]:
    row = llama_cpp.llama_get_logits_ith(ctx, index)
    return list(ctypes.cast(row, ctypes.POINTER(ctypes.c_float * n_vocab)).contents)


def prefill(llm: object, prompt: list[int]) -> None:
    step = adapter.max_batch(llm)
    for start in range(0, len(prompt), step):
        adapter.decode(llm, prompt[start : start + step], outputs=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--prompts", default="221,241,251,261,471")
    parser.add_argument("--no-flash-attn", action="store_true")
    parser.add_argument("--kv-type", default="f16", help="KV cache type: f16 or q8_0")
    parser.add_argument("--ctx", type=int, default=1024)
    args = parser.parse_args()
    starling = "smol" not in args.model.name.lower()
    engine = Engine(
        args.model,
        n_ctx=args.ctx,
        starling=starling,
        flash_attn=not args.no_flash_attn,
        kv_type=args.kv_type,
    )
    llm = engine._open_llm()
    ctx = adapter.context_pointer(llm)
    vocab = llama_cpp.llama_model_get_vocab(llama_cpp.llama_get_model(ctx))
    n_vocab = llama_cpp.llama_n_vocab(vocab)
    text = " ".join(f"The quick brown fox number {i} jumps over the lazy dog." for i in range(800))
    words = engine.tokenize_text(text)
    tokens = engine.tokenize_text(" It was a sunny day and the children played in the park.")
    tokens = tokens[: args.k]
    attention = "off" if args.no_flash_attn else "on"
    print(f"{args.model.name}, flash attention {attention}, KV {args.kv_type}, k={args.k}")
    for length in (int(n) for n in args.prompts.split(",")):
        prompt = words[:length]
        adapter.clear_cache(llm)
        prefill(llm, prompt)
        single = []
        for token in tokens:
            adapter.decode(llm, [token], outputs=1)
            single.append(logits_at(ctx, 0, n_vocab))
        adapter.clear_cache(llm)
        prefill(llm, prompt)
        adapter.decode(llm, tokens, outputs=len(tokens))
        diffs = [
            max(abs(a - b) for a, b in zip(single[i], logits_at(ctx, i, n_vocab), strict=True))
            for i in range(len(tokens))
        ]
        print(
            f"  prompt {length:>4}, positions {length}-{length + len(tokens) - 1}: max |diff| "
            + " ".join(f"{d:.2g}" for d in diffs)
        )
    engine.close()


if __name__ == "__main__":
    main()
