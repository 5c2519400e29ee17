#!/usr/bin/env bash
# Issue 14: why fastpilot's CUDA model load crashes. In the first GPU call
# (benchmarks/gpu_cuda.sh) every fastpilot process died with SIGSEGV inside
# llama_model_load_from_file while llama-server from the same build served the same files.
# This builds again (gpu_cuda.sh's build + deps stages), makes the tiny test models and runs
# each probe of benchmarks/gpu_diag.py in its own process ("MODE [VAR=VALUE ...]", the knobs
# in its main()). Two sets:
#   default  the four modes; a native backtrace (cuda-gdb) of the first that dies, then
#            gpu_cuda.sh's tests and bench stages when none died (the second GPU call);
#   KNOBS=1  the candidate fix (load_library loads libstdc++ RTLD_GLOBAL) on and off, each
#            other difference between the crashing and the working probe alone, the
#            libraries' NEEDED lists, the std:: symbols libggml-cuda exports and where the
#            dynamic linker bound libllama's ostream call (LD_DEBUG=bindings); then the
#            tests and bench stages when the fixed backend's probe passed.
# BIND_ONLY=1 (with KNOBS=1): no probes, the linker evidence alone; AFTER_STAGES: the
# gpu_cuda.sh stages run after (default "tests bench").
# Results: $OUT/log.txt, $OUT/diag.txt; one log per probe in $WORK/diag/diag-N.txt.
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu-out}
WORK=$REPO/build/fpgpu
T0=$(date +%s)
BUDGET=${BUDGET_S:-520}
DIAG=$WORK/diag  # per-probe logs (the device tool returns at most 8 files from $OUT)
mkdir -p "$OUT" "$DIAG"
STAGES="build deps" BUDGET_S=330 bash benchmarks/gpu_cuda.sh || exit 1
exec > >(tee -a "$OUT/diag.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$REPO:$WORK/lcp:$WORK/site LLAMA_CPP_LIB_PATH=$WORK/build/bin
command -v cuda-gdb >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
timeout 120 python3 -m benchmarks.gpu_cuda tiny-models
TINY=$(ls -d "$HOME"/.cache/fastpilot/test-models/*/gpt2/gguf-q4_k_m | head -1)
if [ -n "${KNOBS:-}" ]; then
    # load_library now loads libstdc++ RTLD_GLOBAL first (the candidate fix);
    # DIAG_NO_PRELOAD=1 turns it off, so probe 0 should reproduce the crash.
    PROBES=("ours-load DIAG_NO_PRELOAD=1" "ours-load" "ours"
        "ours-load DIAG_NO_PRELOAD=1 DIAG_QUIET=1" "ours-load DIAG_NO_PRELOAD=1 DIAG_NGL=99"
        "raw DIAG_NUMPY_FIRST=1")
    GATE=2  # tests and bench run when this probe (the fixed backend) passed
    [ -n "${BIND_ONLY:-}" ] && PROBES=() && GATE=  # the linker evidence alone
else
    PROBES=("raw-nolog" "raw" "ours-load" "ours")
    GATE=
fi
bad=
for i in "${!PROBES[@]}"; do
    read -r -a p <<<"${PROBES[$i]}"
    env "${p[@]:1}" timeout 60 python3 -X faulthandler -m benchmarks.gpu_diag "${p[0]}" \
        "$TINY" >"$DIAG/diag-$i.txt" 2>&1
    rc=$?
    echo "== ${PROBES[$i]}: rc=$rc after $(($(date +%s) - T0))s"
    grep -E '^\[diag\]|Fatal|Error|error|File "' "$DIAG/diag-$i.txt" | tail -12 | cut -c1-600
    if [ -n "$GATE" ]; then
        [ "$i" = "$GATE" ] && [ $rc != 0 ] && bad=${p[0]}
    else
        [ $rc != 0 ] && [ -z "$bad" ] && bad=${p[0]}
    fi
done
if [ -n "${KNOBS:-}" ]; then
    for i in "${!PROBES[@]}"; do
        echo "== log of probe $i (${PROBES[$i]}), last lines"; tail -5 "$DIAG/diag-$i.txt" | cut -c1-300
    done
    B=$WORK/build/bin
    for f in libllama.so libggml.so libggml-cuda.so; do
        echo "== NEEDED $f: $(readelf -d "$B/$f" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
    done
    echo "== std:: symbols exported by libggml-cuda.so: $(nm -DC --defined-only "$B/libggml-cuda.so" | grep -c 'std::')"
    nm -DC --defined-only "$B/libggml-cuda.so" | grep -m5 -E '_M_insert|locale::id' || true
    for probe in "ours-load DIAG_NO_PRELOAD=1" "ours-load" "raw"; do
        read -r -a p <<<"$probe"
        echo "== LD_DEBUG=bindings, $probe: targets of libllama's std:: bindings, then any into libggml-cuda"
        env "${p[@]:1}" LD_DEBUG=bindings timeout 60 python3 -m benchmarks.gpu_diag "${p[0]}" \
            "$TINY" 2>"$DIAG/bind.txt" >/dev/null
        grep -E 'binding file [^ ]*libllama[^ ]* ' "$DIAG/bind.txt" | grep -F 'symbol `_ZNS' |
            sed 's/^ *[0-9]*:[[:space:]]*//' | awk '{print $6}' | sort | uniq -c
        grep -E 'binding file [^ ]*libllama[^ ]* .* to [^ ]*ggml-cuda' "$DIAG/bind.txt" |
            sed 's/^ *[0-9]*://' | head -5 | cut -c1-300
    done
elif [ -n "$bad" ]; then
    echo "== cuda-gdb backtrace of $bad"
    timeout 120 cuda-gdb -q -batch -ex run -ex bt -ex 'info sharedlibrary' \
        --args python3 -m benchmarks.gpu_diag "$bad" "$TINY" 2>&1 |
        grep -v -E '^\[(New|Thread|Detaching)' | tail -90 | cut -c1-300
fi
LEFT=$((BUDGET - ($(date +%s) - T0) - 10))
echo "== $LEFT s left for tests and bench"
if [ -z "$bad" ] && [ "$LEFT" -gt 60 ]; then
    STAGES=${AFTER_STAGES:-tests bench} BUDGET_S=$LEFT bash benchmarks/gpu_cuda.sh
fi
sleep 1
