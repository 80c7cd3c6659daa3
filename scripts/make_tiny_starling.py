"""Write a tiny Starling-shaped Hugging Face checkpoint for tests.

    python scripts/make_tiny_starling.py OUTDIR [--shape tiny|0.5b|1b|7b] [--seed N]

The checkpoint has Starling-LM-7B's config (MistralForCausalLM, vocab 32002) at a small size,
random bfloat16 weights, the real Mistral v1 tokenizer.model from the mistral-common wheel and
Starling's added tokens, so token ids are real Starling ids.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from starling_local.acquire.synthetic import SHAPES, make_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument(
        "--eot-logit",
        type=float,
        default=None,
        help="make a model that ends its turns (<|end_of_turn|> logit near this value)",
    )
    args = parser.parse_args()
    make_checkpoint(
        args.outdir,
        SHAPES[args.shape],
        seed=args.seed,
        shards=args.shards,
        eot_logit=args.eot_logit,
    )
    print(args.outdir)


if __name__ == "__main__":
    main()
