"""Load and soak against ``fastpilot serve`` (slow; ``make test-slow``). Loopback only.

Only ``test_check_judges_events_not_text`` (no server) runs in the default suite.

The server is the real command line serving the tiny random GPT-2 (GGUF
q4_k_m, llama.cpp, 4 slots). Sixteen client threads mix the request kinds
editors send: plain and streamed completions on both routes, Copilot-style
``n=2`` streams with logprobs, plain and streamed chat.

- ``test_load``: a fixed number of requests (``FASTPILOT_LOAD_REQUESTS``,
  default 640). Every request succeeds -- a 429 ``queue_full`` would count as
  deliberate, anything else is a failure -- and the server's threads and open
  file descriptors are the same before and after.
- ``test_soak``: the same mix for ``FASTPILOT_SOAK_SECONDS`` (default 600; set
  it lower for a quick run). Resident memory is sampled every 5 s; after the
  warm-up (the first 10% of the run, at least 20 s) it must stay within
  ``max(32 MiB, 10%)`` of the warm value, and threads/fds must not grow.
  ``FASTPILOT_SOAK_REPORT=path.json`` writes the samples.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.servers import ServeProcess

CLIENTS = 16
MiB = 1024 * 1024
SOAK_SECONDS = float(os.environ.get("FASTPILOT_SOAK_SECONDS", "600"))


def _kinds(i: int) -> tuple[str, dict]:
    prompt = f"def f{i % 50}(x):\n    return x + {i % 7}\n\ndef g(y):\n"
    kinds = [
        ("/v1/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0}),
        ("/v1/completions", {"prompt": prompt, "max_tokens": 24, "stream": True}),
        ("/v1/engines/codegen/completions",
         {"prompt": prompt, "max_tokens": 16, "n": 2, "logprobs": 2, "stream": True,
          "stop": ["\n\n"], "temperature": 0.2, "nwo": "x/y"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}],
                                  "max_tokens": 12}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}],
                                  "max_tokens": 12, "stream": True}),
    ]  # fmt: skip
    return kinds[i % len(kinds)]


def _check(status: int, data: bytes, streamed: bool) -> str:
    """``"ok"``, ``"429"`` or a failure description."""
    if status == 429:
        return "429"
    if status != 200:
        return f"status {status}: {data[:200]!r}"
    if streamed:
        text = data.decode()
        if not text.endswith("data: [DONE]\n\n"):
            return f"bad stream: {text[-300:]!r}"
        # Judge the events, not the raw text: a token or a top_logprobs key spelled
        # "error" is content; an error is an event whose top-level key is "error".
        for block in text.split("\n\n")[:-2]:
            if not block.startswith("data: "):
                return f"bad stream: not an event: {block[:300]!r}"
            event = json.loads(block[6:])
            if "error" in event or "choices" not in event:
                return f"bad stream: {block[:300]!r}"
        return "ok"
    body = json.loads(data)
    return "ok" if body.get("choices") else f"no choices: {body}"


def run_clients(port: int, keep_going: Callable[[int], bool]) -> tuple[Counter, list[str], int]:
    """16 threads, each on its own keep-alive connection; returns (outcomes, failures, served)."""
    counter = itertools.count()
    outcomes: Counter = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            i = next(counter)
            if not keep_going(i):
                break
            path, body = _kinds(i)
            try:
                conn.request("POST", path, body=json.dumps(body),
                             headers={"Content-Type": "application/json"})  # fmt: skip
                resp = conn.getresponse()
                data = resp.read()
                result = _check(resp.status, data, bool(body.get("stream")))
                if resp.will_close:
                    conn.close()
            except Exception as ex:  # noqa: BLE001 - every failure is counted and reported
                result = f"{type(ex).__name__}: {ex}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                outcomes["ok" if result == "ok" else "429" if result == "429" else "fail"] += 1
                if result not in ("ok", "429"):
                    failures.append(result)
        conn.close()

    threads = [threading.Thread(target=worker, name=f"client-{n}") for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, failures, sum(outcomes.values())


def settle(server: ServeProcess, want_threads: int, want_fds: int, timeout: float = 15) -> tuple:
    """Wait until threads and fds are back to (at most) the wanted counts; return the counts."""
    end = time.monotonic() + timeout
    while True:
        threads, fds = server.threads(), server.fds()
        if (threads <= want_threads and fds <= want_fds) or time.monotonic() > end:
            return threads, fds
        time.sleep(0.25)


@pytest.fixture(scope="module")
def server(tiny_gpt2_models):
    args = ["--model", f"tiny={tiny_gpt2_models['gguf-q4_k_m']}", "--threads", "1",
            "--slots", "4"]  # fmt: skip
    with ServeProcess(args) as proc:
        yield proc


def _warm(server: ServeProcess) -> tuple[int, int]:
    outcomes, failures, _ = run_clients(server.port, lambda i: i < 2 * CLIENTS)
    assert not failures, failures[:3]
    time.sleep(1.0)  # idle keep-alive sockets from the warm-up are closed by then
    return server.threads(), server.fds()


def test_check_judges_events_not_text():
    def stream(*events: dict) -> bytes:
        return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
            b"data: [DONE]\n\n"
        )

    # The word "error" as generated text and as a top_logprobs key is content.
    choice = {"index": 0, "text": "error", "finish_reason": None,
              "logprobs": {"tokens": ["error"], "top_logprobs": [{"error": -0.1}]}}  # fmt: skip
    assert _check(200, stream({"id": "x", "choices": [choice]}), True) == "ok"
    failed = {"error": {"message": "boom", "type": "server_error", "param": None, "code": "x"}}
    assert _check(200, stream({"id": "x", "choices": [choice]}, failed), True) != "ok"
    assert _check(200, stream({"id": "x", "choices": [choice]})[:-8], True) != "ok"
    assert _check(429, b"{}", True) == "429"
    assert _check(200, b'{"choices": []}', False) != "ok"


@pytest.mark.slow
def test_load(server):
    total = int(os.environ.get("FASTPILOT_LOAD_REQUESTS", str(40 * CLIENTS)))
    threads0, fds0 = _warm(server)
    t0 = time.monotonic()
    outcomes, failures, served = run_clients(server.port, lambda i: i < total)
    elapsed = time.monotonic() - t0
    threads1, fds1 = settle(server, threads0, fds0)
    print(
        f"\nload: {served} requests by {CLIENTS} clients in {elapsed:.1f}s "
        f"({served / elapsed:.1f} req/s): {dict(outcomes)}; threads {threads0}->{threads1}, "
        f"fds {fds0}->{fds1}, rss {server.rss_bytes() / MiB:.0f} MiB"
    )
    assert served == total
    assert outcomes["fail"] == 0, failures[:5]
    assert threads1 <= threads0, "thread leak"
    assert fds1 <= fds0, "file descriptor leak"
    status, _ = server.request("GET", "/health")
    assert status == 200


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 900)  # the soak itself, plus the suite's usual limit
def test_soak(server):
    seconds = SOAK_SECONDS
    warmup = max(20.0, 0.1 * seconds)
    threads0, fds0 = _warm(server)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sampler() -> None:
        start = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - start, server.rss_bytes()))
            stop.wait(5.0)

    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    end = time.monotonic() + seconds
    outcomes, failures, served = run_clients(server.port, lambda i: time.monotonic() < end)
    stop.set()
    watcher.join(10)
    samples.append((seconds, server.rss_bytes()))
    threads1, fds1 = settle(server, threads0, fds0)
    warm = [rss for t, rss in samples if t <= warmup][-1]
    final = samples[-1][1]
    peak = max(rss for t, rss in samples if t > warmup) if len(samples) > 2 else final
    bound = max(32 * MiB, warm // 10)
    summary = {
        "seconds": seconds,
        "requests": served,
        "outcomes": dict(outcomes),
        "rss_start_mib": round(samples[0][1] / MiB, 1),
        "rss_warm_mib": round(warm / MiB, 1),
        "rss_peak_after_warmup_mib": round(peak / MiB, 1),
        "rss_end_mib": round(final / MiB, 1),
        "bound_mib": round(bound / MiB, 1),
        "threads": [threads0, threads1],
        "fds": [fds0, fds1],
    }
    print("\nsoak: " + json.dumps(summary))
    report = os.environ.get("FASTPILOT_SOAK_REPORT")
    if report:
        Path(report).write_text(json.dumps({**summary, "samples": samples}, indent=1))
    assert outcomes["fail"] == 0, failures[:5]
    assert peak - warm <= bound and final - warm <= bound, summary
    assert threads1 <= threads0 and fds1 <= fds0, summary
