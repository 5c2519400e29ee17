"""Where does a CUDA model load crash? One probe per process (``python -m benchmarks.gpu_diag
MODE GGUF_DIR``), each printing its stages as it passes them, so the last line printed before
a crash names the step. Modes:

* ``raw-nolog``: llama_cpp's ctypes API alone, native logging back to llama.cpp's own stderr
  printer (no Python log callback), ``n_gpu_layers`` 99, a context, one decode.
* ``raw``: the same with llama_cpp's import-time Python log callback left in place.
* ``ours-load``: fastpilot's :func:`load_library` (its log callback) and model parameters,
  the model load only.
* ``ours``: a one-slot :class:`LlamaCppBackend` on ``device='cuda'`` generating 4 tokens,
  native logs at DEBUG on stderr.

Run by ``benchmarks/gpu_diag.sh`` on the GPU machine (issue 14); prints, never asserts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path


def say(msg: str) -> None:
    print(f"[diag] {msg}", flush=True)


def libs() -> None:
    """The native libraries mapped now: two copies of a ggml library would show here."""
    seen = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if path.endswith(".so") or ".so." in path:
            name = Path(path).name
            if any(k in name for k in ("ggml", "llama", "cublas", "cudart", "cuda", "gomp")):
                if path not in seen:
                    seen.append(path)
    say("mapped: " + " ".join(seen))


def raw(gguf: Path, keep_callback: bool) -> None:
    import llama_cpp as L

    say("imported llama_cpp")
    if not keep_callback:
        L.llama_log_set(L.llama_log_callback(0), ctypes.c_void_p(0))
        say("log callback reset to llama.cpp's own printer")
    L.llama_backend_init()
    say(f"backend init; gpu offload {bool(L.llama_supports_gpu_offload())}")
    libs()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = int(os.environ.get("DIAG_NGL", "99"))
    model = L.llama_model_load_from_file(str(gguf).encode(), mp)
    say(f"model loaded: {bool(model)}")
    cp = L.llama_context_default_params()
    cp.n_ctx = 256
    ctx = L.llama_init_from_model(model, cp)
    say(f"context: {bool(ctx)}")
    batch = L.llama_batch_get_one((L.llama_token * 2)(1, 2), 2)
    say(f"decode rc {L.llama_decode(ctx, batch)}")
    L.llama_free(ctx)
    L.llama_model_free(model)
    say("freed")


def ours_load(gguf: Path) -> None:
    from fastpilot.backends.llamacpp_native import load_library, offload_layers

    lib = load_library()
    say("load_library done")
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = int(os.environ.get("DIAG_NGL", "0")) or offload_layers(lib, "cuda")
    say(f"n_gpu_layers {mp.n_gpu_layers}")
    libs()
    model = lib.llama_model_load_from_file(str(gguf).encode(), mp)
    say(f"model loaded: {bool(model)}")
    lib.llama_model_free(model)
    say("freed")


def ours(directory: Path) -> None:
    from fastpilot.backends.base import GenerationRequest
    from fastpilot.backends.llamacpp import LlamaCppBackend
    from fastpilot.backends.sampling import SamplingParams

    backend = LlamaCppBackend(directory, slots=1, speculative="off", device="cuda")
    say(f"backend up: {backend.info.device} {backend.kernels.summary()}")
    stream = backend.submit(
        GenerationRequest(backend.tokenize("def f(x):"), SamplingParams(max_tokens=4))
    )
    say(f"generated {[s.token_id for s in stream]}")
    backend.close()
    say("closed")


def main() -> None:
    mode, directory = sys.argv[1], Path(sys.argv[2])
    # Knobs for telling causes apart: DIAG_STDCXX=1 loads libstdc++ RTLD_GLOBAL first,
    # DIAG_NUMPY_FIRST=1 imports numpy before llama_cpp, DIAG_QUIET=1 leaves Python logging
    # off (the log callback then returns at once), DIAG_NGL=N sets n_gpu_layers,
    # DIAG_NO_PRELOAD=1 turns off load_library's RTLD_GLOBAL libstdc++ (the fix under test).
    if os.environ.get("DIAG_NO_PRELOAD"):
        # fastpilot's fix switched off: libstdc++ not loaded RTLD_GLOBAL by load_library.
        import fastpilot.backends.llamacpp_native as native

        native.cxx_runtime_global = lambda: None
        say("load_library's libstdc++ preload off")
    if os.environ.get("DIAG_STDCXX"):
        ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
        say("libstdc++ loaded RTLD_GLOBAL")
    if os.environ.get("DIAG_NUMPY_FIRST"):
        import numpy  # noqa: F401
    if not os.environ.get("DIAG_QUIET"):
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    gguf = next(directory.glob("*.gguf"))
    say(f"{mode} on {gguf}")
    if mode in ("raw", "raw-nolog"):
        raw(gguf, keep_callback=mode == "raw")
    elif mode == "ours-load":
        ours_load(gguf)
    elif mode == "ours":
        ours(directory)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
