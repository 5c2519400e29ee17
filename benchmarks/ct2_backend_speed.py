"""Decode speed of the CTranslate2 backend against calling ctranslate2 directly.

Builds (once) a GPT-2-117M-shaped random model -- transformers' ``GPT2Config()``
defaults: 12 layers, n_embd 768, vocab 50257, n_ctx 1024 -- with the tiny test
tokenizer (the vocab rows past it are padding), converts it to CT2 int8 with the
project's converter, then measures with the same thread count:

* ``direct``: ``Generator.generate_tokens`` on the token strings (the floor);
* ``backend``: ``CTranslate2Backend.submit`` + iterating the stream, greedy;
* ``backend+logprobs``: the same asking ``logprobs=5`` (full logits per step);
* ``stepwise-greedy``: ``frequency_penalty`` (SequenceSampler path; agrees with
  CT2's argmax on most steps, so few restarts);
* ``stepwise-seeded``: ``seed`` with temperature 0.8 (restarts on every disagreement);
* ``batch8``: 8 concurrent greedy streams, aggregate tokens/s;
* prefix cache: time to first token for a 512-token prompt that extends the
  previous one, with the cache on (hit) and off.

Run: ``python -m benchmarks.ct2_backend_speed [--dir /tmp/gpt2-117m] [--threads N]``.
Random weights: the text is noise, the speed is the model's. ``min_tokens`` forces
the length.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import random_gpt2


def build(root: Path) -> Path:
    """Build and convert the model under ``root``; reuse it when already there."""
    return random_gpt2.build(root, "ct2", "int8")


def timed(fn: Callable[[], list[float]], repeats: int) -> tuple[float, float, float]:
    """Medians of (time to first token, decode tokens/s after the first, CPU ms per token).

    CPU time (all threads of this process) is the steadier number on a shared
    machine: wall-clock rates swing with other tenants' load.
    """
    ttft, rate, cpu = [], [], []
    for _ in range(repeats):
        c0 = time.process_time()
        stamps = fn()
        cpu.append((time.process_time() - c0) * 1e3 / (len(stamps) - 1))
        ttft.append(stamps[1] - stamps[0])
        rate.append((len(stamps) - 2) / (stamps[-1] - stamps[1]))
    return statistics.median(ttft), statistics.median(rate), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fastpilot-bench-gpt2-117m"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import ctranslate2

    from fastpilot.backends.base import GenerationRequest, SamplingParams
    from fastpilot.backends.ctranslate2 import CTranslate2Backend

    path = build(args.dir)
    n = args.tokens
    backend = CTranslate2Backend(path, threads=args.threads, prefix_chunk=64)
    prompt = (backend.tokenize(open(__file__).read()) * 20)[: args.prompt]
    strings = [backend._vocab[i] for i in prompt]  # noqa: SLF001 - same strings CT2 gets
    print(f"model {path} threads={args.threads} prompt={len(prompt)} tokens={n}")
    print(f"compute_type={backend.info.extra['compute_type']}")

    gen = ctranslate2.Generator(str(path), intra_threads=args.threads, inter_threads=1)

    def direct() -> list[float]:
        stamps = [time.perf_counter()]
        for _ in gen.generate_tokens(strings, max_length=n, min_length=n, sampling_topk=1):
            stamps.append(time.perf_counter())
        return stamps

    def via_backend(**kw: object) -> Callable[[], list[float]]:
        def go() -> list[float]:
            params = SamplingParams(max_tokens=n, min_tokens=n, **kw)  # type: ignore[arg-type]
            stamps = [time.perf_counter()]
            for _ in backend.submit(GenerationRequest(list(prompt), params)):
                stamps.append(time.perf_counter())
            return stamps

        return go

    # The machine may be shared: interleave direct and backend runs, report medians.
    pairs: dict[str, list[tuple[float, float, float]]] = {"direct": [], "backend": []}
    for _ in range(args.repeats):
        pairs["direct"].append(timed(direct, 1))
        pairs["backend"].append(timed(via_backend(temperature=0.0), 1))
    for name, vals in pairs.items():
        ttft = statistics.median(v[0] for v in vals)
        rate = statistics.median(v[1] for v in vals)
        cpu = statistics.median(v[2] for v in vals)
        runs = " ".join(f"{v[1]:.1f}" for v in vals)
        label = name + " greedy (interleaved)"
        print(
            f"{label:34s} ttft {ttft * 1e3:7.1f} ms  decode {rate:7.1f} tok/s  "
            f"cpu {cpu:6.1f} ms/tok  runs: {runs}"
        )
    rows = [
        ("backend greedy logprobs=5", via_backend(temperature=0.0, logprobs=5)),
        ("backend T=0.8 top_p=0.95", via_backend(temperature=0.8, top_p=0.95)),
        ("stepwise greedy freq_penalty=0.1", via_backend(temperature=0.0, frequency_penalty=0.1)),
        ("stepwise seeded T=0.8", via_backend(temperature=0.8, seed=1)),
    ]
    for name, fn in rows:
        restarts = backend.stats()["stepwise_restarts"]
        ttft, rate, cpu = timed(fn, args.repeats)
        extra = backend.stats()["stepwise_restarts"] - restarts
        note = f"  restarts/run={extra / args.repeats:.0f}" if extra else ""
        print(
            f"{name:34s} ttft {ttft * 1e3:7.1f} ms  decode {rate:7.1f} tok/s  "
            f"cpu {cpu:6.1f} ms/tok{note}"
        )
    gen = None  # free it before interpreter exit (CT2 aborts otherwise)

    # 8 concurrent greedy streams (same prompt length: one generate_batch call).
    def batch8() -> float:
        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0)
        streams = [
            backend.submit(GenerationRequest(prompt[i:] + prompt[:i], params)) for i in range(8)
        ]
        t0 = time.perf_counter()
        counts = [0] * 8

        def drain(i: int) -> None:
            counts[i] = sum(1 for _ in streams[i])

        threads = [threading.Thread(target=drain, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - t0)

    agg = statistics.median(batch8() for _ in range(2))
    print(f"{'backend 8 concurrent (aggregate)':34s} {agg:7.1f} tok/s")

    # Prefix cache: a long prompt, then the same prompt extended by 3 tokens.
    long_prompt = (prompt * 20)[:512]
    for chunk in (64, 0):
        b = backend if chunk else CTranslate2Backend(path, threads=args.threads, prefix_chunk=0)
        times = []
        for k in range(4):
            ids = long_prompt + prompt[: 3 * k]
            params = SamplingParams(max_tokens=1, temperature=0.0)
            t0 = time.perf_counter()
            stream = b.submit(GenerationRequest(ids, params))
            list(stream)
            times.append((time.perf_counter() - t0, stream.cached_tokens))
        label = "on " if chunk else "off"
        print(
            f"prefix cache {label} 512-token prompt +3k: "
            + ", ".join(f"{t * 1e3:.0f} ms (cached {c})" for t, c in times)
        )
        if not chunk:
            b.close()
    backend.close()


if __name__ == "__main__":
    main()
