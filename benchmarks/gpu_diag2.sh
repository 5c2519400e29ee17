#!/usr/bin/env bash
# Issue 14, third GPU call: which difference makes fastpilot's CUDA model load crash where
# llama_cpp's own load does not (second call: SIGSEGV in llama_model::print_info ->
# std::ostream::_M_insert<long>, resolved inside libggml-cuda.so). Build + deps, tiny models,
# then each variant of benchmarks/gpu_diag.py in its own process (knobs in its main()).
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu-out}
WORK=$REPO/build/fpgpu
mkdir -p "$OUT"
STAGES="build deps" BUDGET_S=250 bash benchmarks/gpu_cuda.sh || exit 1
exec > >(tee -a "$OUT/diag.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$REPO:$WORK/lcp:$WORK/site LLAMA_CPP_LIB_PATH=$WORK/build/bin
timeout 60 python3 -m benchmarks.gpu_cuda tiny-models
TINY=$(ls -d "$HOME"/.cache/fastpilot/test-models/*/gpt2/gguf-q4_k_m | head -1)
run() {
    echo "== $*"
    env "${@:2}" timeout 30 python3 -m benchmarks.gpu_diag "$1" "$TINY" 2>&1 |
        grep -E '^\[diag\]|Fatal' | grep -v mapped | tail -3
}
run ours-load
run ours-load DIAG_QUIET=1
run ours-load DIAG_NGL=99
run ours-load DIAG_STDCXX=1
run raw DIAG_NGL=999
run raw DIAG_NUMPY_FIRST=1
run raw-nolog DIAG_NUMPY_FIRST=1
run ours DIAG_STDCXX=1
nm -DC --defined-only "$WORK/build/bin/libggml-cuda.so" | grep -c 'std::' || true
nm -DC --defined-only "$WORK/build/bin/libggml-cuda.so" | grep -m5 '_M_insert' || true
sleep 1
