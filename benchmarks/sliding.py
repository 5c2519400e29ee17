"""Sliding-window prompt cache: time to first token when an editor's window slides.

``python -m benchmarks.sliding --model NAME=DIR [--model ...] [--requests 8]``
prints one JSON line per request kind and contender, then a table. An editor sends the
last N tokens of a file it is editing: a new line at the end pushes one out at the
start, so consecutive prompts share everything *but* their start. Three kinds of
request, each ``--requests`` times (cold: ``--cold``) after an untimed one that fills
the cache:

* ``cold``: a window of the same length from another part of the file, nothing cached;
* ``prefix``: the previous prompt plus the next line (a pure prefix hit: the file grew
  and the window did not move yet);
* ``slide``: the window at the context limit (``n_ctx - 16`` tokens), moved down by one
  line: the next line appended, the first ones dropped to stay at the limit.

Contenders, one server at a time, same threads and ``--slots`` (= ``--parallel``):
``fastpilot`` (``--cache-reuse N``, default 256), ``fastpilot-prefix`` (``--cache-reuse 0``:
the prefix cache alone), ``llama-server`` (``--cache-reuse N``) and ``llama-server-prefix``
(its default, no reuse). Prompts are sent as token ids (both servers take them), cut from
one tokenization of the file, line by line: a text window would be tokenized again by
the server, and a window that starts inside an indented line tokenizes its first
characters differently from the same characters mid-file (``"\\n   "`` vs ``"   "``), so
its first token is not in any cache and neither server can reuse anything past it
(both move runs into place only while the prompt's *first* tokens match; see the
README's prompt-cache section). The file is the stdlib's ``typing.py``.

TTFT here is the wall time of a one-token, non-streamed completion (prompt
evaluation, one sample, the HTTP round trip); ``evaluated`` is ``prompt_tokens -
cached_tokens`` from the response's ``usage`` (both servers report it). Headline
ratios: ``slide / prefix`` per contender (target: fastpilot within 2x) and fastpilot
over llama-server per kind.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.contenders import fastpilot_serve_argv, llama_server_argv
from benchmarks.llama_server_build import server_path
from benchmarks.procs import Managed, free_port

CONTENDERS = ("fastpilot", "fastpilot-prefix", "llama-server", "llama-server-prefix")
KINDS = ("cold", "prefix", "slide")
SOURCE = Path(sysconfig.get_paths()["stdlib"]) / "typing.py"
MARGIN = 16  # tokens left free below n_ctx: the generated token and some slack


@dataclass(frozen=True, slots=True)
class Reply:
    """One completion's wall time and how much of its prompt the server evaluated."""

    seconds: float
    prompt_tokens: int
    cached_tokens: int


def file_lines(directory: Path, source: Path = SOURCE) -> list[list[int]]:
    """``source`` as token ids, one list per line, with the model's own tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    return [ids for ids in (tok.encode(line).ids for line in lines) if ids]


def fit(lines: list[list[int]], end: int, budget: int) -> int:
    """The first line of the longest window ending before line ``end`` within ``budget``."""
    start, n = end, 0
    while start > 0 and n + len(lines[start - 1]) <= budget:
        n += len(lines[start - 1])
        start -= 1
    return start


def flat(lines: list[list[int]], start: int, end: int) -> list[int]:
    return [t for line in lines[start:end] for t in line]


def schedule(
    lines: list[list[int]], n_ctx: int, requests: int, cold: int
) -> dict[str, list[list[int]]]:
    """Every kind's prompts, the untimed cache-filling one first.

    Prefix then slide run over the file's last part: the slide starts where the prefix
    run ends (its untimed first request is the last prefix prompt plus a line, slid,
    so it costs a reuse, not a cold evaluation). The cold windows come before both,
    disjoint from each other and from them."""
    limit = n_ctx - MARGIN
    total = len(lines)
    slide_end0 = total - requests
    slide = [flat(lines, fit(lines, end, limit), end) for end in range(slide_end0, total + 1)]
    prefix_last = slide_end0 - 1
    prefix_start = fit(lines, prefix_last, limit)  # the last prefix prompt is at the limit
    prefix = [flat(lines, prefix_start, prefix_last - requests + i) for i in range(requests + 1)]
    colds, end = [], prefix_start
    for _ in range(cold + 1):
        start = fit(lines, end, limit)
        if start == 0 and len(colds) < cold:
            raise ValueError(f"{SOURCE} is too short for {cold} cold windows of {limit}")
        colds.append(flat(lines, start, end))
        end = start
    return {"cold": colds, "prefix": prefix, "slide": slide}


def _argv(contender: str, directory: Path, port: int, args: argparse.Namespace, n_ctx: int):
    reuse = str(args.cache_reuse)
    if contender.startswith("fastpilot"):
        argv = fastpilot_serve_argv(directory, port, args.threads, args.slots)
        return argv + ["--cache-reuse", "0" if contender == "fastpilot-prefix" else reuse]
    argv = llama_server_argv(directory, port, args.threads, args.slots, n_ctx)
    if contender == "llama-server":
        argv += ["--cache-reuse", reuse]
    return argv


def complete(port: int, prompt: list[int]) -> Reply:
    """One greedy one-token completion of ``prompt`` (token ids), timed end to end."""
    body = {"model": "m", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    seconds = time.perf_counter() - t0
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {raw[:300]!r}")
    usage = json.loads(raw)["usage"]
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return Reply(seconds, int(usage["prompt_tokens"]), cached)


def measure(contender: str, name: str, directory: Path, args: argparse.Namespace) -> list[dict]:
    """Start one server, warm it up, time every kind's requests; one row per kind."""
    n_ctx = json.loads((directory / "fastpilot.json").read_text()).get("context_length", 2048)
    prompts = schedule(file_lines(directory), n_ctx, args.requests, args.cold)
    port = free_port()
    log = Path(f"/tmp/sliding-{contender}-{name}.log")
    rows = []
    with Managed(_argv(contender, directory, port, args, n_ctx), log) as server:
        server.wait_http(port, "/health", 300)
        # Untimed: pages the weights in. Reversed, so that no prompt starts like it
        # (llama-server also keeps old slot states in RAM and restores a common prefix).
        complete(port, prompts["cold"][-1][63::-1])
        for kind in args.kinds:
            first, *timed = prompts[kind]
            complete(port, first)  # untimed: fills the cache (for cold: evicts the last)
            replies = [complete(port, p) for p in timed]
            secs = [r.seconds for r in replies]
            row = {
                "contender": contender,
                "model": name,
                "kind": kind,
                "slots": args.slots,
                "prompt_tokens": round(statistics.median(r.prompt_tokens for r in replies)),
                "evaluated": round(
                    statistics.median(r.prompt_tokens - r.cached_tokens for r in replies)
                ),
                "ttft_ms": round(1000 * statistics.median(secs), 1),
                "ttft_ms_min": round(1000 * min(secs), 1),
                "ttft_ms_max": round(1000 * max(secs), 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: median TTFT (range) and evaluated tokens per kind, and slide / prefix."""
    by: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r["model"], r["contender"]), {})[r["kind"]] = r
    out = [
        "| model | contender | cold ms (evaluated) | prefix hit ms (evaluated) "
        "| slide ms (evaluated) | slide / prefix | slide / cold |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        return (
            f"{r['ttft_ms']:.0f} ({r['ttft_ms_min']:.0f}-{r['ttft_ms_max']:.0f}; {r['evaluated']})"
        )

    for (model, c), kinds in by.items():
        cold, pre, sl = (kinds.get(k) for k in KINDS)
        ratio = f"{sl['ttft_ms'] / pre['ttft_ms']:.2f}" if sl and pre else "-"
        vs_cold = f"{sl['ttft_ms'] / cold['ttft_ms']:.2f}" if sl and cold else "-"
        out.append(
            f"| {model} | {c} | {cell(cold)} | {cell(pre)} | {cell(sl)} | {ratio} | {vs_cold} |"
        )
    return "\n".join(out)


def section(
    models: list[tuple[str, Path]], threads: int, llama_server: bool, requests: int = 6
) -> list[dict]:
    """The rows for ``python -m benchmarks.run`` (its ``sliding`` section): rotary GGUF
    models only (GPT-2 cannot shift). A contender that fails is left out (stderr)."""
    args = argparse.Namespace(
        threads=threads, requests=requests, cold=2, slots=1, cache_reuse=256, kinds=KINDS
    )
    names = [c for c in CONTENDERS if llama_server or not c.startswith("llama-server")]
    rows: list[dict] = []
    for name, directory in models:
        for c in names:
            try:
                rows.extend(measure(c, name, directory, args))
            except (RuntimeError, OSError, ValueError) as ex:
                print(f"[sliding] {c} on {name} failed: {ex}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR (a GGUF model)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--requests", type=int, default=8, help="timed prefix/slide requests")
    ap.add_argument("--cold", type=int, default=3, help="timed cold requests (slow)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slots", type=int, default=1, help="fastpilot --slots = --parallel")
    ap.add_argument("--cache-reuse", type=int, default=256, help="both servers' --cache-reuse")
    ap.add_argument("--kinds", default=",".join(KINDS), help="which of cold,prefix,slide")
    ap.add_argument("--json", type=Path, default=None, help="write all rows here")
    args = ap.parse_args()
    args.kinds = args.kinds.split(",")
    contenders = args.contenders.split(",")
    if not server_path().is_file():
        print("llama-server is not built: its rows are skipped", file=sys.stderr)
        contenders = [c for c in contenders if not c.startswith("llama-server")]
    rows: list[dict] = []
    for spec in args.model:
        name, _, directory = spec.partition("=")
        for c in contenders:
            rows.extend(measure(c, name, Path(directory), args))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
