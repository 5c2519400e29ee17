"""``python -m benchmarks.run`` (``make bench``): fastpilot against its peers, in one run.

One invocation measures everything that the report compares, on the same model files,
the same machine and the same thread count: memory bandwidth, in-process library floors,
then for each model every HTTP contender through the same workloads, one server at a
time; then the sections whose ratios are a few per cent (speculation, eight clients side
by side, cold prefill) with their servers up together and the rounds interleaved, so a
slow stretch of a shared machine lands on every contender alike. It writes
``benchmarks/results/<stamp>.json`` (raw), ``benchmarks/results/*.png`` and
``benchmarks/RESULTS.md``.

Every server runs in its own process group and is killed when its turn ends, on error,
and on Ctrl-C. ``--quick`` is a few-minute smoke run (GPT-2 shape only, small counts).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import contenders as C
from benchmarks import workloads as W
from benchmarks.llama_server_build import ensure_llama_server
from benchmarks.machine import bandwidth, machine_info
from benchmarks.models import FORMATS, SPECS, ModelFile, prepare
from benchmarks.procs import (
    CpuWatch,
    Managed,
    Redo,
    RssSampler,
    kill_all,
    rotated,
)
from benchmarks.stats import summarize

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class Plan:
    """Counts and caps of one run. Caps are checked before each new request."""

    models: tuple[str, ...]
    formats: tuple[str, ...]
    decode_tokens: int
    decode_reps: int
    typing_requests: int
    typing_cap_s: float
    editors_requests: int
    editors_cap_s: float
    client_levels: tuple[int, ...]
    client_tokens: int
    client_rounds: int  # rounds per client level; the median round (by tok/s) is reported
    browser_requests: int
    browser_tokens: int
    hf_typing_requests: int
    hf_editors_requests: int
    secondary_full: bool  # run all workloads on non-primary files too (else decode + 8 clients)


FULL = Plan(
    models=("gpt2-117m", "codegen-350m"),
    formats=tuple(f[2] for f in FORMATS),
    decode_tokens=128,
    decode_reps=2,
    typing_requests=20,
    typing_cap_s=40,
    editors_requests=8,
    editors_cap_s=50,
    client_levels=(4, 8),
    client_tokens=128,
    client_rounds=3,
    browser_requests=3,
    browser_tokens=64,
    hf_typing_requests=4,
    hf_editors_requests=1,
    secondary_full=False,
)
QUICK = Plan(
    models=("gpt2-117m",),
    formats=("gguf-q4_k_m", "ct2-int8"),
    decode_tokens=32,
    decode_reps=1,
    typing_requests=4,
    typing_cap_s=15,
    editors_requests=2,
    editors_cap_s=15,
    client_levels=(8,),
    client_tokens=32,
    client_rounds=1,
    browser_requests=2,
    browser_tokens=64,
    hf_typing_requests=2,
    hf_editors_requests=1,
    secondary_full=False,
)
PRIMARY = ("gguf-q4_k_m", "ct2-int8")  # files that get every workload on every server


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- floors


def run_floor(mf: ModelFile, threads: int, plan: Plan, work: Path) -> dict:
    """One in-process floor in a subprocess; returns its timings (or the error)."""
    kind = "ct2" if mf.fmt == "ct2" else "llama"
    prompt = work / "decode_prompt.txt"
    prompt.write_text(W.DECODE_PROMPT, encoding="utf-8")
    argv = [
        sys.executable,
        "-m",
        "benchmarks.floors",
        kind,
        "--model",
        str(mf.weights),
        "--prompt-file",
        str(prompt),
        "--threads",
        str(threads),
        "--tokens",
        str(plan.decode_tokens),
        "--reps",
        str(plan.decode_reps + 1),
        "--n-ctx",
        str(SPECS[mf.model].n_ctx),
    ]
    p = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    with RssSampler(p.pid) as rss, CpuWatch(None) as cpu:
        try:
            out, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            out, err = p.communicate()
    rec = {
        "kind": kind,
        "model": mf.model,
        "label": mf.label,
        "peak_rss": rss.peak,
        "foreign_cpu_share": cpu.foreign_share,
    }
    if p.returncode != 0:
        rec["error"] = err.decode(errors="replace")[-1500:]
        return rec
    reps = json.loads(out.decode().strip().splitlines()[-1])["reps"][1:]  # first rep = warm-up
    ttfts = [r["times"][0] for r in reps]
    rates = [
        (len(r["times"]) - 1) / (r["times"][-1] - r["times"][0])
        for r in reps
        if len(r["times"]) > 1
    ]
    rec.update(
        ttft=min(ttfts), decode_tps=max(rates), decode_tps_all=rates, tokens=len(reps[0]["times"])
    )
    return rec


# --------------------------------------------------------------------------- servers


def run_server(c: C.Contender, plan: Plan, sessions: dict, log_dir: Path, full: bool) -> dict:
    """Start one server, run the workloads against it, stop it; never leaves it running."""
    rec: dict = {
        "key": c.key,
        "name": c.name,
        "backend": c.backend,
        "model": c.model,
        "label": c.label,
        "argv": list(c.argv),
        "workloads": {},
    }
    hf = c.name == "transformers"
    c = c.with_fresh_port()
    srv = None
    try:
        srv = c.launch(log_dir)
        with RssSampler(srv.pid) as rss, CpuWatch(srv.pid) as cpu:
            t0 = time.perf_counter()
            srv.wait_http(c.port, c.health, c.startup_timeout)
            rec["startup_s"] = time.perf_counter() - t0
            log(f"{c.key}: up in {rec['startup_s']:.1f}s")
            wl = rec["workloads"]
            wl["decode"] = summarize(
                W.decode_probe(c.call, c.port, plan.decode_tokens, plan.decode_reps)
            )
            log(f"{c.key}: decode {wl['decode']['decode_tps_p50']}")
            if full:
                n_typ = plan.hf_typing_requests if hf else plan.typing_requests
                n_ed = plan.hf_editors_requests if hf else plan.editors_requests
                one = [_cut(s, n_typ) for s in sessions["one"]]
                four = [_cut(s, n_ed) for s in sessions["four"]]
                wl["typing"] = summarize(W.editors(c.call, c.port, one, plan.typing_cap_s))
                log(f"{c.key}: typing e2e p50 {wl['typing']['e2e_p50']}")
                wl["four_editors"] = summarize(W.editors(c.call, c.port, four, plan.editors_cap_s))
                log(f"{c.key}: four editors e2e p50 {wl['four_editors']['e2e_p50']}")
            levels = plan.client_levels if full and not hf else (8,)
            for k in levels:
                # One round of k requests is ~10 s: on a shared VM a single round swings by
                # +-30 %, so each level runs client_rounds rounds and reports the median one.
                rounds = [
                    summarize(W.clients(c.call, c.port, k, plan.client_tokens, 1, 0))
                    for _ in range(1 if hf else plan.client_rounds)
                ]
                rounds.sort(key=lambda r: r["agg_tps"] or 0.0)
                wl[f"clients_{k}"] = dict(
                    rounds[len(rounds) // 2],
                    agg_tps_rounds=[r["agg_tps"] and round(r["agg_tps"], 1) for r in rounds],
                )
                log(f"{c.key}: {k} clients {wl[f'clients_{k}']['agg_tps_rounds']}")
            if full:
                wl["browser"] = summarize(
                    W.browser(c.call, c.port, plan.browser_requests, plan.browser_tokens, 60),
                    streamed=False,
                )
            cpu.stop()
        rec["peak_rss"] = rss.peak
        rec["foreign_cpu_share"] = cpu.foreign_share
        rec["loadavg_end"] = os.getloadavg()
        rec["alive_at_end"] = srv.alive()
    except Exception as ex:  # noqa: BLE001 - one contender failing must not end the run
        rec["error"] = f"{type(ex).__name__}: {ex}"[-3000:]
        log(f"{c.key}: FAILED {rec['error'][:300]}")
    finally:
        if srv is not None:
            srv.stop()
    return rec


def clients_side_by_side(
    contenders: list[C.Contender], plan: Plan, log_dir: Path, k: int = 8, rounds: int = 5
) -> dict:
    """``k`` clients against every contender's server, all up at once, the rounds
    interleaved (one round of each in turn, the order rotated per round).

    The editor table runs each server's rounds in its own block, minutes apart from the
    other's; on a shared VM a slow stretch then lands on one contender alone and moves
    the ratio by more than the difference being measured. Here a slow stretch hits both.
    With two servers and an even ``rounds`` each goes first equally often, and the
    report takes the median of the per-round ratios (:func:`paired_ratio`), which
    cancels what a round's slow stretch does to both. A round in which either server's
    share of other CPU (:class:`~benchmarks.procs.CpuWatch`: hypervisor steal, mostly)
    passed :data:`~benchmarks.procs.DISTURBED` is run again (at most
    :data:`~benchmarks.procs.REDO_ROUNDS` times); its figures go to ``disturbed``.
    The servers idle while the other one runs: neither llama.cpp nor fastpilot spins
    between requests.
    """
    out: dict = {"clients": k, "rounds": {}, "median": {}, "other_cpu": {}}
    live: list[tuple[C.Contender, Managed]] = []
    try:
        for c in contenders:
            c = c.with_fresh_port()
            srv = c.launch(log_dir)
            live.append((c, srv))
            srv.wait_http(c.port, c.health, c.startup_timeout)
            W.clients(c.call, c.port, 2, 16, 1, 0)  # untimed: pages the weights in
        redo, r = Redo(), 0
        while r < rounds:
            measured: dict[str, tuple[float | None, float | None]] = {}
            for c, srv in rotated(live, r):
                with CpuWatch(srv.pid) as watch:
                    res = W.clients(c.call, c.port, k, plan.client_tokens, 1, 0)
                    watch.stop()
                agg = summarize(res)["agg_tps"]
                measured[c.key] = (agg and round(agg, 1), watch.foreign_share)
            if redo.again(other for _, other in measured.values()):
                # someone else had the machine: the round again, rows kept aside
                out.setdefault("disturbed", []).append(measured)
                continue
            for key, (agg, other) in measured.items():
                out["rounds"].setdefault(key, []).append(agg)
                out["other_cpu"].setdefault(key, []).append(other and round(other, 3))
            r += 1
    except Exception as ex:  # noqa: BLE001 - recorded; the run goes on
        out["error"] = f"{type(ex).__name__}: {ex}"[-2000:]
        log(f"side-by-side clients: FAILED {out['error'][:300]}")
    finally:
        for _, srv in live:
            srv.stop()
    for key, vals in out["rounds"].items():
        got = sorted(v for v in vals if v)
        out["median"][key] = got[len(got) // 2] if got else None
    return out


def _overhead_models() -> list[tuple[str, Path]]:
    from benchmarks.overhead import default_models

    return default_models()


def _have(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def _cut(s: W.TypingSession, n: int) -> W.TypingSession:
    return W.TypingSession(s.path, s.header, s.text, s.window_start, s.cursor0, s.steps[:n])


def build_sessions(mf: ModelFile, plan: Plan) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(mf.hf_dir / "tokenizer.json"))

    def count(text: str) -> int:
        return len(tok.encode(text).ids)

    # The plugin's budget is ~1500 tokens; a model with a shorter context gets what fits
    # beside the 32 completion tokens, minus room for the characters typed in the session.
    n_ctx = SPECS[mf.model].n_ctx
    start = min(1500, n_ctx - 32 - 16) - 3 * plan.typing_requests
    n = max(plan.typing_requests, plan.editors_requests)
    return {
        "start_tokens": start,
        "one": W.typing_sessions(1, n, start, count, seed=1),
        "four": W.typing_sessions(4, n, start, count, seed=2),
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "--quick", action="store_true", help="few-minute smoke run (GPT-2 shape, small counts)"
    )
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count() or 2, help="threads for every contender"
    )
    ap.add_argument(
        "--slots", type=int, default=4, help="fastpilot --slots = llama-server --parallel"
    )
    ap.add_argument("--models", default=None, help=f"comma list of {sorted(SPECS)}")
    ap.add_argument(
        "--contenders",
        default=(
            "floors,fastpilot,llama-server,llama-cpp-python,transformers,speculative,"
            "overhead,kernels,sliding"
        ),
    )
    ap.add_argument("--formats", default=None, help="comma list of files, e.g. gguf-q4_k_m")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument(
        "--rebuild-models", action="store_true", help="rebuild cached checkpoints and conversions"
    )
    ap.add_argument(
        "--no-build-llama-server", action="store_true", help="skip llama-server if not built"
    )
    ap.add_argument(
        "--budget", type=float, default=1800, help="seconds; later contenders are skipped past it"
    )
    args = ap.parse_args(argv)

    def _term(signum, frame):  # SIGTERM must run the finally blocks that kill our servers
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _term)
    plan = QUICK if args.quick else FULL
    if args.models:
        plan = Plan(**{**asdict(plan), "models": tuple(args.models.split(","))})
    if args.formats:
        plan = Plan(**{**asdict(plan), "formats": tuple(args.formats.split(","))})
    want = set(args.contenders.split(","))
    t_start = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    work = args.out / "logs" / stamp
    work.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        shlex.quote(a)
        for a in ["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)]
    )
    report: dict = {
        "stamp": stamp,
        "command": command,
        "quick": args.quick,
        "threads": args.threads,
        "slots": args.slots,
        "plan": asdict(plan),
        "notes": [],
        "floors": [],
        "runs": [],
    }
    try:
        report["machine"] = machine_info()
        log("measuring memory bandwidth")
        report["bandwidth"] = bandwidth(args.threads)
        log(f"bandwidth {report['bandwidth']}")
        files = prepare(list(plan.models), list(plan.formats), work, rebuild=args.rebuild_models)
        report["files"] = [
            {
                "model": f.model,
                "label": f.label,
                "path": str(f.weights),
                "bytes": f.bytes,
                "real": f.real,
                "hf_dir": str(f.hf_dir),
            }
            for f in files
        ]
        server_bin = None
        if want & {"llama-server"}:
            if args.no_build_llama_server:
                from benchmarks.llama_server_build import server_path

                server_bin = server_path() if server_path().is_file() else None
                note = "not built (--no-build-llama-server)"
            else:
                server_bin, note = ensure_llama_server(work / "llama-server-build.log")
            report["llama_server"] = {"path": str(server_bin) if server_bin else None, "note": note}
            if server_bin is None:
                report["notes"].append(f"llama-server skipped: {note}")
        lcp_mods = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
        lcp_ok = _have(*lcp_mods)
        if "llama-cpp-python" in want and not lcp_ok:
            report["notes"].append(
                "llama-cpp-python server skipped: its [server] extra is missing; install it "
                "without rebuilding: pip install fastapi uvicorn sse-starlette "
                "'starlette-context<0.4' pydantic-settings PyYAML"
            )
        # Items: (server contender | model file for its in-process floor, full, sessions).
        # A file's floor runs right before fastpilot on that file, so that the HTTP-overhead
        # ratio compares measurements taken minutes apart, not half an hour apart.
        queue: list[tuple[C.Contender | ModelFile, bool, dict]] = []
        for model in plan.models:
            mfs = {f.label: f for f in files if f.model == model}
            if not mfs:
                report["notes"].append(f"{model}: no converted files; skipped")
                continue
            sessions = build_sessions(next(iter(mfs.values())), plan)
            report.setdefault("sessions", {})[model] = {
                "start_tokens": sessions["start_tokens"],
                "files": [s.path for s in sessions["four"]],
            }
            n_ctx = SPECS[model].n_ctx
            for label, mf in mfs.items():
                full = label in PRIMARY or plan.secondary_full
                if "floors" in want:
                    queue.append((mf, full, sessions))
                if "fastpilot" in want:
                    queue.append((C.fastpilot(mf, args.threads, args.slots), full, sessions))
                if mf.fmt == "gguf" and server_bin is not None:
                    ls = C.llama_server(server_bin, mf, args.threads, args.slots, n_ctx)
                    queue.append((ls, full, sessions))
                if mf.fmt == "gguf" and label in PRIMARY and "llama-cpp-python" in want and lcp_ok:
                    queue.append((C.llama_cpp_python(mf, args.threads, n_ctx), full, sessions))
            if "transformers" in want and not _have("torch", "transformers"):
                report["notes"].append("transformers baseline skipped: torch/transformers missing")
            elif "transformers" in want:
                hf_dir = next(iter(mfs.values())).hf_dir
                queue.append((C.hf_baseline(hf_dir, model, args.threads), True, sessions))
        # Primary files (every workload) of every model before the decode-only secondaries,
        # so that a run that hits --budget loses the least important rows.
        queue.sort(key=lambda q: not q[1])

        def run_speculative() -> None:
            """n-gram speculation off/on, fastpilot and llama-server, 1 and 8 clients."""
            if time.monotonic() - t_start > args.budget:
                report["notes"].append(f"speculative: skipped, budget of {args.budget:.0f}s spent")
                report["speculative"] = []  # asked once only
                return
            from benchmarks.speculative import section

            spec = [(f.model, f.directory) for f in files if f.label == "gguf-q4_k_m"]
            tiny = HERE.parent / "models" / "tiny-py" / "gguf-q4_k_m"  # `make convert` output
            if (tiny / "model.gguf").is_file():
                spec.append(("tiny-py", tiny))
            log("--- speculative (1 and 8 clients)")
            # Five rounds: the paired median then stands when two rounds are disturbed
            # (run 20261128-042538 had two in one row: benchmarks/ANALYSIS.md).
            reps = 1 if args.quick else 5
            report["speculative"] = section(spec, args.threads, server_bin is not None, reps)

        def run_sliding() -> None:
            """Cold / prefix-hit / slid-window TTFT on the rotary (CodeGen) Q4_K_M files."""
            if time.monotonic() - t_start > args.budget:
                report["notes"].append(f"sliding: skipped, budget of {args.budget:.0f}s spent")
                return
            from benchmarks.sliding import section as sliding_section

            # GPT-2's absolute positions cannot shift: only the rotary models' files.
            slid = [
                (f.model, f.directory)
                for f in files
                if SPECS[f.model].arch != "gpt2" and f.label == "gguf-q4_k_m"
            ]
            log("--- sliding window (prompt cache)")
            reqs = 3 if args.quick else 6
            report["sliding"] = sliding_section(slid, args.threads, server_bin is not None, reqs)

        for c, full, sessions in queue:
            # Right after the primary files' rows, before the decode-only secondaries.
            if not full and "speculative" in want and "speculative" not in report:
                run_speculative()
            if isinstance(c, ModelFile):
                log(f"--- floor {c.model} {c.label}")
                report["floors"].append(run_floor(c, args.threads, plan, work))
                fl = report["floors"][-1]
                log(f"floor -> {fl.get('decode_tps', fl.get('error'))}")
                continue
            if time.monotonic() - t_start > args.budget:
                report["notes"].append(f"{c.key}: skipped, run budget of {args.budget:.0f}s spent")
                continue
            log(f"--- {c.key} ({'all workloads' if full else 'decode + 8 clients'})")
            report["runs"].append(run_server(c, plan, sessions, work, full))
        if "speculative" in want and "speculative" not in report:
            run_speculative()
        if {"fastpilot", "llama-server"} <= want and server_bin is not None:
            # The eight-client target's ratio, from interleaved rounds (see the function).
            for model in plan.models:
                pair = [
                    c
                    for c, full, _ in queue
                    if isinstance(c, C.Contender)
                    and full
                    and c.model == model
                    and c.label == "gguf-q4_k_m"
                    and c.name in ("fastpilot", "llama-server")
                ]
                if len(pair) != 2 or time.monotonic() - t_start > args.budget:
                    continue
                log(f"--- {model}: 8 clients, fastpilot and llama-server side by side")
                sbs = clients_side_by_side(pair, plan, work, rounds=2 if args.quick else 10)
                sbs["model"] = model
                report.setdefault("clients_side_by_side", []).append(sbs)
                log(f"{model}: side by side {sbs['rounds']}")
        if "overhead" in want and time.monotonic() - t_start <= args.budget:
            # Per-token cost of each layer over llama_decode (benchmarks/overhead.py).
            from benchmarks.overhead import section as overhead

            log("--- overhead (floor, backend, engine, HTTP, llama-server), single stream")
            files_ = [(f.model, f.directory) for f in files if f.label == "gguf-q4_k_m"]
            files_ += [m for m in _overhead_models() if m[0] == "tiny-py"]
            report["overhead"] = overhead(files_, args.threads, server_bin is not None)
        elif "overhead" in want:
            report["notes"].append(f"overhead: skipped, budget of {args.budget:.0f}s spent")
        gpt2 = [f for f in files if f.model == "gpt2-117m" and f.label == "gguf-q4_k_m"]
        if "kernels" in want and gpt2 and time.monotonic() - t_start > args.budget:
            report["notes"].append(f"kernels: skipped, budget of {args.budget:.0f}s spent")
        elif "kernels" in want and gpt2:
            from benchmarks.kernels import section as kernels_section

            log("--- kernels (context settings, cold prefill)")
            reps = 1 if args.quick else 9
            report["kernels"] = kernels_section(
                gpt2[0].directory, args.threads, reps, server_bin is not None
            )
        if "sliding" in want:
            run_sliding()
    except KeyboardInterrupt:
        report["notes"].append("interrupted")
        raise
    finally:
        kill_all()
        report["elapsed_s"] = time.monotonic() - t_start
        args.out.mkdir(parents=True, exist_ok=True)
        jpath = args.out / f"{stamp}.json"
        jpath.write_text(json.dumps(report, indent=1, default=str))
        log(f"raw results: {jpath}")
    from benchmarks.report import write_report

    md = args.results_md if not args.quick else args.out / f"{stamp}.md"
    write_report(report, jpath, md)
    log(f"report: {md} ({report['elapsed_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
