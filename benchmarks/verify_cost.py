"""What does verifying k drafted tokens cost? ``llama_decode`` of 1 + k tokens vs 1.

``python -m benchmarks.verify_cost --model NAME=DIR [--model ...] [--sizes 1,2,4,...]``

For each GGUF model: evaluate a ``--context``-token prompt once, then time
``llama_decode`` of a batch of ``k`` tokens of one sequence at the positions after
it, with logits for every token (what a speculating sequence's entry asks for),
rolling the KV back (``llama_memory_seq_rm``) after each, the sizes interleaved.
Prints the minimum and median time per batch and their ratios to the one-token
batch (on a loaded machine the minimum is the better estimate): on a small model a 16-64-token
batch costs little more than one token (the step is bound by reading the weights
once), on a big one it grows with k -- which is why the draft length must follow
the measured acceptance rather than a fixed cap.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def measure(directory: Path, sizes: list[int], threads: int, context: int, reps: int) -> dict:
    """Median seconds of ``llama_decode`` per batch size (and the 1-token ratio)."""
    import numpy as np

    from fastpilot.backends.llamacpp_native import NativeBatch, load_library, new_context
    from fastpilot.manifest import find_gguf

    lib = load_library()
    gguf = find_gguf(directory)
    mparams = lib.llama_model_default_params()
    model = lib.llama_model_load_from_file(str(gguf).encode(), mparams)
    n_ctx = int(lib.llama_model_n_ctx_train(model)) or 2048
    cap = max(max(sizes), context)
    ctx = new_context(lib, model, n_ctx, 1, cap, threads, None, 0)
    mem = lib.llama_get_memory(ctx)
    batch = NativeBatch(lib, cap)
    vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, min(vocab, 800) - 1, context)]
    batch.clear()
    batch.add(prompt, 0, 0, 1)
    assert lib.llama_decode(ctx, batch.ready()) == 0
    drafts = {k: [int(t) for t in rng.integers(0, min(vocab, 800) - 1, k)] for k in sizes}
    times: dict[int, list[float]] = {k: [] for k in sizes}
    try:
        # Sizes interleaved round by round, so a load change on a shared machine hits
        # every size alike; the first round is a warm-up.
        for rep in range(reps + 1):
            for k in sizes:
                batch.clear()
                batch.add(drafts[k], context, 0, k)
                t0 = time.perf_counter()
                rc = lib.llama_decode(ctx, batch.ready())
                dt = time.perf_counter() - t0
                assert rc == 0
                lib.llama_memory_seq_rm(mem, 0, context, -1)
                if rep:
                    times[k].append(dt)
    finally:
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    one_min, one_med = min(times[sizes[0]]), statistics.median(times[sizes[0]])
    out: dict[str, dict[str, float]] = {}
    for k in sizes:
        lo, med = min(times[k]), statistics.median(times[k])
        out[str(k)] = {
            "min_ms": round(1000 * lo, 3),
            "median_ms": round(1000 * med, 3),
            "ratio_min": round(lo / one_min, 2),
            "ratio_median": round(med / one_med, 2),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR (a GGUF model)")
    ap.add_argument("--sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=256, help="prompt tokens already in KV")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    for spec in args.model:
        name, _, directory = spec.partition("=")
        res = measure(Path(directory), sizes, args.threads, args.context, args.repeats)
        print(json.dumps({"model": name, "threads": args.threads, **res}), flush=True)


if __name__ == "__main__":
    main()
