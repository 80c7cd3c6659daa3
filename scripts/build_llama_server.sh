#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench from the sources that the installed
# llama-cpp-python vendors (so all run the same llama.cpp), cached under ~/.cache keyed by that
# version. Prints llama-server's path (llama-bench lies beside it). Exit 3: the build tools are
# missing.
#
#   bash scripts/build_llama_server.sh            # uses the active Python's llama-cpp-python
#   LLAMA_CPP_SDIST=path/to/llama_cpp_python-X.tar.gz bash scripts/build_llama_server.sh
set -euo pipefail

version=$(python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
dest="${XDG_CACHE_HOME:-$HOME/.cache}/starling-local/llama-server/$version"
if [ -x "$dest/llama-server" ] && [ -x "$dest/llama-bench" ]; then
    echo "$dest/llama-server"
    exit 0
fi
for tool in cmake make cc c++ tar; do
    command -v "$tool" >/dev/null || { echo "build_llama_server: $tool is missing" >&2; exit 3; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sdist="${LLAMA_CPP_SDIST:-}"
if [ -z "$sdist" ]; then
    python -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$version" -d "$work" >&2
    sdist=$(echo "$work"/llama_cpp_python-*.tar.gz)
fi
tar xzf "$sdist" -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$work/build" --target llama-server llama-bench -j "$(nproc)" >&2
mkdir -p "$dest"
for bin in llama-bench llama-server; do
    cp "$work/build/bin/$bin" "$dest/$bin.tmp"
    mv "$dest/$bin.tmp" "$dest/$bin"
done
echo "$dest/llama-server"
