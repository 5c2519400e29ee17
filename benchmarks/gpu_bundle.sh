#!/usr/bin/env bash
# Make .gpu/ (git-ignored through .git/info/exclude), what benchmarks/gpu_cuda.sh reads on
# the GPU machine, which has no network:
#   llama-src.tar.xz      llama-cpp-python 0.3.36's llama_cpp/ package and the part of its
#                         vendored llama.cpp one CMake build of libllama + llama-server
#                         needs: ggml (CPU and CUDA backends only), src, include, common,
#                         vendor, tools without the web UI's sources and the tests (~4 MB;
#                         the sdist is 76 MB, over what may travel)
#   whl/                  the wheels the GPU image lacks: falcon, waitress, diskcache, gguf
#   bench-tokenizer.tar.xz  the stdlib BPE of benchmarks.models, so the bench files are
#                         built there with the same tokenizer as here
# Usage, from the repository root: bash benchmarks/gpu_bundle.sh [SDIST_DIR]
# SDIST_DIR holds the unpacked sdist (default: benchmarks.llama_server_build's cache).
set -euo pipefail
REPO=$(pwd)
S=${1:-$HOME/.cache/fastpilot/llama-server/llama_cpp_python-0.3.36}
PY=${PY:-$REPO/.venv/bin/python}
[ -f "$S/vendor/llama.cpp/CMakeLists.txt" ] || { echo "no sdist in $S"; exit 1; }
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" .gpu/whl
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
V=$S/vendor/llama.cpp
D=$tmp/lcp/vendor/llama.cpp
mkdir -p "$D/ggml/src" "$D/scripts"
cp -a "$S/llama_cpp" "$tmp/lcp/"
rm -rf "$tmp/lcp/llama_cpp/lib" "$tmp/lcp/llama_cpp/server"
find "$tmp/lcp" -name __pycache__ -prune -exec rm -rf {} +
for f in CMakeLists.txt LICENSE cmake include src common vendor licenses tools; do
    cp -a "$V/$f" "$D/"
done
cp -a "$V/ggml/CMakeLists.txt" "$V/ggml/cmake" "$V/ggml/include" "$D/ggml/"
find "$V/ggml/src" -maxdepth 1 -type f -exec cp {} "$D/ggml/src/" \;
cp -a "$V/ggml/src/ggml-cpu" "$V/ggml/src/ggml-cuda" "$D/ggml/src/"
cp "$V"/scripts/*.cmake "$D/scripts/"
rm -rf "$D/tools/ui/src" "$D/tools/ui/tests" "$D/tools/ui/static" "$D/tools/ui/package-lock.json" \
    "$D/tools/server/tests" "$D/tools/server/bench" "$D"/tools/server/README*.md "$D/tools/mtmd/tests"
tar -cJf .gpu/llama-src.tar.xz -C "$tmp" lcp

rm -f .gpu/whl/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .gpu/whl \
    falcon==4.4.0 waitress==3.0.2 diskcache==5.6.3 gguf==0.19.0

tok=$HOME/.cache/fastpilot/bench/tokenizer-stdlib-bpe
if [ ! -f "$tok/tokenizer.json" ]; then
    "$PY" -c "from benchmarks.models import CACHE, train_tokenizer; \
train_tokenizer(CACHE / 'tokenizer-stdlib-bpe')"
fi
tar -cJf .gpu/bench-tokenizer.tar.xz -C "$(dirname "$tok")" "$(basename "$tok")"
du -sh .gpu .gpu/*
