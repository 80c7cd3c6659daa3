#!/usr/bin/env bash
# The remote path against a real vLLM (needs an NVIDIA GPU): installs vLLM into a venv, serves a
# Starling-shaped checkpoint (the tests' tiny model, as a Hugging Face checkpoint with the real
# Mistral v1 tokenizer and Starling's added tokens), and runs the remote tests against it.
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
python scripts/make_tiny_starling.py "$work/tiny-eager" --eot-logit 5 --seed 7
vllm serve "$work/tiny-eager" --port "$port" --host 127.0.0.1 --dtype float16 \
    --max-model-len 2048 --served-model-name starling-tiny --gpu-memory-utilization 0.3 \
    > "$work/vllm.log" 2>&1 &
server=$!
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 1
done
curl -sf "http://127.0.0.1:$port/v1/models"
echo
STARLING_VLLM_URL="http://127.0.0.1:$port" python -m pytest -q tests/test_remote.py -k vllm -rs
STARLING_HOME="$work/home" starling ask "Hello" --remote "http://127.0.0.1:$port" --json \
    --temperature 0 --max-tokens 64
