#!/usr/bin/env bash
# Issue 14: why fastpilot's CUDA model load crashes. In the first GPU call
# (benchmarks/gpu_cuda.sh) every fastpilot process died with SIGSEGV inside
# llama_model_load_from_file while llama-server from the same build served the same files.
# This builds again (gpu_cuda.sh's build + deps stages), makes the tiny test models and runs
# each probe of benchmarks/gpu_diag.py in its own process ("MODE [VAR=VALUE ...]", the knobs
# in its main()). Two sets:
#   default  the four modes; a native backtrace (cuda-gdb) of the first that dies, then
#            gpu_cuda.sh's tests and bench stages when none died (the second GPU call);
#   KNOBS=1  each difference between the crashing and the working probe alone, and the
#            std:: symbols libggml-cuda exports (the next call: which one binds libllama's
#            ostream calls to the CUDA library's copy of libstdc++ code).
# Results: $OUT/log.txt, $OUT/diag.txt, $OUT/diag-N.txt (one per probe).
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
if [ -n "${KNOBS:-}" ]; then
    PROBES=("ours-load" "ours-load DIAG_QUIET=1" "ours-load DIAG_NGL=99"
        "ours-load DIAG_STDCXX=1" "raw DIAG_NGL=999" "raw DIAG_NUMPY_FIRST=1"
        "raw-nolog DIAG_NUMPY_FIRST=1" "ours DIAG_STDCXX=1")
else
    PROBES=("raw-nolog" "raw" "ours-load" "ours")
fi
bad=
for i in "${!PROBES[@]}"; do
    read -r -a p <<<"${PROBES[$i]}"
    env "${p[@]:1}" timeout 60 python3 -X faulthandler -m benchmarks.gpu_diag "${p[0]}" \
        "$TINY" >"$OUT/diag-$i.txt" 2>&1
    rc=$?
    echo "== ${PROBES[$i]}: rc=$rc after $(($(date +%s) - T0))s"
    grep -E '^\[diag\]|Fatal|Error|error|File "' "$OUT/diag-$i.txt" | tail -12 | cut -c1-600
    [ $rc != 0 ] && [ -z "$bad" ] && bad=${p[0]}
done
if [ -n "${KNOBS:-}" ]; then
    nm -DC --defined-only "$WORK/build/bin/libggml-cuda.so" | grep -c 'std::' || true
    nm -DC --defined-only "$WORK/build/bin/libggml-cuda.so" | grep -m5 '_M_insert' || true
elif [ -n "$bad" ]; then
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
