"""Timing probes of llama.cpp context settings on one loaded model (no scheduler, no HTTP).

:func:`probe` creates a throw-away one-sequence context with the settings to try,
times single-token decode steps with a short KV, prefills to a depth, and times
decode steps there. :mod:`fastpilot.backends.llamacpp_tuning` calls it at load to
pick flash attention; ``benchmarks/kernels.py`` calls it to compare variants.
:func:`batch_widths` times decode-only batches of several widths (logits for every
token, as a speculative verification asks), which the draft policy weighs drafts by.

The KV holds random token ids: attention and matmul cost do not depend on which
tokens they are, only on how many cells each step attends to.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastpilot.backends.llamacpp_native import NativeBatch, context_params

__all__ = ["MID_DEPTHS", "Probe", "batch_widths", "probe"]

# Depths timed between a probe's short and deep points. Flash attention's step time is
# not a line in the cells: CodeGen-350M Q4_K_M, 2 EPYC threads, one stream measured on /
# off 0.94 at 16 cells, 0.92 at 64, 1.02 at 128 and 1.42 at 256, where the line through
# 16 and 256 put the crossover at 50 cells.
MID_DEPTHS = (64, 128)


@dataclass(frozen=True, slots=True)
class Probe:
    """Wall milliseconds measured on one context configuration.

    ``short_ms``/``deep_ms``: per single-token decode step with ``short``/``deep``
    cells in the KV (the fastest of the steps: the least disturbed on a shared
    CPU); ``prefill_ms``: per prompt token while filling the KV from ``short`` up
    to ``deep`` in ``n_ubatch``-sized decode calls; ``mid``: (cells, step ms) at the
    depths of :data:`MID_DEPTHS` between the two, timed on the way.
    """

    flash_attn: bool
    n_ubatch: int
    kv_type: str
    short: int
    deep: int
    short_ms: float
    deep_ms: float
    prefill_ms: float
    mid: tuple[tuple[int, float], ...] = ()

    def steps(self) -> list[tuple[int, float]]:
        """(cells, step ms) at every depth this probe timed, shallowest first."""
        return [(self.short, self.short_ms), *self.mid, (self.deep, self.deep_ms)]

    def to_json(self) -> dict[str, object]:
        return {
            "flash_attn": "on" if self.flash_attn else "off",
            "n_ubatch": self.n_ubatch,
            "kv_type": self.kv_type,
            "short": self.short,
            "deep": self.deep,
            "short_ms": round(self.short_ms, 3),
            "deep_ms": round(self.deep_ms, 3),
            "prefill_ms_per_token": round(self.prefill_ms, 4),
            "mid_ms": {str(d): round(ms, 3) for d, ms in self.mid},
        }


def probe(
    lib: Any,
    model: Any,
    *,
    flash_attn: bool,
    n_ubatch: int,
    threads: int,
    threads_batch: int,
    deep: int,
    short: int = 16,
    steps: int = 6,
    kv_type: str = "f16",
    seed: int = 0,
    deadline: float | None = None,
) -> Probe:
    """Time one configuration; raises RuntimeError when a context or decode fails.

    ``deadline`` (a ``time.perf_counter()`` value): raise TimeoutError after the
    first decode call that ends past it. Costs about ``deep`` prompt tokens of
    prefill plus ``steps + 1`` decode steps at each timed depth (short, the
    :data:`MID_DEPTHS` in between, deep), on the calling thread, with
    ``threads_batch`` threads for the prefill.
    """
    n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, n_vocab, deep + 2 * steps + 2).tolist()
    ctx = _context(
        lib, model, deep + steps + 2, n_ubatch, n_ubatch, threads, threads_batch, flash_attn,
        kv_type,
    )  # fmt: skip
    batch = NativeBatch(lib, n_ubatch)
    pos = 0

    def run(tokens: list[int]) -> float:
        nonlocal pos
        dt = _timed_decode(lib, ctx, batch, tokens, pos, 1)
        if deadline is not None and time.perf_counter() > deadline:
            raise TimeoutError("the probe ran past its deadline")
        pos += len(tokens)
        return dt

    def steps_ms() -> float:
        # One warm-up step (graph re-planned for the new shape), then the median step.
        run([ids[pos]])
        return 1000 * min(run([ids[pos]]) for _ in range(steps))

    mid: list[tuple[int, float]] = []
    try:
        run(ids[:short])
        short_ms = steps_ms()
        filled, spent = 0, 0.0
        for depth in [d for d in MID_DEPTHS if short + steps + 1 < d < deep] + [deep]:
            while pos < depth:
                n = min(depth, pos + n_ubatch) - pos
                spent += run(ids[pos : pos + n])
                filled += n
            if depth < deep:
                mid.append((pos, steps_ms()))
        prefill_ms = 1000 * spent / max(1, filled)
        deep_ms = steps_ms()
    finally:
        lib.llama_free(ctx)
    return Probe(
        flash_attn, n_ubatch, kv_type, short, deep, short_ms, deep_ms, prefill_ms, tuple(mid)
    )


def batch_widths(
    lib: Any,
    model: Any,
    *,
    widths: list[int],
    flash_attn: bool,
    n_ubatch: int,
    threads: int,
    kv_type: str = "f16",
    depth: int = 128,
    rounds: int = 2,
    deadline: float | None = None,
) -> list[float]:
    """Wall milliseconds of one ``llama_decode`` of each of ``widths`` tokens (one
    sequence, ``depth`` cells in the KV, logits for every token); each batch's cells
    are removed again after it.

    A shared CPU changes speed over seconds (GPT-2-117M's one-token step measured 8 and
    12 ms in the same hour), so every width is timed right after a one-token step and
    taken relative to it; a width's result is the median of its ratios over up to
    ``rounds`` rounds times the median one-token step. ``deadline`` (a
    ``time.perf_counter()`` value): no further round once a round ends past it (the
    first always completes). Raises RuntimeError when a context or decode fails.
    """
    widest = max(widths)  # depth + widest: at most the trained context (learned positions)
    n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
    ids = np.random.default_rng(0).integers(0, n_vocab, depth + widest).tolist()
    ctx = _context(
        lib, model, depth + widest, max(widest, n_ubatch), n_ubatch, threads, threads,
        flash_attn, kv_type,
    )  # fmt: skip
    mem = lib.llama_get_memory(ctx)
    batch = NativeBatch(lib, max(widest, depth))

    def run(tokens: list[int], pos: int, n_logits: int) -> float:
        return _timed_decode(lib, ctx, batch, tokens, pos, n_logits)

    ones: list[float] = []
    ratios: list[list[float]] = [[] for _ in widths]
    try:
        run(ids[:depth], 0, 1)
        for _ in range(rounds):
            for i, n in enumerate(widths):
                one = run(ids[depth : depth + 1], depth, 1)
                lib.llama_memory_seq_rm(mem, 0, depth, -1)
                ratios[i].append(run(ids[depth : depth + n], depth, n) / one)
                lib.llama_memory_seq_rm(mem, 0, depth, -1)
                ones.append(one)
            if deadline is not None and time.perf_counter() > deadline:
                break
    finally:
        lib.llama_free(ctx)
    one_ms = 1000 * statistics.median(ones)
    return [one_ms * statistics.median(r) for r in ratios]


def _context(
    lib: Any,
    model: Any,
    cells: int,
    n_batch: int,
    n_ubatch: int,
    threads: int,
    threads_batch: int,
    flash_attn: bool,
    kv_type: str,
) -> Any:
    """A one-sequence throw-away context of at least ``cells`` cells (256-padded)."""
    params = context_params(
        lib,
        n_ctx=-(-cells // 256) * 256,
        n_seq=1,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        threads=threads,
        threads_batch=threads_batch,
        flash_attn=flash_attn,
        kv_type=kv_type,
    )
    ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a probe context")
    return ctx


def _timed_decode(
    lib: Any, ctx: Any, batch: NativeBatch, tokens: list[int], pos: int, n_logits: int
) -> float:
    """Seconds of one ``llama_decode`` of ``tokens`` at ``pos`` (sequence 0)."""
    batch.clear()
    batch.add(tokens, pos, 0, n_logits)
    t0 = time.perf_counter()
    rc = int(lib.llama_decode(ctx, batch.ready()))
    dt = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"llama_decode failed with status {rc} in a probe")
    return dt
