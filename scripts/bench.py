"""Benchmark starling-local against raw llama.cpp (the same as `starling bench`).

python scripts/bench.py [--model M.gguf] [--shape tiny|0.5b|1b|7b] [--json out.json]
"""

from __future__ import annotations

from starling_local.cli import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(["bench", *sys.argv[1:]]))
