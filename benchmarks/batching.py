"""Where does concurrent throughput go? One GGUF, N concurrent greedy streams, four layers.

``python -m benchmarks.batching MODEL_DIR [--streams 1,4] [--tokens 128] [--threads 2]``
prints one JSON line per (layer, N) with aggregate tokens/s and the time per batched step:

* ``native``: ``llama_decode`` on one batch holding one token of each of N sequences
  (separate KV streams, as the backend sets them up) and numpy argmax per row -- the
  floor for continuous batching through llama.cpp from Python;
* ``backend``: :class:`fastpilot.backends.llamacpp.LlamaCppBackend`, N requests
  submitted at once, steps read by N consumer threads;
* ``engine``: :class:`fastpilot.engine.model.Model.stream` (detokenizer, stop matcher,
  OpenAI chunk shaping), N threads, no HTTP;
* ``http``: ``fastpilot serve`` with ``--slots N`` and N concurrent streaming POSTs on
  loopback (the harness's client), the layer the 4/8-client rows of
  ``python -m benchmarks.run`` measure; ``--py-spy`` records the server with py-spy.

Prompts are distinct, 10-20 tokens, EOS masked so every stream runs ``--tokens`` steps.
Each layer loads the model afresh and first generates ``--tokens`` tokens untimed (the
first decode pages the mmapped weights in); the native layer times after its prefill.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

PROMPTS = [
    "def parse_args(argv):\n    parser = argparse.ArgumentParser(",
    "class LRUCache:\n    def __init__(self, capacity):\n        self.",
    "import os\nimport sys\n\nfor root, dirs, files in os.walk(",
    "def fib(n):\n    if n < 2:\n        return n\n    return",
    "with open(path, encoding='utf-8') as fh:\n    for line in fh:\n",
    "async def fetch(session, url):\n    async with session.get(url) as",
    "SELECT name, count(*) FROM users WHERE created_at >",
    "    def __repr__(self):\n        return f'{type(self).__name__}(",
]


def _report(
    layer: str, n: int, tokens: int, elapsed: float, steps: int, in_decode: float | None = None
) -> None:
    """One JSON line; ``in_decode``: seconds spent inside ``llama_decode`` when known."""
    total = n * tokens
    rec = {
        "layer": layer,
        "streams": n,
        "tokens": total,
        "seconds": round(elapsed, 3),
        "tok_s": round(total / elapsed, 1),
        "ms_per_step": round(1000 * elapsed / max(steps, 1), 2),
    }
    if in_decode is not None:
        rec["ms_in_decode_per_step"] = round(1000 * in_decode / max(steps, 1), 2)
    print(json.dumps(rec), flush=True)


def _run_threads(target, n: int) -> float:  # type: ignore[no-untyped-def]
    """Run ``target(i)`` for i in 0..n-1 on n threads at once; the wall seconds."""
    t0 = time.perf_counter()
    ths = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return time.perf_counter() - t0


def _backend_stat(port: int, key: str) -> float:
    """A ``fastpilot_model_<key>`` gauge from the server's /metrics."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for line in text.splitlines():
        if line.startswith(f"fastpilot_model_{key}{{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(key)


def native(gguf: Path, n: int, tokens: int, threads: int) -> None:
    from fastpilot.backends.llamacpp_native import NativeBatch, load_library

    lib = load_library()
    mp = lib.llama_model_default_params()
    model = lib.llama_model_load_from_file(str(gguf).encode(), mp)
    vocab = lib.llama_model_get_vocab(model)
    n_vocab = int(lib.llama_vocab_n_tokens(vocab))
    eos = int(lib.llama_vocab_eos(vocab))
    cp = lib.llama_context_default_params()
    cp.n_ctx = 512 * n
    cp.n_seq_max = n
    cp.n_batch = cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = False
    cp.flash_attn_type = 0
    ctx = lib.llama_init_from_model(model, cp)
    batch = NativeBatch(lib, 512)
    import ctypes

    def tok(text: str) -> list[int]:
        data = text.encode()
        out = (ctypes.c_int32 * (len(data) + 8))()
        k = lib.llama_tokenize(vocab, data, len(data), out, len(out), False, False)
        return list(out[:k])

    prompts = [tok(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))) for i in range(n)]
    batch.clear()
    for s, p in enumerate(prompts):
        batch.add(p, 0, s, True)
    assert lib.llama_decode(ctx, batch.ready()) == 0
    pos = [len(p) for p in prompts]
    rows = list(range(n))
    acc = 0
    for s in range(n):
        acc += len(prompts[s])
        rows[s] = acc - 1
    t0 = time.perf_counter()
    for _ in range(tokens):
        nxt = []
        for s in range(n):
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, rows[s]), shape=(n_vocab,))
            x = logits.copy()
            x[eos] = -np.inf
            nxt.append(int(np.argmax(x)))
        batch.clear()
        for s in range(n):
            batch.add([nxt[s]], pos[s], s, True)
            pos[s] += 1
        rows = list(range(n))
        assert lib.llama_decode(ctx, batch.ready()) == 0
    _report("native", n, tokens, time.perf_counter() - t0, tokens)
    lib.llama_free(ctx)
    lib.llama_model_free(model)


def backend(directory: Path, n: int, tokens: int, threads: int) -> None:
    from fastpilot.backends.base import GenerationRequest, SamplingParams
    from fastpilot.backends.llamacpp import LlamaCppBackend

    be = LlamaCppBackend(directory, threads=threads, slots=n, context_length=512)
    try:
        reqs = [
            GenerationRequest(
                prompt_ids=be.tokenize(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))),
                params=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
            )
            for i in range(n)
        ]
        warm = GenerationRequest(prompt_ids=reqs[0].prompt_ids, params=reqs[0].params)
        list(be.submit(warm))  # first touch of the mmapped weights is not timed
        counts = [0] * n

        def consume(i: int, stream) -> None:  # type: ignore[no-untyped-def]
            for _ in stream:
                counts[i] += 1

        before = be.stats()["decode_steps"]
        t0 = time.perf_counter()
        streams = [be.submit(r) for r in reqs]
        ths = [threading.Thread(target=consume, args=(i, s)) for i, s in enumerate(streams)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        elapsed = time.perf_counter() - t0
        assert counts == [tokens] * n, counts
        _report("backend", n, tokens, elapsed, int(be.stats()["decode_steps"] - before))
    finally:
        be.close()


def engine(directory: Path, n: int, tokens: int, threads: int) -> None:
    import fastpilot

    model = fastpilot.load(directory, threads=threads, slots=n, context_length=512)
    try:
        model.complete(prompt="warm up", max_tokens=tokens, ignore_eos=True)  # not timed
        counts = [0] * n

        def consume(i: int) -> None:
            prompt = PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))
            for chunk in model.stream(
                prompt=prompt, max_tokens=tokens, temperature=0.0, ignore_eos=True
            ):
                if chunk.get("choices"):
                    counts[i] += 1

        elapsed = _run_threads(consume, n)
        _report("engine", n, tokens, elapsed, tokens)
    finally:
        model.close()


def http(
    directory: Path, n: int, tokens: int, threads: int, py_spy: Path | None, peer: bool = False
) -> None:
    import subprocess
    import sys

    from benchmarks.client import Call, send
    from benchmarks.llama_server_build import server_path
    from benchmarks.procs import Managed, free_port

    port = free_port()
    if peer:  # llama.cpp's own server, configured as benchmarks.contenders does
        gguf = directory / "model.gguf" if directory.is_dir() else directory
        argv = [str(server_path()), "-m", str(gguf), "--port", str(port), "-t", str(threads)]
        argv += ["-tb", str(threads), "--parallel", str(n), "--cont-batching", "--cache-prompt"]
        argv += ["-c", str(2048 * n), "--no-kv-unified", "--no-webui"]
    else:
        argv = [sys.executable, "-c", "from fastpilot.cli import main; raise SystemExit(main())"]
        argv += ["serve", "--model", f"m={directory}", "--port", str(port)]
        argv += ["--threads", str(threads), "--slots", str(n)]
    with Managed(argv, Path(f"/tmp/batching-serve-{port}.log")) as server:
        server.wait_http(port, "/health", 120)
        warm = {"prompt": "warm up", "max_tokens": tokens, "ignore_eos": True}
        send(port, Call("POST", "/v1/completions", warm, False))  # not timed
        spy = None
        if py_spy is not None:
            out = py_spy.with_name(f"{py_spy.stem}-{n}{py_spy.suffix}")
            exe = str(Path(sys.executable).with_name("py-spy"))
            spy = subprocess.Popen(
                [exe, "record", "-p", str(server.pid), "-o", str(out), "-r", "100"]
                + ["--threads", "--nonblocking", "-f", "speedscope"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        results = [None] * n
        if not peer:
            decode0 = _backend_stat(port, "backend_decode_seconds")
            steps0 = _backend_stat(port, "backend_decode_steps")

        def one(i: int) -> None:
            body = {
                "prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)),
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
                "cache_prompt": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            results[i] = send(port, Call("POST", "/v1/completions", body, True))

        elapsed = _run_threads(one, n)
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        steps, in_decode = tokens, None
        if not peer:
            in_decode = _backend_stat(port, "backend_decode_seconds") - decode0
            steps = int(_backend_stat(port, "backend_decode_steps") - steps0)
    got = [r.tokens if r is not None and r.ok else -1 for r in results]
    assert got == [tokens] * n, got
    _report("llama-server" if peer else "http", n, tokens, elapsed, steps, in_decode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="directory with model.gguf (+ fastpilot.json)")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", default="native,backend,engine,http")
    ap.add_argument("--py-spy", type=Path, default=None, help="speedscope file for the http layer")
    args = ap.parse_args()
    gguf = args.model / "model.gguf" if args.model.is_dir() else args.model
    for layer in args.layers.split(","):
        for n in (int(x) for x in args.streams.split(",")):
            if layer == "native":
                native(gguf, n, args.tokens, args.threads)
            elif layer == "backend":
                backend(args.model, n, args.tokens, args.threads)
            elif layer == "engine":
                engine(args.model, n, args.tokens, args.threads)
            elif layer in ("http", "llama-server"):
                http(args.model, n, args.tokens, args.threads, args.py_spy, layer != "http")


if __name__ == "__main__":
    main()
