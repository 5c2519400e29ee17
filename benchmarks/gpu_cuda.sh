#!/usr/bin/env bash
# llama.cpp on CUDA (issue 14 part 2), in one command on the GPU machine:
#   bash benchmarks/gpu_cuda.sh
# run from the repository root with .gpu/ beside it (made by benchmarks/gpu_bundle.sh:
# the trimmed llama-cpp-python 0.3.36 sources, the wheels the image lacks, the bench
# tokenizer). Stages, each timed and skippable:
#   build   CMake + ninja: libllama/libggml* (what llama_cpp loads) and llama-server, CUDA
#   deps    falcon, waitress, diskcache, gguf into $WORK/site; import check of the binding
#   tests   the llama.cpp backend tests with `pytest --device cuda` (full offload)
#   bench   fastpilot --device cuda vs llama-server -ngl 99, 1 and 8 clients
#   overhead  per-token µs of each fastpilot layer over llama_decode (not in the default)
# Environment: OUT (results; default /tmp/gpu-out), STAGES ("build deps tests bench"),
# BUDGET_S (wall seconds for the whole script, 520), WORK (build/fpgpu, git-ignored: the
# device tool keeps ignored outputs between calls on a warm machine, so a second call
# skips the build), JOBS (nproc),
# FA=1 (compile the CUDA flash-attention kernels: about 60% more nvcc time),
# DEVICE=cpu (a dry run on a CPU build: no offload asked anywhere), REBUILD=1,
# TESTS (pytest targets), BENCH_MODELS (gpt2-117m,codegen-350m),
# BENCH_ARGS (extra args of benchmarks.gpu_cuda bench),
# GPU_DIR (.gpu), PY (python3); for a dry run of the build stage: CUDA=OFF, TARGETS.
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu-out}
WORK=${WORK:-$REPO/build/fpgpu}
GPU_DIR=${GPU_DIR:-$REPO/.gpu}
STAGES=${STAGES:-build deps tests bench}
JOBS=${JOBS:-$(nproc)}
T_START=$(date +%s)
DEADLINE=$((T_START + ${BUDGET_S:-520}))
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1

say() { echo "[gpu $(($(date +%s) - T_START))s] $*"; }
left() { echo $((DEADLINE - $(date +%s))); }
# cap SECONDS: the smaller of SECONDS and what the budget leaves (minus a margin)
cap() { local l; l=$(($(left) - 5)); [ "$1" -lt "$l" ] && echo "$1" || echo "$((l > 1 ? l : 1))"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
NGL=99
CHECK_ARGS=
[ "$DEVICE" = cpu ] && NGL=-1 && CHECK_ARGS=--cpu

command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
GEN=Ninja
command -v ninja >/dev/null || GEN="Unix Makefiles"
say "start: stages '$STAGES', budget ${BUDGET_S:-520}s, $JOBS jobs, $GEN, work $WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
nvcc --version | tail -2 || true
$PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)'
lscpu | grep -E '^Model name|^CPU\(s\)' || true

CUDA_HOME=${CUDA_HOME:-${CUDA_PATH:-}}
if [ -z "$CUDA_HOME" ]; then
    CUDA_HOME=/usr/local/cuda
    [ -d "$CUDA_HOME" ] || CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
BUILD=$WORK/build
SRC=$WORK/lcp
CUBLAS_ARGS=()
# cuBLAS: the toolkit's, else the pip wheel torch brings (nvidia-cublas), found by file.
if ! ls "$CUDA_HOME"/include/cublas_v2.h "$CUDA_HOME"/targets/*/include/cublas_v2.h >/dev/null 2>&1
then
    NV=$($PY -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null)
    HDR=$(find "$NV/nvidia" -name cublas_v2.h 2>/dev/null | head -1)
    LIB=$(find "$NV/nvidia" -name 'libcublas.so*' 2>/dev/null | head -1)
    LIBLT=$(find "$NV/nvidia" -name 'libcublasLt.so*' 2>/dev/null | head -1)
    say "no cublas_v2.h in $CUDA_HOME; pip's: ${HDR:-none} ${LIB:-none} ${LIBLT:-none}"
    if [ -n "$HDR" ] && [ -n "$LIB" ]; then
        CUBLAS_ARGS=("-DCUDA_cublas_LIBRARY=$LIB" "-DCUDA_cublasLt_LIBRARY=$LIBLT"
            "-DCMAKE_CUDA_FLAGS=-I$(dirname "$HDR")")
        export LD_LIBRARY_PATH=$(dirname "$LIB"):${LD_LIBRARY_PATH:-}
    fi
fi

export PYTHONPATH=$REPO:$SRC:$WORK/site${PYTHONPATH:+:$PYTHONPATH}
BENCH_CACHE=${FASTPILOT_BENCH_CACHE:-$HOME/.cache/fastpilot/bench}
BENCH_MODELS=${BENCH_MODELS:-gpt2-117m,codegen-350m}
if want bench; then
    # The random bench checkpoints need torch only: written while nvcc runs (the quantized
    # files need the built llama.cpp, so their conversion waits for the bench stage).
    mkdir -p "$BENCH_CACHE"
    tar -xJf "$GPU_DIR/bench-tokenizer.tar.xz" -C "$BENCH_CACHE" || exit 1
    (
        for m in ${BENCH_MODELS//,/ }; do
            [ -f "$BENCH_CACHE/hf/$m/config.json" ] && continue
            t=$(date +%s)
            OMP_NUM_THREADS=4 nice -n 10 $PY -m benchmarks.models build "$m" "$BENCH_CACHE/hf/$m" &&
                say "prebuilt random $m checkpoint in $(($(date +%s) - t))s"
        done
    ) >"$WORK/prebuild.log" 2>&1 &
    PREBUILD=$!
fi

if want build; then
    if [ -f "$BUILD/bin/libllama.so" ] && [ -x "$BUILD/bin/llama-server" ] && [ -z "${REBUILD:-}" ]; then
        say "build: reusing $BUILD"
    else
        t0=$(date +%s)
        rm -rf "$SRC" "$BUILD"
        tar -xJf "$GPU_DIR/llama-src.tar.xz" -C "$WORK" || exit 1
        say "build: unpacked sources in $(($(date +%s) - t0))s"
        NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # the Makefile's reason
        FA_ARG=-DGGML_CUDA_FA=OFF
        [ "${FA:-0}" = 1 ] && FA_ARG=-DGGML_CUDA_FA=ON
        t1=$(date +%s)
        CFLAGS=$NO_AMX CXXFLAGS=$NO_AMX cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -G "$GEN" \
            -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
            -DGGML_CUDA="${CUDA:-ON}" -DCMAKE_CUDA_ARCHITECTURES=90 "$FA_ARG" -DGGML_BLAS=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
            -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
            -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_CCACHE=OFF \
            "${CUBLAS_ARGS[@]}" >"$WORK/configure.log" 2>&1
        rc=$?
        grep -E 'CUDA|cuBLAS|cublas|Error' "$WORK/configure.log" | head -20
        say "build: configure rc=$rc in $(($(date +%s) - t1))s ($FA_ARG)"
        [ $rc = 0 ] || { tail -40 "$WORK/configure.log"; exit 1; }
        t2=$(date +%s)
        # Every 25th step and every error to the log, with seconds since the build began.
        timeout "$(cap 420)" cmake --build "$BUILD" -j "$JOBS" --target ${TARGETS:-llama llama-server} 2>&1 |
            tee "$WORK/build.log" |
            while IFS= read -r line; do
                case $line in
                *error*|*FAILED*) echo "$line" ;;
                \[*) n=${line%%/*}; n=${n#[}
                    [[ $n =~ ^[0-9]+$ ]] && [ $((n % 25)) = 0 ] &&
                        echo "[+$(($(date +%s) - t2))s] ${line:0:110}" ;;
                esac
                :
            done
        rc=$?
        say "build: $GEN rc=$rc in $(($(date +%s) - t2))s, total $(($(date +%s) - t0))s"
        [ $rc = 0 ] || { grep -B2 -A20 -m3 -E 'FAILED|Error' "$WORK/build.log" | head -80; exit 1; }
    fi
fi

# The Python package's own sources (PYTHONPATH above), the CUDA libraries, the wheels.
export LLAMA_CPP_LIB_PATH=$BUILD/bin

if want deps; then
    t0=$(date +%s)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$GPU_DIR"/whl/*.whl || exit 1
    $PY -m benchmarks.gpu_cuda check $CHECK_ARGS || exit 1
    say "deps: ready in $(($(date +%s) - t0))s"
fi

if want tests; then
    t0=$(date +%s)
    timeout "$(cap 150)" $PY -m benchmarks.gpu_cuda tiny-models
    say "tests: tiny models rc=$? in $(($(date +%s) - t0))s"
    t1=$(date +%s)
    # The llama.cpp subjects of the contract suite, the backend's own tests, speculation
    # and KV reuse; -k drops the CTranslate2 and fake subjects (no ctranslate2 there).
    timeout "$(cap 200)" $PY -m pytest -q -p no:cacheprovider -o addopts= -m 'not slow' \
        --device "$DEVICE" --timeout 120 --tb=short -rfE ${TESTS:-tests/test_backend_llamacpp.py tests/test_backend_contract.py \
        tests/test_speculative_llamacpp.py tests/test_kv_reuse_llamacpp.py} \
        -k 'not ct2 and not fake' --junitxml="$OUT/junit.xml" 2>&1
    say "tests: pytest rc=$? in $(($(date +%s) - t1))s"
fi

if want bench; then
    t0=$(date +%s)
    if [ -n "${PREBUILD:-}" ]; then
        wait "$PREBUILD"
        cat "$WORK/prebuild.log"
    fi
    touch "$WORK/bench-start"
    # shellcheck disable=SC2086
    timeout "$(cap 400)" $PY -m benchmarks.gpu_cuda bench --out "$OUT" --llama-build "$BUILD" \
        --models "$BENCH_MODELS" --device "$DEVICE" --ngl "$NGL" \
        --title "CUDA: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" \
        ${BENCH_ARGS:-}
    say "bench: rc=$? in $(($(date +%s) - t0))s"
    # This run's server logs: what llama-server offloaded, and fastpilot's load line.
    find /tmp -maxdepth 1 -name 'speculative-*.log' -newer "$WORK/bench-start" | sort |
        while read -r f; do
            echo "== $f"
            grep -m5 -E 'offloaded|CUDA0|ggml_cuda_init|^loaded |Error|error:' "$f" | cut -c1-200
            :
        done
fi
if want overhead; then
    # Per-token cost of each fastpilot layer over the in-process llama_decode loop, on the
    # device (benchmarks/overhead.py); the bench stage converted the models.
    t0=$(date +%s)
    OV=()
    for m in ${BENCH_MODELS//,/ }; do
        d=$BENCH_CACHE/models/$m-gguf-q4_k_m
        [ -f "$d/model.gguf" ] && OV+=(--model "$m=$d")
    done
    [ ${#OV[@]} -gt 0 ] && timeout "$(cap 150)" $PY -m benchmarks.overhead "${OV[@]}" \
        --device "$DEVICE" --threads 4 --repeats 3 --json "$OUT/overhead.json"
    say "overhead: rc=$? in $(($(date +%s) - t0))s"
fi
say "done in $(($(date +%s) - T_START))s"
sleep 1  # let tee write the last lines into $OUT/log.txt before the command returns
