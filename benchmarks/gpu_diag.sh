#!/usr/bin/env bash
# Issue 14, second GPU call: why fastpilot's CUDA model load crashed. In the first call
# (benchmarks/gpu_cuda.sh) every fastpilot process died with SIGSEGV inside
# llama_model_load_from_file while llama-server from the same build served the same files.
# This builds again (gpu_cuda.sh's build + deps stages), makes the tiny test models, runs
# each probe of benchmarks/gpu_diag.py in its own process, takes a native backtrace
# (cuda-gdb) of the first probe that dies, and runs gpu_cuda.sh's tests and bench stages
# with what is left of the budget. Results: $OUT/log.txt, $OUT/diag.txt, $OUT/diag-MODE.txt.
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu-out}
WORK=$REPO/build/fpgpu
T0=$(date +%s)
BUDGET=${BUDGET_S:-520}
mkdir -p "$OUT"
STAGES="build deps" BUDGET_S=330 bash benchmarks/gpu_cuda.sh || exit 1
exec > >(tee -a "$OUT/diag.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$REPO:$WORK/lcp:$WORK/site LLAMA_CPP_LIB_PATH=$WORK/build/bin
command -v cuda-gdb >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
timeout 120 python3 -m benchmarks.gpu_cuda tiny-models
TINY=$(ls -d "$HOME"/.cache/fastpilot/test-models/*/gpt2/gguf-q4_k_m | head -1)
bad=
for m in raw-nolog raw ours-load ours; do
    timeout 60 python3 -X faulthandler -m benchmarks.gpu_diag "$m" "$TINY" >"$OUT/diag-$m.txt" 2>&1
    rc=$?
    echo "== $m rc=$rc after $(($(date +%s) - T0))s"
    grep -E '^\[diag\]|Fatal|Error|error|File "' "$OUT/diag-$m.txt" | tail -12 | cut -c1-600
    [ $rc != 0 ] && [ -z "$bad" ] && bad=$m
done
if [ -n "$bad" ]; then
    echo "== cuda-gdb backtrace of $bad"
    timeout 120 cuda-gdb -q -batch -ex run -ex bt -ex 'info sharedlibrary' \
        --args python3 -m benchmarks.gpu_diag "$bad" "$TINY" 2>&1 |
        grep -v -E '^\[(New|Thread|Detaching)' | tail -90 | cut -c1-300
fi
LEFT=$((BUDGET - ($(date +%s) - T0) - 10))
echo "== $LEFT s left for tests and bench"
if [ -z "$bad" ] && [ "$LEFT" -gt 60 ]; then
    STAGES="tests bench" BUDGET_S=$LEFT bash benchmarks/gpu_cuda.sh
fi
sleep 1
