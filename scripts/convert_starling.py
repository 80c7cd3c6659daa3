"""Convert Starling checkpoints to GGUF in batch: each source once to F16, then every quant.

    python scripts/convert_starling.py berkeley-nest/Starling-LM-7B-alpha ./local-ckpt \\
        --quant Q4_K_M Q5_K_M Q8_0 --out-dir ./gguf [--keep-f16] [--keep-checkpoint]

A source is a local checkpoint directory or a Hub repo id (only the files conversion needs are
downloaded). Every result is registered in the model library with its provenance. The same
pipeline as `starling convert`; this form does several quantizations from one conversion.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from starling_local.acquire.pipeline import batch_convert
from starling_local.errors import StarlingError
from starling_local.progress import ProgressLine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+")
    parser.add_argument("--quant", nargs="+", default=["Q4_K_M"])
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--outtype", choices=["f32", "f16", "bf16"], default="f16")
    parser.add_argument("--keep-f16", action="store_true")
    parser.add_argument("--keep-checkpoint", action="store_true")
    args = parser.parse_args()
    try:
        for source in args.sources:
            for entry in batch_convert(
                source,
                quants=args.quant,
                out_dir=args.out_dir,
                outtype=args.outtype,
                keep_intermediate=args.keep_f16,
                keep_checkpoint=args.keep_checkpoint,
                progress_factory=ProgressLine,
            ):
                print(f"{entry.name}\t{entry.path}")
    except StarlingError as exc:
        print(f"convert_starling: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
