"""What one streamed token costs on top of ``llama_decode``, layer by layer, in µs.

``python -m benchmarks.overhead [--model NAME=DIR ...] [--tokens 160] [--repeats 3]
[--llama-server]`` measures greedy single-stream decode of ``--tokens`` forced tokens
(``ignore_eos``) after the same code prompt (a chunk of the stdlib's ``ast.py``, as
:mod:`benchmarks.speculative` uses), with the same threads, through each layer:

* ``floor``: ``llama_decode`` of one token + ``argmax`` over the logits row viewed with
  NumPy, in a ctypes loop -- no fastpilot code. It runs on the llama.cpp context a
  one-slot :class:`~fastpilot.backends.llamacpp.LlamaCppBackend` created (while its
  worker is idle), so the context settings are the backend's own;
* ``backend``: ``LlamaCppBackend.submit`` + iterating the :class:`TokenStream`;
* ``engine``: ``fastpilot.load(...).stream(...)``, the chunk dicts of the library;
* ``http``: ``fastpilot serve --slots 1 --speculative off`` streamed over SSE with the
  harness client (:mod:`benchmarks.client`);
* ``llama-server`` (``--llama-server``): llama.cpp's server, plain, ``--parallel 1``,
  same client and body.

Each layer's rate is ``(tokens - 1) / (last token - first token)``: the prompt is out
of it. µs/token minus the floor's is that layer's per-token overhead; for HTTP it
includes the client's parsing, which llama-server's row pays alike. Layers run
round-robin ``--repeats`` times so a busy machine slows them alike; the table shows
the median (and best) rate per layer.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.client import Call, send
from benchmarks.procs import Managed, free_port, tree_cpu_seconds
from benchmarks.speculative import prompts

HERE = Path(__file__).resolve().parent
LAYERS = ("floor", "backend", "engine", "http", "llama-server")
# ``--device``: where fastpilot's layers run (``cuda`` on a GPU build: every layer offloaded).
DEVICE = "cpu"


def default_models() -> list[tuple[str, Path]]:
    """tiny-py (``make convert``) and the harness's GPT-2-117M-shaped Q4_K_M file, if built."""
    out = []
    tiny = HERE.parent / "models" / "tiny-py" / "gguf-q4_k_m"
    if not (tiny / "model.gguf").is_file():
        tiny = Path("/work/main/models/tiny-py/gguf-q4_k_m")
    if (tiny / "model.gguf").is_file():
        out.append(("tiny-py", tiny))
    gpt2 = Path.home() / ".cache/fastpilot/bench/models/gpt2-117m-gguf-q4_k_m"
    if (gpt2 / "model.gguf").is_file():
        out.append(("gpt2-117m", gpt2))
    return out


def _rate(stamps: list[float], tokens: int) -> float:
    """Tokens/s after the first token, from the arrival times of the first and last."""
    return (tokens - 1) / (stamps[-1] - stamps[0])


def _cpu_us(cpu: list[float], tokens: int) -> float:
    """Process CPU µs per token after the first (all threads: llama.cpp's and Python's)."""
    return (cpu[-1] - cpu[0]) * 1e6 / (tokens - 1)


def _floor_loop(backend: Any, prompt: str, tokens: int) -> tuple[float, float]:
    lib, ctx = backend._lib, backend._ctx  # the worker is idle: no request was submitted
    n_rows = backend._n_rows
    ids = backend.tokenize(prompt)
    step = 32  # prompt chunks well under any n_batch
    for i in range(0, len(ids), step):
        part = (ctypes.c_int32 * len(ids[i : i + step]))(*ids[i : i + step])
        assert lib.llama_decode(ctx, lib.llama_batch_get_one(part, len(part))) == 0
    one = (ctypes.c_int32 * 1)()
    stamps, cpu = [], []
    for _ in range(tokens):
        row = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(n_rows,))
        one[0] = int(np.argmax(row))
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        assert lib.llama_decode(ctx, lib.llama_batch_get_one(one, 1)) == 0
    lib.llama_memory_clear(backend._mem, True)
    return _rate(stamps, tokens), _cpu_us(cpu, tokens)


def floor(directory: Path, threads: int, prompt: str, tokens: int) -> tuple[float, float]:
    """The in-process floor on a one-slot backend's own context (see the module docstring)."""
    from fastpilot.backends.llamacpp import LlamaCppBackend
    from fastpilot.backends.llamacpp_native import on_own_thread

    backend = LlamaCppBackend(directory, threads=threads, slots=1, speculative="off", device=DEVICE)
    try:
        # On a thread that ends: llama.cpp's OpenMP team of this loop must not outlive it
        # (a team left on the main thread throttles every later layer's decode steps;
        # see llamacpp_native.on_own_thread).
        return on_own_thread(lambda: _floor_loop(backend, prompt, tokens), "overhead-floor")
    finally:
        backend.close()


def backend_layer(directory: Path, threads: int, prompt: str, tokens: int) -> tuple[float, float]:
    """``submit`` + iterate the stream of a one-slot backend, greedy."""
    from fastpilot.backends.base import GenerationRequest, SamplingParams
    from fastpilot.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(directory, threads=threads, slots=1, speculative="off", device=DEVICE)
    try:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        if hasattr(params, "token_logprob"):  # the engine's choice (older trees lack it)
            params = dataclasses.replace(params, token_logprob=False)
        stream = backend.submit(GenerationRequest(backend.tokenize(prompt), params))
        stamps, cpu = [], []
        for _ in stream:
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
        assert len(stamps) == tokens, len(stamps)
        return _rate(stamps, tokens), _cpu_us(cpu, tokens)
    finally:
        backend.close()


def engine_layer(directory: Path, threads: int, prompt: str, tokens: int) -> tuple[float, float]:
    """``fastpilot.load(...).stream(...)``: chunk dicts, as the server gets them."""
    import fastpilot

    model = fastpilot.load(directory, threads=threads, slots=1, speculative="off", device=DEVICE)
    try:
        stream = model.stream(
            prompt=prompt, max_tokens=tokens, temperature=0, ignore_eos=True, stream=True
        )
        stamps, cpu = [], []
        for chunk in stream:
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
                cpu.append(time.process_time())
        assert stream.usage()["completion_tokens"] == tokens
        # First chunk: the first token; last: the last token (max_tokens is known at once).
        return _rate(stamps, tokens), _cpu_us(cpu, tokens)
    finally:
        model.close()


def _server_argv(layer: str, directory: Path, port: int, threads: int) -> list[str]:
    from benchmarks.speculative import _argv

    contender = "fastpilot-off" if layer == "http" else "llama-server"
    argv = _argv(contender, directory, port, argparse.Namespace(threads=threads), 1)
    if DEVICE != "cpu":
        argv += ["--device", DEVICE] if layer == "http" else ["-ngl", "99"]
    return argv


def server_layer(layer: str, directory: Path, threads: int, text: str, tokens: int, rounds: int):
    """One server (fastpilot or llama-server) for every round; yields (tok/s, CPU µs/token).

    Both are differential: a ``tokens``-token request minus a one-token request with the
    same (cached) prompt, over ``tokens - 1`` -- the prompt's share and the per-request
    work cancel out. Wall time is end to end at the client, not the spacing of the
    events: llama-server's events can arrive in bursts (on a busy machine its HTTP
    thread sent 39 of 40 events within 1 ms), which would overstate its rate.
    The CPU is the server's threads' only (the client's parsing is not in it).
    """
    port = free_port()
    log = Path(f"/tmp/overhead-{layer}-{directory.name}.log")
    body = {
        "model": "m",
        "prompt": text,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    def request(n: int) -> tuple[Any, float]:
        # The process's own CPU count, not its live threads': run 20261127-214147 summed
        # the live threads' schedstat and read 2.8 busy cores on 2 vCPUs (GPT-2's HTTP row).
        c0 = tree_cpu_seconds(server.pid)
        r = send(port, Call("POST", "/v1/completions", {**body, "max_tokens": n}, True))
        if not r.ok or r.tokens != n:
            raise RuntimeError(f"{layer}: bad result {r}")
        return r, tree_cpu_seconds(server.pid) - c0

    with Managed(_server_argv(layer, directory, port, threads), log) as server:
        server.wait_http(port, "/health", 180)
        request(tokens)  # untimed: pages the weights in, caches the prompt
        for _ in range(rounds):
            r1, cpu1 = request(1)
            r, cpu = request(tokens)
            yield (tokens - 1) / (r.e2e - r1.e2e), (cpu - cpu1) * 1e6 / (tokens - 1)


def measure(
    name: str, directory: Path, threads: int, tokens: int, repeats: int, layers: list[str]
) -> dict[str, Any]:
    """Rates (tok/s) of every layer, ``repeats`` rounds each; the in-process ones interleaved."""
    text = prompts(1, 600)[0]
    rates: dict[str, list[tuple[float, float]]] = {layer: [] for layer in layers}
    inproc = {"floor": floor, "backend": backend_layer, "engine": engine_layer}
    for _ in range(repeats):
        for layer in layers:
            if layer in inproc:
                rates[layer].append(inproc[layer](directory, threads, text, tokens))
    for layer in layers:
        if layer not in inproc:  # one server start for every round; the same prompt each
            rates[layer] = list(server_layer(layer, directory, threads, text, tokens, repeats))
    return {"model": name, "threads": threads, "tokens": tokens, "rates": rates}


def table(results: list[dict[str, Any]]) -> str:
    """Median tok/s, wall and CPU µs/token per (model, layer), and the excess over the floor."""
    out = [
        "| model | layer | tok/s median (best) | wall µs/token (over floor) "
        "| CPU µs/token (over floor) | tok/s vs llama-server |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for res in results:
        rows = {k: v for k, v in res["rates"].items() if v}
        rate = {k: statistics.median(r for r, _ in v) for k, v in rows.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in rows.items()}
        ls = rate.get("llama-server")
        for layer in rows:
            wall = 1e6 / rate[layer]
            over = over_cpu = ""
            if "floor" in rate:
                over = f" ({wall - 1e6 / rate['floor']:+.0f})"
                over_cpu = f" ({cpu[layer] - cpu['floor']:+.0f})"
            vs = f"{rate[layer] / ls:.3f}x" if ls else "-"
            best = max(r for r, _ in rows[layer])
            out.append(
                f"| {res['model']} | {layer} | {rate[layer]:.1f} ({best:.1f}) | {wall:.0f}{over} "
                f"| {cpu[layer]:.0f}{over_cpu} | {vs} |"
            )
    return "\n".join(out)


def section(models: list[tuple[str, Path]], threads: int, llama_server: bool) -> list[dict]:
    """The rows for ``python -m benchmarks.run`` (its ``overhead`` section)."""
    layers = [x for x in LAYERS if llama_server or x != "llama-server"]
    out = []
    for name, directory in models:
        try:
            out.append(measure(name, directory, threads, 160, 3, layers))
        except (RuntimeError, OSError, AssertionError) as ex:
            print(f"[overhead] {name} failed: {ex}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="NAME=DIR (a GGUF model directory)")
    ap.add_argument("--layers", default=",".join(LAYERS[:-1]), help=f"comma list of {LAYERS}")
    ap.add_argument("--llama-server", action="store_true", help="add the llama-server row")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", type=Path, default=None, help="write the raw rates here")
    ap.add_argument("--device", default="cpu", help="fastpilot's device (cpu or cuda)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    models = (
        [(m.partition("=")[0], Path(m.partition("=")[2])) for m in args.model]
        if args.model
        else default_models()
    )
    layers = args.layers.split(",")
    if args.llama_server and "llama-server" not in layers:
        layers.append("llama-server")
    results = []
    for name, directory in models:
        res = measure(name, directory, args.threads, args.tokens, args.repeats, layers)
        print(json.dumps(res), flush=True)
        results.append(res)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
