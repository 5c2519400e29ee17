"""Does n-gram speculation pay? fastpilot and llama-server, speculation off and on.

``python -m benchmarks.speculative [--models tiny-py,gpt2-117m,codegen-350m]
[--model NAME=DIR ...] [--clients 1,8]`` prints one JSON line per run, a table and the
ratios the issue's targets are stated in. ``--models`` names tiny-py (``make
convert``'s ``models/tiny-py/gguf-q4_k_m``) and the random-weight GPT-2-117M- and
CodeGen-350M-shaped Q4_K_M files of :mod:`benchmarks.models` (built when missing);
``--model`` adds any GGUF directory. Every contender's server is up at once and the
rounds are interleaved (one round of each in turn, the order rotated per round),
single-stream (``--clients 1``) or N concurrent streams:

* ``fastpilot-off``: ``fastpilot serve --speculative off``;
* ``fastpilot-ngram``: ``fastpilot serve --speculative ngram`` (the default) with its
  default ``--draft-max``, or ``--draft-max D`` when ``--draft-max`` is given;
  ``fastpilot-ngram@D`` runs ``--draft-max D`` (several can be compared in one run);
* ``llama-server``: llama.cpp's own server, built by :mod:`benchmarks.llama_server_build`;
* ``llama-server-ngram-mod``: the same with ``--spec-type ngram-mod`` and its default
  draft sizes (skipped when its ``--help`` does not list ``ngram-mod``).

Workload: greedy, streamed, ``--tokens`` tokens forced (``ignore_eos``). Prompts are real
code: consecutive ~``--prompt-chars`` chunks of the stdlib's ``ast.py`` (held out of
tiny-py's training set, so not memorized), cut at line ends, a different chunk for
every request (the untimed warm-up gets its own), so a drafter only ever sees its own
prompt and output. Same prompts, threads and slot count (fastpilot ``--slots`` =
llama-server ``--parallel`` = clients) for every contender.

Reported per run: decode tokens/s after the first token ((tokens - 1) / (end - first
token)), aggregate tokens/s over the wall time for N clients, and the drafted tokens
the target model accepted/rejected (fastpilot: ``/metrics`` deltas of the backend's
``draft_tokens_accepted``/``_rejected``; llama-server: its log's per-request ``draft acceptance``
lines), and fastpilot's decode work, the ``decode_steps`` / ``tokens_evaluated`` deltas
(at 8 clients the streams draft together or not at all, so this shows how much of the
work speculation took off -- or that it drafted nothing and on and off did the same
work, where the rounds' timings are too noisy to show it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import re
import statistics
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.client import Call, Result, send
from benchmarks.contenders import fastpilot_serve_argv, llama_server_argv
from benchmarks.llama_server_build import server_path
from benchmarks.procs import (
    DISTURBED,
    REDO_MAX,
    REDO_ROUNDS,
    SETTLE_QUIET,
    CpuWatch,
    Managed,
    Redo,
    free_port,
    rotated,
    settle,
)
from benchmarks.stats import paired_ratio

CONTENDERS = ("fastpilot-off", "fastpilot-ngram", "llama-server", "llama-server-ngram-mod")
# The issue-12 models: tiny-py (trained on code: real acceptance) and the random-weight files.
MODELS = ("tiny-py", "gpt2-117m", "codegen-350m")
TINY_PY = Path(__file__).resolve().parent.parent / "models" / "tiny-py" / "gguf-q4_k_m"
# Held out of tiny-py's training set (conversion/tiny_py/MODEL_CARD.md): not memorized.
SOURCE = Path(sysconfig.get_paths()["stdlib"]) / "ast.py"


@dataclass(frozen=True, slots=True)
class Run:
    """One measured round: every client's result and the server's draft counters (and,
    for fastpilot, its ``llama_decode`` calls and the tokens they evaluated)."""

    results: tuple[Result, ...]
    wall: float
    accepted: int | None
    rejected: int | None
    decode_steps: int | None = None
    tokens_evaluated: int | None = None


def prompts(count: int, chars: int, source: Path = SOURCE) -> list[str]:
    """``count`` consecutive chunks of ``source``, each about ``chars`` long, cut at lines.

    Skips the module docstring and imports (the first 200 lines) so every chunk is code.
    """
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)[200:]
    out, cur = [], ""
    for line in lines:
        cur += line
        if len(cur) >= chars:
            out.append(cur)
            cur = ""
            if len(out) == count:
                return out
    raise ValueError(f"{source} holds fewer than {count} chunks of {chars} chars")


def _metrics(port: int) -> dict[str, float]:
    """All ``fastpilot_model_*`` gauges of the (single) served model."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("fastpilot_model_"):
            out[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


# fastpilot's cumulative counters a round reads the change of (``/metrics``).
COUNTERS = ("draft_tokens_accepted", "draft_tokens_rejected", "decode_steps", "tokens_evaluated")


def _counters(port: int) -> list[float]:
    m = _metrics(port)  # exact names: prompt_tokens_evaluated also ends in tokens_evaluated
    return [m.get("fastpilot_model_backend_" + c, 0.0) for c in COUNTERS]


def llama_server_supports_ngram_mod() -> bool:
    """True when the built llama-server's ``--help`` lists the ``ngram-mod`` spec type."""
    import subprocess

    exe = server_path()
    if not exe.is_file():
        return False
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    return "ngram-mod" in out.stdout + out.stderr


def _argv(contender: str, directory: Path, port: int, args: argparse.Namespace, n: int):
    if contender.startswith("fastpilot"):
        argv = fastpilot_serve_argv(directory, port, args.threads, n)
        if contender.startswith("fastpilot-ngram"):
            argv += ["--speculative", "ngram"]
            draft_max = contender.partition("@")[2] or args.draft_max
            if draft_max:
                argv += ["--draft-max", str(draft_max)]
        else:
            argv += ["--speculative", "off"]
        return argv
    ctx = json.loads((directory / "fastpilot.json").read_text()).get("context_length", 2048)
    argv = llama_server_argv(directory, port, args.threads, n, ctx)
    if contender == "llama-server-ngram-mod":
        # Its own defaults (this release removed --draft-max; ngram-mod drafts 48-64 tokens
        # after a 24-token match): what a user of llama-server's ngram-mod runs.
        argv += ["--spec-type", "ngram-mod"]
    return argv


def _body(prompt: str, tokens: int) -> dict:
    return {
        "model": "m",
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _round(port: int, texts: list[str], tokens: int, fastpilot: bool) -> Run:
    results: list[Result | None] = [None] * len(texts)

    def one(i: int) -> None:
        results[i] = send(port, Call("POST", "/v1/completions", _body(texts[i], tokens), True))

    before = _counters(port) if fastpilot else None
    t0 = time.perf_counter()
    ths = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    wall = time.perf_counter() - t0
    deltas: list[int | None] = [None] * len(COUNTERS)
    if before is not None:
        deltas = [int(a - b) for a, b in zip(_counters(port), before, strict=True)]
    for r in results:
        if r is None or not r.ok or r.tokens != tokens:
            raise RuntimeError(f"bad result: {r}")
    return Run(tuple(r for r in results if r is not None), wall, *deltas)


_LLAMA_ACC = re.compile(r"draft acceptance = [0-9.]+ \(\s*(\d+) accepted /\s*(\d+) generated")


def _llama_log_counts(log: Path) -> list[tuple[int, int]]:
    """(accepted, drafted) per request, from llama-server's log lines."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [(int(a), int(g)) for a, g in _LLAMA_ACC.findall(text)]


def measure(
    contender: str, name: str, directory: Path, args: argparse.Namespace, n: int
) -> list[dict]:
    """One contender alone: :func:`measure_interleaved` with a list of one."""
    return measure_interleaved([contender], name, directory, args, n)


def measure_interleaved(
    contenders: list[str], name: str, directory: Path, args: argparse.Namespace, n: int
) -> list[dict]:
    """Start every contender's server, warm each up, then run ``args.repeats`` rounds of
    ``n`` clients, each round visiting every server in turn (the order rotated per
    round): a slow minute of a shared machine then hits every contender alike, where one
    contender's block of rounds after another's would take it alone. Before round 0 the
    harness waits while the hypervisor withholds CPU (:func:`~benchmarks.procs.settle`;
    the probes go into every row as ``settle``). A round in which
    some contender's share of other CPU passed :data:`DISTURBED` is run again, every
    contender, on fresh prompts (:func:`~benchmarks.procs.may_redo`: twice, or for short
    rounds as many times as fit in a minute); its rows stay in the
    output marked ``disturbed`` and out of :func:`table` and :func:`ratios`. A server
    that does not start, or a round that fails, drops that contender (the error goes to
    stderr). Rows come back grouped by contender."""
    for spare in range(REDO_MAX, REDO_ROUNDS - 1, -1):  # prompt sets for rounds run again
        try:  # as many as the source holds
            texts = prompts(1 + (args.repeats + spare) * n, args.prompt_chars)
            break
        except ValueError:
            if spare == REDO_ROUNDS:
                raise
    rows: dict[str, list[dict]] = {c: [] for c in contenders}
    with contextlib.ExitStack() as stack:
        live: dict[str, tuple[int, Path, int]] = {}
        for c in contenders:
            port = free_port()
            log = Path(f"/tmp/speculative-{c}-{name}-{n}.log")
            try:
                server = stack.enter_context(Managed(_argv(c, directory, port, args, n), log))
                server.wait_http(port, "/health", 180)
                _round(port, texts[:1], args.tokens, False)  # untimed: pages the weights in
            except (RuntimeError, OSError) as ex:
                print(f"[speculative] {c} on {name} failed: {ex}", file=sys.stderr, flush=True)
                continue
            live[c] = (port, log, server.pid)
        chunks = (texts[1 + k * n : 1 + (k + 1) * n] for k in range(args.repeats + spare))
        settled = settle()  # the servers are up and idle: wait out any steal first
        print(f"[speculative] {name} {n} client(s): steal probes {settled}", flush=True)
        redo, rep = Redo(spare), 0
        while rep < args.repeats:
            chunk, done, t0 = next(chunks), [], time.monotonic()
            for c in rotated(list(live), rep):
                port, log, pid = live[c]
                try:
                    row = _one_round(c, name, port, log, pid, chunk, args.tokens, n, rep)
                except (RuntimeError, OSError) as ex:
                    print(f"[speculative] {c} on {name} failed: {ex}", file=sys.stderr, flush=True)
                    del live[c]
                    continue
                rows[c].append(row)
                done.append(row)
                print(json.dumps(row), flush=True)
            if redo.again((r["other_cpu"] for r in done), time.monotonic() - t0):
                for r in done:
                    r["disturbed"] = True
                continue  # the same round again, on the next prompts
            rep += 1
    for r in (r for c in contenders for r in rows[c]):
        r["settle"] = settled
    return [r for c in contenders for r in rows[c]]


def clean(rows: list[dict]) -> list[dict]:
    """The rows of rounds that were not run again (see :func:`measure_interleaved`)."""
    return [r for r in rows if not r.get("disturbed")]


def _one_round(
    contender: str,
    name: str,
    port: int,
    log: Path,
    pid: int,
    chunk: list[str],
    tokens: int,
    n: int,
    rep: int,
) -> dict:
    seen = len(_llama_log_counts(log))
    with CpuWatch(pid) as watch:
        run = _round(port, chunk, tokens, contender.startswith("fastpilot"))
        watch.stop()  # while the server runs: its CPU is still readable
    if contender == "llama-server-ngram-mod":
        # A request that drafted nothing prints no line: count this round's lines.
        time.sleep(0.2)  # the line is written as the slot is released
        mine = _llama_log_counts(log)[seen:]
        acc, gen = sum(a for a, _ in mine), sum(g for _, g in mine)
        run = replace(run, accepted=acc, rejected=gen - acc)
    decode = [(r.tokens - 1) / (r.e2e - r.ttft) for r in run.results if r.ttft is not None]
    return {
        "contender": contender,
        "model": name,
        "clients": n,
        "repeat": rep,
        "tokens": tokens,
        # None when no event carried text (a random model's ids past its tokenizer).
        "decode_tok_s": round(statistics.median(decode), 1) if decode else None,
        "aggregate_tok_s": round(n * tokens / run.wall, 1),
        "ttft_ms": round(1000 * statistics.median(r.ttft or 0 for r in run.results), 1),
        "accepted": run.accepted,
        "rejected": run.rejected,
        # The decode work (fastpilot only): equal on and off when nothing was drafted.
        "decode_steps": run.decode_steps,
        "tokens_evaluated": run.tokens_evaluated,
        # Share of all cores that neither this server nor the harness used during the
        # round (benchmarks.procs.CpuWatch; hypervisor steal included): a slow round
        # with a high share was the machine, not the contender.
        "other_cpu": None if watch.foreign_share is None else round(watch.foreign_share, 3),
        "steal": None if watch.steal_share is None else round(watch.steal_share, 3),
        "irq": None if watch.irq_share is None else round(watch.irq_share, 3),
        "top_other": None if watch.top is None else [watch.top[0], round(watch.top[1], 3)],
        # Greedy output must not depend on speculation: compare across contenders.
        "text_sha": hashlib.sha256("".join(r.text for r in run.results).encode()).hexdigest()[:12],
    }


def table(rows: list[dict]) -> str:
    """A markdown table: median and range over the repeats per (model, clients, contender)."""
    keys: dict[tuple, list[dict]] = {}
    for r in clean(rows):
        keys.setdefault((r["model"], r["clients"], r["contender"]), []).append(r)
    out = [
        "| model | clients | contender | decode tok/s median (range) | aggregate tok/s "
        "median | accepted / drafted | acceptance | decode steps / tokens evaluated "
        "| other CPU % max (steal; irq, top other process) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (model, n, c), rs in keys.items():
        d = [r["decode_tok_s"] for r in rs if r["decode_tok_s"] is not None] or [float("nan")]
        agg = statistics.median(r["aggregate_tok_s"] for r in rs)
        acc = [r["accepted"] for r in rs if r["accepted"] is not None]
        rej = [r["rejected"] for r in rs if r["rejected"] is not None]
        if acc and rej and sum(acc) + sum(rej):
            drafted = sum(acc) + sum(rej)
            ad, rate = f"{sum(acc)} / {drafted}", f"{sum(acc) / drafted:.0%}"
        else:
            ad = rate = "-"
        steps = [r.get("decode_steps") for r in rs]
        evaluated = [r.get("tokens_evaluated") for r in rs]
        work = "-"
        if None not in steps and None not in evaluated:  # summed over the rounds
            work = f"{sum(steps)} / {sum(evaluated)}"
        # The round with the most, how much of it was hypervisor steal and, above 3 %,
        # interrupts and the busiest other process (older runs' rows lack some of these).
        other = [r for r in rs if r.get("other_cpu") is not None]
        busy = "-"
        if other:
            worst = max(other, key=lambda r: r["other_cpu"])
            busy = f"{100 * worst['other_cpu']:.0f}"
            if worst.get("steal") is not None:
                busy += f" ({100 * worst['steal']:.0f})"
            top = worst.get("top_other")
            if top is not None and worst["other_cpu"] >= 0.03:  # say what it was
                busy += f"; irq {100 * worst['irq']:.0f}, {top[0]} {100 * top[1]:.0f}"
        out.append(
            f"| {model} | {n} | {c} | {statistics.median(d):.1f} ({min(d):.1f}-{max(d):.1f}) "
            f"| {agg:.1f} | {ad} | {rate} | {work} | {busy} |"
        )
    redone: dict[tuple, set[int]] = {}
    for r in rows:
        if r.get("disturbed"):
            redone.setdefault((r["model"], r["clients"]), set()).add(r["repeat"])
    if redone:
        said = ", ".join(f"{m} {n} client(s) round {sorted(k)}" for (m, n), k in redone.items())
        out += ["", f"Run again (some contender's other CPU > {DISTURBED:.0%}): {said}."]
    waits = {(r["model"], r["clients"]): r["settle"] for r in rows if r.get("settle")}
    waited = [
        f"{m} {n} client(s) {w['seconds']:.0f} s (steal under load "
        + ", ".join(f"{100 * p:.0f} %" for p in w["probes"])
        + ")"
        for (m, n), w in waits.items()
        if w["probes"][0] > SETTLE_QUIET  # settle probes again only after such a reading
    ]
    if waited:
        out += ["", "Waited for the hypervisor's steal to pass before: " + "; ".join(waited) + "."]
    return "\n".join(out)


def section(
    models: list[tuple[str, Path]],
    threads: int,
    llama_server: bool,
    repeats: int = 3,
    clients: tuple[int, ...] = (1, 8),
) -> list[dict]:
    """The rows for ``python -m benchmarks.run`` (its ``speculative`` section).

    ``llama_server``: include the llama-server rows (plain, and ``ngram-mod`` when this
    build has it). Every contender runs single-stream and with 8 clients (the
    8-client gate: speculation must not cost throughput). A contender that fails is
    left out; the error goes to stderr.
    """
    args = argparse.Namespace(
        threads=threads, tokens=160, repeats=repeats, draft_max=None, prompt_chars=600
    )
    names = list(CONTENDERS[:2])
    if llama_server:
        names.append("llama-server")
        if llama_server_supports_ngram_mod():
            names.append("llama-server-ngram-mod")
    rows: list[dict] = []
    for name, directory in models:
        for n in clients:
            rows.extend(measure_interleaved(names, name, directory, args, n))
    return rows


def ratios(rows: list[dict]) -> list[str]:
    """The issue-12 ratios of one run, one line each: the median of the per-round
    ratios (:func:`benchmarks.stats.paired_ratio`; the two contenders of a round ran
    back to back), which cancels a slow stretch of the machine that hits both."""
    by_round: dict[tuple, dict[int, float | None]] = {}
    for r in clean(rows):
        k = (r["model"], r["clients"], r["contender"])
        by_round.setdefault(k + ("decode",), {})[r["repeat"]] = r["decode_tok_s"]
        by_round.setdefault(k + ("aggregate",), {})[r["repeat"]] = r["aggregate_tok_s"]
    out = []
    pairs = (
        (1, "decode", "fastpilot-ngram", "llama-server-ngram-mod"),
        (1, "decode", "fastpilot-off", "llama-server"),
        (1, "decode", "fastpilot-ngram", "fastpilot-off"),
        (1, "decode", "llama-server-ngram-mod", "llama-server"),
        (1, "aggregate", "fastpilot-ngram", "llama-server-ngram-mod"),
        (8, "aggregate", "fastpilot-ngram", "fastpilot-off"),
        (8, "aggregate", "fastpilot-ngram", "llama-server"),
    )
    variants = [c for c in dict.fromkeys(r["contender"] for r in rows) if "ngram@" in c]
    for model in dict.fromkeys(r["model"] for r in rows):
        for n, what, a, b in pairs:
            # fastpilot-ngram@D variants are compared like fastpilot-ngram.
            for a2 in [a] + (variants if a == "fastpilot-ngram" else []):
                x, y = by_round.get((model, n, a2, what)), by_round.get((model, n, b, what))
                if not x or not y:
                    continue
                reps = sorted(set(x) & set(y))
                ratio = paired_ratio([x[i] for i in reps], [y[i] for i in reps])
                if ratio is not None:
                    out.append(f"{model} {n} client(s) {what}: {a2} / {b} = {ratio:.2f}")
    return out


def resolve(names: list[str], tiny_py: Path = TINY_PY) -> list[tuple[str, Path]]:
    """(name, GGUF directory) for tiny-py and the :mod:`benchmarks.models` names
    (building missing random-weight files); tiny-py is skipped with a note when
    ``make convert`` has not made it."""
    from benchmarks.models import prepare

    out: list[tuple[str, Path]] = []
    for name in names:
        if name == "tiny-py":
            if (tiny_py / "model.gguf").is_file():
                out.append((name, tiny_py))
            else:
                print(f"tiny-py skipped: {tiny_py} missing (make convert)", file=sys.stderr)
            continue
        logs = Path("/tmp/speculative-build-logs")
        logs.mkdir(exist_ok=True)
        out += [(f.model, f.directory) for f in prepare([name], ["gguf-q4_k_m"], logs)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated: tiny-py and benchmarks.models names ('' for none)",
    )
    ap.add_argument("--model", action="append", default=[], help="NAME=DIR (any GGUF model)")
    ap.add_argument("--tiny-py", type=Path, default=TINY_PY, help="tiny-py's Q4_K_M directory")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--draft-max", type=int, default=None, help="default: fastpilot's own")
    ap.add_argument("--prompt-chars", type=int, default=600)
    ap.add_argument("--json", type=Path, default=None, help="write all rows here")
    args = ap.parse_args()
    contenders = args.contenders.split(",")
    if "llama-server-ngram-mod" in contenders and not llama_server_supports_ngram_mod():
        print("llama-server has no --spec-type ngram-mod (or is not built): skipped")
        contenders.remove("llama-server-ngram-mod")
    if not server_path().is_file():
        contenders = [c for c in contenders if not c.startswith("llama-server")]
    models = resolve([m for m in args.models.split(",") if m], args.tiny_py)
    models += [(n, Path(d)) for n, _, d in (m.partition("=") for m in args.model)]
    rows: list[dict] = []
    for name, directory in models:
        for n in (int(x) for x in args.clients.split(",")):
            rows.extend(measure_interleaved(contenders, name, Path(directory), args, n))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print("\n".join(ratios(rows)))


if __name__ == "__main__":
    main()
