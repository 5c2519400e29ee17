"""llama.cpp context settings and cold prefill: each setting's cost, fastpilot vs llama-server.

``python -m benchmarks.kernels [--model DIR] [--threads T] [--repeats R] [--json OUT]``
(default model: the GPT-2-117M-shaped Q4_K_M file of ``benchmarks/models.py``'s cache)
prints one JSON line per measurement and two tables. Two parts, back to back:

* **settings** (in-process, no HTTP; :func:`fastpilot.backends.llamacpp_probe.probe`):
  for each variant -- flash attention off/on, ``n_ubatch`` 256/512, KV f16/q8_0 --
  single-token decode tok/s with a 16-token KV and after a ``--deep``-token prefill
  (default 700), and prefill ms per prompt token. Variants interleave round by round
  (``--repeats``), so a busy machine slows them alike; the best round is reported.
* **cold prefill** (HTTP, streamed, greedy): a ``--prompt-tokens`` prompt (default
  916, a distinct text every round, the same for every server; each server has its own
  cache, so it is cold in each) with 32 tokens forced, and a short prompt with 64: time
  to first token, then decode tok/s, for

  - ``fastpilot-before``: the settings before this change (``--flash-attn off
    --ubatch 260 --prefill-batch 256``: flash off on CPU, n_ubatch = the batch
    capacity, 256-token prefill chunks);
  - ``fastpilot``: the defaults (flash attention calibrated at load, n_ubatch 512,
    1024-token chunks for a prompt alone); its ``/v1/models`` ``kernels`` object --
    the calibration's choice and evidence -- goes into the output;
  - ``llama-server``: its defaults (n_batch 2048, n_ubatch 512, flash auto), the
    same threads and slots (skipped when it is not built).

The servers are up at once, with the same ``--threads`` and 4 slots, and the rounds are
interleaved (one request of each in turn, the order rotated per round). Run one after
another, with a prompt set each, the cold prompt read 1.26x llama-server's TTFT in run
20261127-153631; interleaved on shared prompts right after, 1.05 and 1.07. Ratios are
against llama-server's medians in the same run; the cold prompt's also paired (in
parentheses: the median of the per-round ratios, both servers on the same prompt in the same
round), which is what a machine-wide slow stretch moves least. Run standalone, or as the ``kernels``
section of ``python -m benchmarks.run``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import statistics
import sys
from pathlib import Path

from benchmarks.client import Call, send
from benchmarks.contenders import fastpilot_serve_argv, llama_server_argv
from benchmarks.llama_server_build import server_path
from benchmarks.models import CACHE
from benchmarks.procs import REDO_ROUNDS, CpuWatch, Managed, Redo, free_port, rotated
from benchmarks.speculative import SOURCE, _body
from benchmarks.stats import paired_ratio

DEFAULT_MODEL = CACHE / "models" / "gpt2-117m-gguf-q4_k_m"
SLOTS = 4
BEFORE = ("--flash-attn", "off", "--ubatch", str(256 + SLOTS), "--prefill-batch", "256")
SERVERS = ("fastpilot-before", "fastpilot", "llama-server")
# (flash attention, n_ubatch, KV type) of the settings part.
VARIANTS = (
    (False, 512, "f16"),
    (True, 512, "f16"),
    (False, 256, "f16"),
    (True, 256, "f16"),
    (True, 512, "q8_0"),
)


def settings_part(gguf: Path, threads: int, deep: int, repeats: int) -> list[dict]:
    """Best of ``repeats`` interleaved rounds per variant (the least disturbed one)."""
    from fastpilot.backends.llamacpp_native import load_library
    from fastpilot.backends.llamacpp_probe import probe

    lib = load_library()
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = lib.llama_model_load_from_file(str(gguf).encode(), mp)
    best: dict[tuple, dict] = {}
    try:
        for rep in range(repeats):
            for fa, ub, kv in VARIANTS:
                p = probe(
                    lib,
                    model,
                    flash_attn=fa,
                    n_ubatch=ub,
                    threads=threads,
                    threads_batch=threads,
                    deep=deep,
                    steps=8,
                    kv_type=kv,
                    seed=rep,
                ).to_json()
                row = {
                    "part": "settings",
                    **p,
                    "round": rep,
                    "short_tok_s": round(1000 / float(p["short_ms"]), 1),
                    "deep_tok_s": round(1000 / float(p["deep_ms"]), 1),
                }
                print(json.dumps(row), flush=True)
                key = (fa, ub, kv)
                old = best.get(key)
                if old is None:
                    best[key] = row
                else:  # best of rounds, per column
                    for col in ("short_tok_s", "deep_tok_s"):
                        old[col] = max(old[col], row[col])
                    col = "prefill_ms_per_token"
                    old[col] = min(old[col], row[col])
    finally:
        lib.llama_model_free(model)
    return list(best.values())


def prompt_texts(gguf: Path, count: int, n_tokens: int) -> list[str]:
    """``count`` distinct stdlib code chunks of about ``n_tokens`` tokens each (whole lines,
    counted with the model's own tokenizer), consecutive from ``ast.py`` on."""
    import ctypes

    from fastpilot.backends.llamacpp_native import load_library

    lib = load_library()
    mp = lib.llama_model_default_params()
    mp.vocab_only = True
    model = lib.llama_model_load_from_file(str(gguf).encode(), mp)
    vocab = lib.llama_model_get_vocab(model)
    buf = (ctypes.c_int32 * (4 * n_tokens + 64))()

    def count_tokens(text: str) -> int:
        b = text.encode()
        return int(lib.llama_tokenize(vocab, b, len(b), buf, len(buf), False, False))

    files = [SOURCE, *sorted(p for p in SOURCE.parent.glob("a*.py") if p != SOURCE)]
    lines = [ln for f in files for ln in f.read_text(encoding="utf-8").splitlines(True)]
    out, cur = [], ""
    try:
        for line in lines:
            # The whole text is counted: BPE merges across line ends ("\n" + indent).
            if cur and count_tokens(cur + line) > n_tokens:
                out.append(cur)
                cur = ""
                if len(out) == count:
                    return out
            cur += line
    finally:
        lib.llama_model_free(model)
    raise ValueError("not enough stdlib text for the prompts")


def _argv(server: str, directory: Path, port: int, threads: int) -> list[str]:
    if server.startswith("fastpilot"):
        argv = fastpilot_serve_argv(directory, port, threads, SLOTS)
        return argv + (list(BEFORE) if server == "fastpilot-before" else [])
    ctx = json.loads((directory / "fastpilot.json").read_text()).get("context_length", 1024)
    return llama_server_argv(directory, port, threads, SLOTS, ctx) + ["-a", "m"]


def _json(port: int, method: str, path: str, body: dict | None = None) -> dict:
    """One plain JSON request to 127.0.0.1:port; the decoded body (raises on errors)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"{method} {path}: {resp.status} {out}")
        return out
    finally:
        conn.close()


def _kernels(port: int) -> dict:
    """fastpilot's report of the context settings (``/v1/models``'s ``kernels``)."""
    return _json(port, "GET", "/v1/models")["data"][0]["kernels"]


def _count(port: int, text: str) -> int:
    """Prompt tokens by fastpilot's ``/v1/tokenize`` (the model's own tokenizer)."""
    return int(_json(port, "POST", "/v1/tokenize", {"model": "m", "prompt": text})["count"])


def servers_part(
    servers: list[str], directory: Path, threads: int, repeats: int, texts: list[str]
) -> list[dict]:
    """Every server up at once, each warmed up untimed on ``texts[0]``; then ``repeats``
    rounds, each sending every server (in turn, the order rotated per round) the round's
    cold long prompt ``texts[1 + round]`` and a short one. Each server has its own prompt
    cache, so a prompt is cold in each; the same prompts for all, and a slow stretch of a
    shared machine lands on every server alike. A round in which some server's share of
    other CPU passed ``procs.DISTURBED`` is run again on the next prompt (at most
    ``procs.REDO_ROUNDS`` times), its rows marked ``disturbed`` and left out of the
    tables. A server that does not start, or fails a request, is dropped (stderr says why)."""
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        live: dict[str, int] = {}
        pids: dict[str, int] = {}
        for server in servers:
            port = free_port()
            log = Path(f"/tmp/kernels-bench-{server}.log")
            try:
                proc = stack.enter_context(Managed(_argv(server, directory, port, threads), log))
                proc.wait_http(port, "/health", 300)
                send(port, Call("POST", "/v1/completions", _body(texts[0], 4), True))  # warm-up
            except (RuntimeError, OSError) as ex:
                print(f"[kernels] {server} failed: {ex}", file=sys.stderr, flush=True)
                continue
            live[server], pids[server] = port, proc.pid
        redo, rep, fresh = Redo(), 0, iter(texts[1:])
        while rep < repeats:
            text, got = next(fresh), []
            for server in rotated(list(live), rep):
                try:
                    with CpuWatch(pids[server]) as watch:
                        part = _cold_and_short(server, live[server], rep, text)
                        watch.stop()
                except (RuntimeError, OSError) as ex:
                    print(f"[kernels] {server} failed: {ex}", file=sys.stderr, flush=True)
                    del live[server]
                    continue
                for row in part:
                    row["other_cpu"] = watch.foreign_share and round(watch.foreign_share, 3)
                got += part
            rows += got
            if redo.again(r["other_cpu"] for r in got):
                # someone else had the machine: the round again, on a fresh prompt
                for r in got:
                    r["disturbed"] = True
                continue
            rep += 1
        for server, port in live.items():
            if server.startswith("fastpilot"):
                rows.append({"part": "kernels", "server": server, "kernels": _kernels(port)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def _cold_and_short(server: str, port: int, rep: int, text_long: str) -> list[dict]:
    rows = []
    fastpilot = server.startswith("fastpilot")
    for kind, text, tokens in (
        ("cold-long", text_long, 32),
        ("short", f"# {rep}\nimport os\n", 64),
    ):
        r = send(port, Call("POST", "/v1/completions", _body(text, tokens), True))
        if not r.ok or r.ttft is None or r.tokens != tokens:
            raise RuntimeError(f"{server}: bad result {r.status} {r.error}")
        row = {
            "part": "server",
            "server": server,
            "kind": kind,
            "round": rep,
            "prompt_chars": len(text),
            "prompt_tokens": _count(port, text) if fastpilot else None,
            "ttft_ms": round(1000 * r.ttft, 1),
            "decode_tok_s": round((tokens - 1) / (r.e2e - r.ttft), 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def cold_ratio(servers: list[dict], server: str) -> float | None:
    """``server``'s cold long-prompt TTFT over llama-server's, the median of the per-round
    ratios (both got the same prompt in the same round; see ``stats.paired_ratio``)."""

    def ttfts(name: str) -> list[float | None]:
        by_round = {
            r["round"]: r["ttft_ms"]
            for r in servers
            if r.get("server") == name and r.get("kind") == "cold-long" and not r.get("disturbed")
        }
        return [by_round.get(i) for i in range(max(by_round, default=-1) + 1)]

    return paired_ratio(ttfts(server), ttfts("llama-server"))


def tables(settings: list[dict], servers: list[dict]) -> str:
    out = [
        "| flash | n_ubatch | KV | decode tok/s, 16 cells | decode tok/s, deep "
        "| prefill ms/token |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in settings:
        out.append(
            f"| {r['flash_attn']} | {r['n_ubatch']} | {r['kv_type']} | {r['short_tok_s']} "
            f"| {r['deep_tok_s']} (at {r['deep']}) | {r['prefill_ms_per_token']} |"
        )
    med: dict[tuple[str, str], tuple[float, float]] = {}
    for s in SERVERS:
        for kind in ("cold-long", "short"):
            rs = [
                r
                for r in servers
                if r.get("server") == s and r.get("kind") == kind and not r.get("disturbed")
            ]
            if rs:
                med[s, kind] = (
                    statistics.median(r["ttft_ms"] for r in rs),
                    statistics.median(r["decode_tok_s"] for r in rs),
                )
    out += [
        "",
        "| server | cold long prompt TTFT ms | x llama-server (paired) | decode tok/s after it "
        "| short-prompt decode tok/s | x llama-server |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    ref_long, ref_short = med.get(("llama-server", "cold-long")), med.get(("llama-server", "short"))
    for s in SERVERS:
        if (s, "cold-long") not in med:
            continue
        (ttft, dec), (_, short) = med[s, "cold-long"], med[s, "short"]
        paired = cold_ratio(servers, s)
        x1 = "-"
        if ref_long:
            x1 = f"{ttft / ref_long[0]:.2f}" + (f" ({paired:.2f})" if paired else "")
        x2 = f"{short / ref_short[1]:.2f}" if ref_short else "-"
        out.append(f"| {s} | {ttft:.0f} | {x1} | {dec:.1f} | {short:.1f} | {x2} |")
    for r in servers:
        if r.get("part") == "kernels":
            k = r["kernels"]
            out.append(
                f"\n{r['server']} kernels: flash_attn {k['flash_attn']} "
                f"({k['source']['flash_attn']}), n_ubatch {k['n_ubatch']}, n_batch "
                f"{k['n_batch']}; calibration: {json.dumps(k.get('calibration', {}))}"
            )
    return "\n".join(out)


def section(directory: Path, threads: int, repeats: int = 3, llama_server: bool = True) -> dict:
    """Both parts for ``python -m benchmarks.run`` (its ``kernels`` section)."""
    args = argparse.Namespace(
        model=directory,
        threads=threads,
        repeats=repeats,
        deep=700,
        prompt_tokens=916,
        servers=",".join(s for s in SERVERS if llama_server or s != "llama-server"),
    )
    return run(args)


def run(args: argparse.Namespace) -> dict:
    directory = Path(args.model)
    settings = settings_part(directory / "model.gguf", args.threads, args.deep, args.repeats)
    count = 1 + args.repeats + REDO_ROUNDS  # a warm-up, the rounds, rounds run again
    texts = prompt_texts(directory / "model.gguf", count, args.prompt_tokens)
    names = args.servers.split(",")
    if "llama-server" in names and not server_path().is_file():
        print("[kernels] llama-server is not built: skipped", file=sys.stderr)
        names.remove("llama-server")
    servers = servers_part(names, directory, args.threads, args.repeats, texts)
    report = {"settings": settings, "servers": servers, "threads": args.threads}
    report["table"] = tables(settings, servers)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a converted GGUF dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--deep", type=int, default=700, help="KV depth of the deep decode probe")
    ap.add_argument("--prompt-tokens", type=int, default=916, help="long prompt length")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    args = ap.parse_args()
    report = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    print(report["table"])


if __name__ == "__main__":
    main()
