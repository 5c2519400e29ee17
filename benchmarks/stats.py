"""Turn raw request results into the numbers the report prints (percentiles, rates, counts)."""

from __future__ import annotations

import statistics

import numpy as np

from benchmarks.client import Result
from benchmarks.workloads import Outcome

__all__ = ["decode_rate", "paired_ratio", "pct", "summarize"]


def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no data."""
    return float(np.percentile(xs, q)) if xs else None


def paired_ratio(a: list[float | None], b: list[float | None]) -> float | None:
    """Median of ``a[i] / b[i]`` over the rounds both measured (round ``i`` of two
    contenders run back to back), None when none did.

    Machine-wide slow stretches on a shared VM last longer than one round and move
    both contenders of a round alike; the per-round ratio cancels them where a ratio
    of the two medians (possibly from different rounds) does not.
    """
    ratios = [x / y for x, y in zip(a, b, strict=False) if x and y]
    return statistics.median(ratios) if ratios else None


def decode_rate(r: Result) -> float | None:
    """Tokens/s after the first token of one streamed request: (tokens - 1) / (e2e - ttft)."""
    if r.ttft is None or r.tokens < 2 or r.e2e <= r.ttft:
        return None
    return (r.tokens - 1) / (r.e2e - r.ttft)


def _cut_short(r: Result, streamed: bool) -> bool:
    """A response that did not end properly: non-200, error event, no [DONE]/finish_reason."""
    if not r.ok or r.error:
        return True
    return streamed and not (r.done and r.finish_reason)


def summarize(out: Outcome, streamed: bool = True) -> dict:
    """Percentiles of TTFT / end-to-end latency, token counts and throughput of one workload.

    ``cached`` figures cover requests tagged "cached" (editor requests after the first
    of a session: their prompt extends the previous one by a few characters).
    """
    res = out.results
    ok = [r for r in res if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    e2e = [r.e2e for r in ok]
    cached_ttft = [
        r.ttft
        for r, t in zip(res, out.tags, strict=True)
        if r.ok and t == "cached" and r.ttft is not None
    ]
    cold_ttft = [
        r.ttft
        for r, t in zip(res, out.tags, strict=True)
        if r.ok and t == "cold" and r.ttft is not None
    ]
    rates = [x for x in (decode_rate(r) for r in ok) if x is not None]
    tokens = sum(r.tokens for r in ok)
    return {
        "n": len(res),
        "n_ok": len(ok),
        "cut_short": sum(_cut_short(r, streamed) for r in res),
        "errors": sorted({(r.error or f"HTTP {r.status}")[:200] for r in res if not r.ok})[:3],
        "ttft_p50": pct(ttft, 50),
        "ttft_p95": pct(ttft, 95),
        "ttft_cached_p50": pct(cached_ttft, 50),
        "ttft_cached_p95": pct(cached_ttft, 95),
        "ttft_cold_p50": pct(cold_ttft, 50),
        "e2e_p50": pct(e2e, 50),
        "e2e_p95": pct(e2e, 95),
        "tokens": tokens,
        "tokens_per_request": tokens / len(ok) if ok else None,
        "token_source": sorted({r.token_source for r in ok}),
        "wall_s": out.wall,
        "agg_tps": tokens / out.wall if out.wall > 0 and ok else None,
        "decode_tps_p50": pct(rates, 50),
        "raw_ttft": ttft,
        "raw_e2e": e2e,
        "finish_reasons": sorted({str(r.finish_reason) for r in ok}),
        "sample_text": ok[0].text[:80] if ok else None,
    }
