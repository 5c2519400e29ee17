"""Write ``RESULTS.md`` and the PNG plots from one run's raw JSON.

Everything printed comes from the JSON of a single run; nothing is carried over from
an earlier run. ``python -m benchmarks.report RESULTS.json [OUT.md]`` re-renders.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from benchmarks.procs import DISTURBED
from benchmarks.stats import paired_ratio

__all__ = ["write_report", "targets"]

MB = 1e6
QUICK_NOTE = " (QUICK smoke run: small counts, not the reference numbers)"


def _f(x, nd: int = 1, scale: float = 1.0, unit: str = "") -> str:
    if x is None:
        return "–"
    return f"{x * scale:.{nd}f}{unit}"


def _ms(x) -> str:
    return _f(x, 0, 1000)


def _run(
    report: dict, name: str, backend: str | None, model: str, label: str | None
) -> dict | None:
    for r in report["runs"]:
        if (
            r["name"] == name
            and r["model"] == model
            and (backend is None or r["backend"] == backend)
        ):
            if label is None or r["label"] == label:
                return r
    return None


def _wl(run: dict | None, wl: str, key: str):
    if not run or "error" in run:
        return None
    return run["workloads"].get(wl, {}).get(key)


def _floor(report: dict, model: str, label: str) -> dict | None:
    for f in report["floors"]:
        if f["model"] == model and f["label"] == label and "error" not in f:
            return f
    return None


def _ratio(a, b):
    return a / b if a is not None and b else None


def _side_by_side(report: dict, model: str, fp: dict | None, ls: dict | None) -> dict | None:
    """The run's interleaved eight-client rounds of ``fp`` and ``ls`` on ``model``, if any."""
    if fp is None or ls is None:
        return None
    for sbs in report.get("clients_side_by_side", []):
        med = sbs.get("median", {})
        if sbs.get("model") == model and med.get(fp["key"]) and med.get(ls["key"]):
            return sbs  # type: ignore[no-any-return]
    return None


def targets(report: dict) -> list[dict]:
    """The issue's targets, each with the measured values, the ratio and whether it is met."""
    rows: list[dict] = []
    bw = report["bandwidth"]["read_gbs"] * 1e9

    def add(model, target, fp, peer, ratio, met, note=""):
        rows.append(
            {
                "model": model,
                "target": target,
                "fastpilot": fp,
                "peer": peer,
                "ratio": ratio,
                "met": met,
                "note": note,
            }
        )

    for model in report["plan"]["models"]:
        q4 = "gguf-q4_k_m"
        fpl = _run(report, "fastpilot", "llamacpp", model, q4)
        fpc = _run(report, "fastpilot", "ct2", model, "ct2-int8")
        ls = _run(report, "llama-server", None, model, q4)
        lcp = _run(report, "llama-cpp-python", None, model, q4)
        hf = _run(report, "transformers", None, model, None)
        for fp, tag in ((fpl, "fastpilot[llamacpp] q4_k_m"), (fpc, "fastpilot[ct2] int8")):
            if fp is None:
                continue
            a, b = _wl(fp, "typing", "e2e_p50"), _wl(ls, "typing", "e2e_p50")
            r = _ratio(a, b)
            add(
                model,
                f"one editor typing e2e p50 ≤ llama-server ({tag})",
                _ms(a) + " ms",
                _ms(b) + " ms",
                r,
                r is not None and r <= 1.0,
                f"TTFT cold {_ms(_wl(fp, 'typing', 'ttft_cold_p50'))} vs "
                f"{_ms(_wl(ls, 'typing', 'ttft_cold_p50'))} ms, cached p50 "
                f"{_ms(_wl(fp, 'typing', 'ttft_cached_p50'))} vs "
                f"{_ms(_wl(ls, 'typing', 'ttft_cached_p50'))} ms; decode "
                f"{_f(_wl(fp, 'decode', 'decode_tps_p50'))} vs "
                f"{_f(_wl(ls, 'decode', 'decode_tps_p50'))} tok/s",
            )
            c = _wl(fp, "typing", "ttft_cached_p50")
            add(
                model,
                f"TTFT p50 on cached-prefix requests ≤ 50 ms ({tag})",
                _ms(c) + " ms",
                "50 ms",
                _ratio(c, 0.05),
                c is not None and c <= 0.05,
                f"p95 {_ms(_wl(fp, 'typing', 'ttft_cached_p95'))} ms; llama-server p50 "
                f"{_ms(_wl(ls, 'typing', 'ttft_cached_p50'))} ms",
            )
            a, b = _wl(fp, "four_editors", "e2e_p50"), _wl(ls, "four_editors", "e2e_p50")
            cut = _wl(fp, "four_editors", "cut_short")
            r = _ratio(a, b)
            add(
                model,
                f"four editors e2e p50 ≤ llama-server, no stream cut short ({tag})",
                f"{_ms(a)} ms, {cut} cut short",
                _ms(b) + " ms",
                r,
                r is not None and r <= 1.0 and cut == 0,
                f"TTFT p50 {_ms(_wl(fp, 'four_editors', 'ttft_p50'))} vs "
                f"{_ms(_wl(ls, 'four_editors', 'ttft_p50'))} ms; requests "
                f"{_wl(fp, 'four_editors', 'n')} vs {_wl(ls, 'four_editors', 'n')}",
            )
            a, b = _wl(fp, "clients_8", "agg_tps"), _wl(ls, "clients_8", "agg_tps")
            sbs = _side_by_side(report, model, fp, ls)
            how = "median of the rounds"
            r = _ratio(a, b)
            if sbs is not None:  # the interleaved rounds, when the run has them
                ra, rb = sbs["rounds"][fp["key"]], sbs["rounds"][ls["key"]]
                a, b = sbs["median"][fp["key"]], sbs["median"][ls["key"]]
                r = paired_ratio(ra, rb)
                how = (
                    f"ratio: median of the per-round ratios of {len(ra)} interleaved rounds "
                    f"{ra} vs {rb} (ratio of the medians {_f(_ratio(a, b), 2)})"
                )
                if sbs.get("disturbed"):
                    n = len(sbs["disturbed"])
                    how += f"; {n} round(s) run again (other CPU > {DISTURBED:.0%})"
            add(
                model,
                f"eight clients tokens/s ≥ 1.0× llama-server ({tag})",
                _f(a) + " tok/s",
                _f(b) + " tok/s",
                r,
                r is not None and r >= 1.0,
                f"{how}; e2e p50 {_ms(_wl(fp, 'clients_8', 'e2e_p50'))} vs "
                f"{_ms(_wl(ls, 'clients_8', 'e2e_p50'))} ms; 4 clients "
                f"{_f(_wl(fp, 'clients_4', 'agg_tps'))} vs "
                f"{_f(_wl(ls, 'clients_4', 'agg_tps'))} tok/s; 8-client rounds "
                f"{_wl(fp, 'clients_8', 'agg_tps_rounds')} vs "
                f"{_wl(ls, 'clients_8', 'agg_tps_rounds')} (editor table, one server at a time)",
            )
            a, b = _wl(fp, "typing", "e2e_p50"), _wl(hf, "typing", "e2e_p50")
            r = _ratio(b, a)
            add(
                model,
                f"≥ 10× transformers baseline: typing e2e p50 speed-up ({tag})",
                _ms(a) + " ms",
                _ms(b) + " ms",
                r,
                r is not None and r >= 10,
            )
            a, b = _wl(fp, "decode", "decode_tps_p50"), _wl(hf, "decode", "decode_tps_p50")
            r = _ratio(a, b)
            add(
                model,
                f"≥ 10× transformers baseline: single-stream decode ({tag})",
                _f(a) + " tok/s",
                _f(b) + " tok/s",
                r,
                r is not None and r >= 10,
            )
        for label in ("gguf-q4_k_m", "gguf-q8_0", "ct2-int8"):
            backend = "ct2" if label.startswith("ct2") else "llamacpp"
            fp = _run(report, "fastpilot", backend, model, label)
            fl = _floor(report, model, label)
            a = _wl(fp, "decode", "decode_tps_p50")
            if fp is None:
                continue
            b = fl["decode_tps"] if fl else None
            r = _ratio(a, b)
            add(
                model,
                f"HTTP overhead: fastpilot decode ≥ 0.9× in-process library ({label})",
                _f(a) + " tok/s",
                _f(b) + " tok/s",
                r,
                r is not None and r >= 0.9,
                f"{(1 / a - 1 / b) * 1000:+.1f} ms per token vs the library" if a and b else "",
            )
            size = next(
                (
                    f["bytes"]
                    for f in report["files"]
                    if f["model"] == model and f["label"] == label
                ),
                None,
            )
            bound = bw / size if size else None
            r = _ratio(a, bound)
            add(
                model,
                f"decode ≥ 70% of bandwidth bound ({label})",
                _f(a) + " tok/s",
                _f(bound) + " tok/s",
                r,
                r is not None and r >= 0.7,
                f"library floor reaches {_f(_ratio(b, bound), 2)} of the bound" if b else "",
            )
        for fp, tag in ((fpl, "fastpilot[llamacpp] q4_k_m"), (fpc, "fastpilot[ct2] int8")):
            if fp is None or lcp is None:
                continue
            a, b = fp.get("peak_rss"), lcp.get("peak_rss")
            ok = a is not None and b is not None and a <= b + 50 * 2**20
            add(
                model,
                f"peak RSS ≤ llama-cpp-python server + 50 MB ({tag})",
                _f(a, 0, 1 / 2**20, " MiB"),
                _f(b, 0, 1 / 2**20, " MiB"),
                _ratio(a, b),
                ok,
                f"difference {_f((a - b) if a and b else None, 0, 1 / 2**20)} MiB",
            )
    return rows


def _plots(report: dict, out_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for model in report["plan"]["models"]:
        runs = [r for r in report["runs"] if r["model"] == model and "error" not in r]
        # Latency distributions: typing and four editors, one box per contender.
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for ax, wl, title in (
            (axes[0], "typing", "one editor typing"),
            (axes[1], "four_editors", "four editors"),
        ):
            data = [
                (r["key"].replace(f" {model}", ""), r["workloads"].get(wl, {}).get("raw_e2e"))
                for r in runs
            ]
            data = [(k, [x * 1000 for x in v]) for k, v in data if v]
            if data:
                ax.boxplot([v for _, v in data], orientation="horizontal", whis=(5, 95))
                ax.set_yticks(range(1, len(data) + 1), [k for k, _ in data], fontsize=7)
                ax.set_xscale("log")
            ax.set_xlabel("end-to-end latency per request, ms (log; whiskers p5–p95)")
            ax.set_title(f"{model}: {title}")
        fig.tight_layout()
        name = f"{stem}-{model}-latency.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)
        # Throughput vs concurrency.
        fig, ax = plt.subplots(figsize=(7, 5))
        for r in runs:
            pts = []
            d = r["workloads"].get("decode")
            if d and d.get("decode_tps_p50"):
                pts.append((1, d["decode_tps_p50"]))
            for k, v in r["workloads"].items():
                if k.startswith("clients_") and v.get("agg_tps"):
                    pts.append((int(k.split("_")[1]), v["agg_tps"]))
            if len(pts) > 1:
                pts.sort()
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    label=r["key"].replace(f" {model}", ""),
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (1 = single-stream decode rate)")
        ax.set_ylabel("aggregate completion tokens/s")
        ax.set_title(f"{model}: throughput vs concurrency")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{stem}-{model}-throughput.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _machine_line(report: dict) -> str:
    m = report["machine"]
    v = m["versions"]
    return (
        f"{m['cpu']} ({m['cpu_flags']}), {m['cores']} cores, {m['ram_gib']} GiB RAM, Linux "
        f"{m['kernel']}, "
        f"Python {m['python']}; llama-cpp-python {v['llama_cpp_python']} (llama-server built from "
        "its "
        f"vendored llama.cpp), ctranslate2 {v['ctranslate2']}, torch {v['torch']}, transformers "
        f"{v['transformers']}, numpy {v['numpy']}, waitress {v['waitress']}, falcon {v['falcon']}"
    )


def _workload_table(report: dict, model: str) -> list[str]:
    head = (
        "| contender | file | decode tok/s | typing e2e p50 / p95 ms | typing TTFT cold / cached "
        "p50 / p95 ms "
        "| typing tok/req | 4 editors e2e p50 / p95 ms | 4 ed. TTFT p50 / p95 ms | 4 ed. cut short "
        "| 8 clients tok/s | 8 cl. e2e p50 / p95 ms | GET 64 e2e p50 ms | peak RSS MiB | start s "
        "| other CPU % |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in report["runs"]:
        if r["model"] != model:
            continue
        if "error" in r:
            lines.append(
                f"| {r['name']}[{r['backend']}] | {r['label']} | failed: {r['error'][:120]!r} |"
            )
            continue
        w = r["workloads"]

        def g(wl, k, w=w):
            return w.get(wl, {}).get(k)

        lines.append(
            f"| {r['name']}[{r['backend']}] | {r['label']} | {_f(g('decode', 'decode_tps_p50'))} "
            f"| {_ms(g('typing', 'e2e_p50'))} / {_ms(g('typing', 'e2e_p95'))} "
            f"| {_ms(g('typing', 'ttft_cold_p50'))} / {_ms(g('typing', 'ttft_cached_p50'))} / "
            f"{_ms(g('typing', 'ttft_cached_p95'))} | {_f(g('typing', 'tokens_per_request'))} "
            f"| {_ms(g('four_editors', 'e2e_p50'))} / {_ms(g('four_editors', 'e2e_p95'))} "
            f"| {_ms(g('four_editors', 'ttft_p50'))} / {_ms(g('four_editors', 'ttft_p95'))} "
            f"| {_f(g('four_editors', 'cut_short'), 0)} "
            f"| {_f(g('clients_8', 'agg_tps'))} | {_ms(g('clients_8', 'e2e_p50'))} / "
            f"{_ms(g('clients_8', 'e2e_p95'))} "
            f"| {_ms(g('browser', 'e2e_p50'))} | {_f(r.get('peak_rss'), 0, 1 / 2**20)} | "
            f"{_f(r.get('startup_s'))} | {_f(r.get('foreign_cpu_share'), 0, 100)} |"
        )
    return lines


def _bandwidth_table(report: dict) -> list[str]:
    bw = report["bandwidth"]["read_gbs"] * 1e9
    lines = [
        "| model | file | size MB | bound tok/s (BW/size) | library floor tok/s | floor / bound "
        "| fastpilot tok/s | fastpilot / bound | llama-server tok/s | floor TTFT ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in report["files"]:
        bound = bw / f["bytes"]
        fl = _floor(report, f["model"], f["label"])
        backend = "ct2" if f["label"].startswith("ct2") else "llamacpp"
        fp = _wl(
            _run(report, "fastpilot", backend, f["model"], f["label"]), "decode", "decode_tps_p50"
        )
        ls = _wl(
            _run(report, "llama-server", None, f["model"], f["label"]), "decode", "decode_tps_p50"
        )
        fdec = fl["decode_tps"] if fl else None
        lines.append(
            f"| {f['model']} | {f['label']} | {f['bytes'] / MB:.0f} | {bound:.1f} | {_f(fdec)} "
            f"| {_f(_ratio(fdec, bound), 2)} | {_f(fp)} | {_f(_ratio(fp, bound), 2)} | {_f(ls)} "
            f"| {_ms(fl['ttft']) if fl else '–'} |"
        )
    return lines


def write_report(report: dict, json_path: Path, md_path: Path) -> None:
    """Render ``report`` (one run) to ``md_path`` with plots next to the JSON."""
    out_dir = json_path.parent
    pngs = _plots(report, out_dir, json_path.stem)
    rel = lambda p: os.path.relpath(Path(p).resolve(), md_path.parent.resolve())  # noqa: E731
    bw = report["bandwidth"]
    real = {f["model"]: f["real"] for f in report["files"]}
    L = [
        "# fastpilot benchmarks",
        "",
        "Run "
        f"`{report['stamp']}`{QUICK_NOTE if report['quick'] else ''}, "
        f"{report['elapsed_s'] / 60:.1f} min. All numbers below come from this one run: same "
        "model files, same "
        f"machine, {report['threads']} threads for every contender, loopback HTTP; the "
        "editor workloads one server at a time, the speculative, eight-client side-by-side and "
        "cold-prefill measurements with their servers up together and the rounds interleaved.",
        "",
        f"- Command: `{report['command']}` (from the repository root, venv active; `make bench` "
        "runs it)",
        f"- Machine: {_machine_line(report)}",
        f"- Memory bandwidth (numpy, {bw['array_mib']} MiB arrays): read {bw['read_gbs']:.1f} GB/s "
        f"(1 thread {bw['read_gbs_1thread']:.1f}, {bw['threads']} threads "
        f"{bw['read_gbs_threads']:.1f}), "
        f"copy {bw['copy_gbs']:.1f} GB/s (read+write)",
        f"- Raw results: [`{rel(json_path)}`]({rel(json_path)})",
        "",
        "## Models",
        "",
    ]
    for model, is_real in real.items():
        L.append(
            f"- **{model}**: "
            + (
                "real checkpoint from the local HF cache."
                if is_real
                else "RANDOM weights with the real model's exact shapes (same FLOPs and bytes "
                "per token; the text is "
                "noise). Tokenizer: GPT-2-sized byte-level BPE (50,257 tokens) trained offline on "
                "the Python "
                "stdlib, since no model hub is reachable here."
            )
        )
    L += ["", "| model | file | bytes | path |", "|---|---|---|---|"]
    L += [
        f"| {f['model']} | {f['label']} | {f['bytes']:,} | `{f['path']}` |" for f in report["files"]
    ]
    L += [
        "",
        "Generated lengths are forced (fastpilot and llama-server `ignore_eos`, llama-cpp-python "
        "server "
        "`min_tokens = max_tokens`, transformers `min_new_tokens`); greedy decoding everywhere. "
        "Editor "
        "requests keep the plugin's `stop: [newline]`, so their length depends on the text "
        "each model "
        "writes (tokens/request is shown).",
        "",
        "## Targets",
        "",
        "| model | target | fastpilot | peer / bound | ratio | met | measured context |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in targets(report):
        L.append(
            f"| {t['model']} | {t['target']} | {t['fastpilot']} | {t['peer']} | "
            f"{_f(t['ratio'], 2)} "
            f"| {'yes' if t['met'] else '**no**'} | {t['note']} |"
        )
    L += ["", "## Decode speed against the memory-bandwidth bound", ""]
    L += [
        "Single-stream decode reads all weights once per token, so tokens/s ≤ read bandwidth / "
        "file size. "
        "(For CodeGen the input embedding is only gathered, one row per token, so the true bound "
        "is a little "
        "higher than this file-size bound.) Floors run the library in-process: llama.cpp one "
        "`llama_decode` per "
        "token with numpy argmax; CTranslate2 `generate_batch` greedy with a per-step callback.",
        "",
        *_bandwidth_table(report),
        "",
    ]
    for model in report["plan"]["models"]:
        s = report.get("sessions", {}).get(model, {})
        L += [
            f"## Workloads: {model}",
            "",
            f"Editor prompts start at {s.get('start_tokens')} tokens of real stdlib source "
            f"({', '.join(s.get('files', []))}), `# Path:` header, 2–6 characters typed between "
            "requests, "
            "max_tokens 32, stream. 8 clients: distinct short prompts, 128 tokens each, streamed, "
            "three rounds, the median round shown (the 8-client target row lists all three). "
            "GET 64: non-streamed (fastpilot: GET with a query string; peers: POST). Decode "
            "tok/s: (tokens−1)/"
            "(e2e−TTFT) of a 128-token stream, median of the repetitions.",
            "",
            *_workload_table(report, model),
            "",
        ]
        for p in pngs:
            if f"-{model}-" in p:
                L.append(f"![{p}]({rel(out_dir / p)})")
        L.append("")
    if report.get("speculative"):
        from benchmarks.speculative import ratios, table

        L += [
            "## Speculative decoding (n-gram), 1 and 8 clients",
            "",
            "`benchmarks/speculative.py`: 160 tokens greedy, streamed, one client and 8 "
            "(8 slots), prompts are chunks of the stdlib's `ast.py`; decode tok/s = "
            "(tokens−1)/(e2e−TTFT), median (range) of the repeats; drafted tokens from "
            "fastpilot's /metrics and llama-server's log; decode steps / tokens evaluated: "
            "fastpilot's /metrics, summed over the repeats.",
            "",
            table(report["speculative"]),
            "",
            "Ratios, each the median of the per-round ratios (the two servers of a round ran "
            "back to back):",
            "",
        ]
        L += [f"- {line}" for line in ratios(report["speculative"])] + [""]
    if report.get("overhead"):
        from benchmarks.overhead import table as overhead_table

        L += [
            "## Per-token overhead by layer, single stream",
            "",
            "`benchmarks/overhead.py`: 160 tokens greedy after a chunk of `ast.py`; the floor "
            "is `llama_decode` + argmax in a ctypes loop on the backend's own context; HTTP "
            "rows are differential (160-token minus 1-token request); µs/token over the "
            "floor is each layer's overhead.",
            "",
            overhead_table(report["overhead"]),
            "",
        ]
    if report.get("kernels", {}).get("table"):
        L += [
            "## llama.cpp context settings and cold prefill",
            "",
            "`benchmarks/kernels.py`: decode and prefill of each context setting in process "
            "(best of the rounds), then a cold ~916-token prompt and a short one over HTTP "
            "(medians), fastpilot with the old settings and its defaults against "
            "llama-server's defaults; the calibration's choice is fastpilot's /v1/models report.",
            "",
            report["kernels"]["table"],
            "",
        ]
    if report.get("sliding"):
        from benchmarks.sliding import table as sliding_table

        L += [
            "## Prompt cache when the window slides",
            "",
            "`benchmarks/sliding.py`: one-token completions of token-id prompts from the "
            "stdlib's `typing.py`, one slot; cold = a fresh window at the context limit, "
            "prefix = the last prompt plus a line, slide = the window at the limit moved down "
            "a line. ms: median (range); evaluated: prompt tokens minus `cached_tokens`. "
            "`-prefix` rows: `--cache-reuse 0` (fastpilot) / no `--cache-reuse` (llama-server).",
            "",
            sliding_table(report["sliding"]),
            "",
        ]
    if report["notes"]:
        L += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    L += [
        "## Method",
        "",
        "- Servers start one at a time in their own process group; peak RSS is the max over 50 ms "
        "samples "
        "of the summed VmRSS of the server's process tree, from launch to the end of its "
        "workloads.",
        '- "other CPU %" is the share of all cores used by processes that are neither the '
        "server nor the harness while that contender ran (from /proc/stat), hypervisor steal "
        "time included (a VM's neighbours show up here); above a few percent "
        "the machine was shared and that row is pessimistic.",
        "- Each workload is bounded by a request count and a time cap checked before each new "
        "request; "
        "requests in flight always finish (the harness never cuts a stream).",
        '- "Cut short" counts responses that were not 200, carried an error event, or ended '
        "without "
        "`finish_reason` and `[DONE]`.",
        f"- fastpilot `--slots {report['slots']}` and llama-server `--parallel {report['slots']}` "
        "`--cont-batching --cache-prompt --no-kv-unified -c n_ctx×slots`; llama-cpp-python server "
        "`--n_ctx n_ctx --interrupt_requests False` (one sequence, requests serialized by its "
        "lock; its default interrupts the stream in flight on each new request); transformers "
        "baseline: "
        "`benchmarks/hf_server.py`, float32, one request at a time, no prefix cache.",
        "",
    ]
    L += _hand_written(report)
    md_path.write_text("\n".join(L) + "\n", encoding="utf-8")


ANALYSIS = Path(__file__).resolve().parent / "ANALYSIS.md"


def _hand_written(report: dict) -> list[str]:
    """``benchmarks/ANALYSIS.md`` (profiles, fixes, verdicts, GPU) carried into every report.

    The analysis is written by people about a particular run; a regenerated report keeps
    it verbatim under a heading that says which run this report is, so a reader can tell
    when the prose and the tables above it come from different runs.
    """
    if not ANALYSIS.is_file():
        return []
    text = ANALYSIS.read_text(encoding="utf-8").strip()
    return [
        f"<!-- carried verbatim from benchmarks/ANALYSIS.md; the tables above are run "
        f"{report['stamp']} -->",
        "",
        text,
        "",
    ]


if __name__ == "__main__":
    jp = Path(sys.argv[1])
    write_report(
        json.loads(jp.read_text()),
        jp,
        Path(sys.argv[2]) if len(sys.argv) > 2 else jp.with_suffix(".md"),
    )
