#!/usr/bin/env bash
# The CUDA proof run (figures in the README): on a machine with an NVIDIA GPU and no network,
# build llama-cpp-python with CUDA for sm_90 from a trimmed copy of its sdist, write a 7B-shaped
# synthetic model while the compiler runs, then run `starling bench` with every layer offloaded.
#
# Prepare (on a machine with network), in the repository root:
#   .devsrc/llama-cpp-python   the llama-cpp-python 0.3.36 sdist, unpacked, without
#                              vendor/llama.cpp/{models/*,docs,media,benches} (fits 64 MiB)
#   .devsrc/tokenizer.model.v1 mistral_common/data/tokenizer.model.v1 from the mistral-common wheel
#   .whl/                      wheels of gguf, diskcache, platformdirs for the GPU machine's Python
# Results go to $OUT (defaults to ./cuda-bench-out).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/cuda-bench-out}
mkdir -p "$OUT"
ROOT=$PWD
LOG=$OUT/device.log
exec > >(tee -a "$LOG") 2>&1
date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; python3 --version
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$ROOT
export STARLING_HOME=/tmp/sh STARLING_MISTRAL_TOKENIZER=$ROOT/.devsrc/tokenizer.model.v1
mkdir -p /tmp/sh/cache/bench
if [ ! -f /tmp/wheels/done ]; then
  ( cd .devsrc/llama-cpp-python && \
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=off -DGGML_CUDA_NCCL=off" \
    CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip wheel --no-build-isolation --no-deps -w /tmp/wheels . \
      > /tmp/build.log 2>&1 && touch /tmp/wheels/done ) &
  BUILD=$!
fi
# The model needs only numpy/gguf/sentencepiece: write its F16 while the compiler runs.
[ -f /tmp/sh/cache/bench/synthetic-7b-f16.gguf ] || ( time python3 -c "
from pathlib import Path
from starling_local.acquire.synthetic import SHAPES, make_gguf
make_gguf(Path('/tmp/sh/cache/bench/synthetic-7b-f16.gguf'), SHAPES['7b'])
print('f16 written')" ) 2>&1
if [ -n "${BUILD:-}" ]; then time wait $BUILD; fi
tail -3 /tmp/build.log
[ -f /tmp/wheels/done ] || { echo BUILD FAILED; grep -n -i "error" /tmp/build.log | head -20; exit 1; }
python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/wheels/llama_cpp_python*.whl
python3 -m starling_local doctor
date
python3 -m starling_local bench --shape 7b --tokens 256 --json $OUT/bench-7b-cuda.json
date
python3 -m starling_local bench --shape 0.5b --tokens 256 --json $OUT/bench-0.5b-cuda.json
date
