"""The llama.cpp context settings a model runs with, and how each was chosen.

Flash attention is the setting whose best value depends on the CPU and the context
length (on one AVX2 EPYC it was ~1.5-2x slower per token at 1000 positions, on
another EPYC ~20% faster at 16 and at 672), so ``flash_attn="auto"`` on CPU is
**calibrated**: :func:`calibrate` times single-token decode steps with flash
attention on and off at a short KV and after a 256-token prefill, extrapolates
each linearly to the context lengths editors send (16, ~700 and ~1000 positions,
capped by the context) and keeps "on" -- what llama.cpp's own ``auto`` resolves
to on CPU -- unless "off" is more than :data:`MARGIN` faster there. The result is
cached in ``<cache>/kernels/<key>.json`` (the key covers the model file, the CPU,
the llama.cpp build and the threads), so a later load reuses it without measuring;
a measurement that noise spoiled (rounds that disagree, or past the time budget)
keeps "on", is reported as the default, and is not cached.
With layers offloaded to a GPU, ``auto`` is llama.cpp's own choice.

With speculation on (CPU only), :func:`batch_cost` also times decode-only batches of
1 to 64 tokens with the chosen kernel, once per model file and machine (cached beside
the calibration): the draft policy sizes drafts by that shape rather than by a line
(:mod:`fastpilot.backends.draft_policy`); ``/v1/models`` reports it as ``batch_cost``.

The other settings are not measured at load: ``n_ubatch`` (llama.cpp's physical
micro-batch) defaults to llama.cpp's 512, ``threads_batch`` (prompt evaluation) to
``threads``, the KV cache type to f16 (q8_0 changes the numbers, and needs flash
attention). ``benchmarks/kernels.py`` measures all of them side by side.

Every value is reported with its source (:class:`Source`) in ``/v1/models`` and
in the start-up log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from fastpilot.backends.llamacpp_native import GGML_TYPES, on_own_thread
from fastpilot.backends.llamacpp_probe import Probe, batch_widths, probe
from fastpilot.backends.prefill import kv_padded

__all__ = [
    "DEFAULT_CACHE",
    "DEFAULT_UBATCH",
    "KV_TYPES",
    "FlashAttn",
    "KernelChoice",
    "ShortLane",
    "Source",
    "batch_cost",
    "calibrate",
    "decide",
    "default_cache_dir",
    "flash_faster_below",
    "parse_flash_attn",
    "short_lane_for",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_UBATCH = 512  # llama.cpp's (and llama-server's) default micro-batch
KV_TYPES = tuple(GGML_TYPES)
# "off" must beat "on" by this much to be chosen: a closer call is noise on a busy CPU.
MARGIN = 0.05
EDITOR_DEPTHS = (16, 700, 1000)  # KV positions an editor's request decodes at
PROBE_DEPTH = 256  # prefill this many tokens to time decode steps past a short KV
ROUNDS = 2  # interleaved on/off rounds of probes
# Seconds a calibration may take (a model whose 256-token prefill takes longer keeps
# the default); no second round once the first took half of it.
BUDGET_S = 8.0
CALIBRATION_VERSION = 5  # bump when the method changes: older cache files are ignored


class FlashAttn(str, Enum):
    """``--flash-attn``: calibrate (auto), or force on or off."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Source(str, Enum):
    """Where a reported setting came from."""

    USER = "user"  # a flag or constructor argument
    CALIBRATED = "calibrated"  # measured at load on this machine (or read from the cache)
    DEFAULT = "default"  # fastpilot's default, not measured
    LLAMA_CPP = "llama.cpp auto"  # llama.cpp decides inside the context (GPU offload)


def parse_flash_attn(value: str | bool | None) -> FlashAttn:
    """``"auto"|"on"|"off"`` (or True/False/None) as a :class:`FlashAttn`; ValueError else."""
    if value is None:
        return FlashAttn.AUTO
    if isinstance(value, bool):
        return FlashAttn.ON if value else FlashAttn.OFF
    try:
        return FlashAttn(str(value).lower())
    except ValueError:
        raise ValueError(f"flash_attn must be auto, on or off, not {value!r}") from None


DEFAULT_CACHE = "default"  # a ``cache_dir`` argument meaning :func:`default_cache_dir`


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fastpilot`` or ``~/.cache/fastpilot``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastpilot"


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """The settings a generation context is created with, each with its :class:`Source`.

    ``flash_attn`` None means llama.cpp's AUTO (only with GPU offload). ``calibration``
    is what the flash-attention choice was based on (the probes, the cache file,
    whether it was measured now), empty when nothing was measured.
    """

    flash_attn: bool | None
    n_batch: int
    n_ubatch: int
    threads: int
    threads_batch: int
    kv_type: str
    sources: dict[str, Source] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    # A decode-only batch of n tokens' time relative to one token's, n = 1.. (batch_cost)
    batch_shape: tuple[float, ...] | None = None
    batch_evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def flash_attn_name(self) -> str:
        return "auto" if self.flash_attn is None else ("on" if self.flash_attn else "off")

    def to_json(self) -> dict[str, Any]:
        """The ``kernels`` object of ``/v1/models`` and ``BackendInfo.extra``."""
        out: dict[str, Any] = {
            "flash_attn": self.flash_attn_name,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "threads": self.threads,
            "threads_batch": self.threads_batch,
            "kv_type": self.kv_type,
            "source": {k: v.value for k, v in self.sources.items()},
        }
        if self.calibration:
            out["calibration"] = self.calibration
        if self.batch_evidence:
            out["batch_cost"] = self.batch_evidence
        return out

    def read_back(self, lib: Any, ctx: Any) -> KernelChoice:
        """This choice with the batch sizes and threads llama.cpp reports for ``ctx``
        (flash attention and the KV type have no getter: they are what was passed)."""
        return replace(
            self,
            n_batch=int(lib.llama_n_batch(ctx)),
            n_ubatch=int(lib.llama_n_ubatch(ctx)),
            threads=int(lib.llama_n_threads(ctx)),
            threads_batch=int(lib.llama_n_threads_batch(ctx)),
        )

    def summary(self) -> str:
        """One line for the start-up log: each value with its source."""
        src = self.sources

        def s(name: str) -> str:
            return f" ({src[name].value})" if name in src else ""

        return (
            f"flash_attn {self.flash_attn_name}{s('flash_attn')}, n_ubatch {self.n_ubatch}"
            f"{s('n_ubatch')}, n_batch {self.n_batch}, threads {self.threads}/"
            f"{self.threads_batch}{s('threads_batch')}, kv {self.kv_type}{s('kv_type')}"
        )


def _predict(p: Probe, depth: int) -> float:
    """Decode ms per step at ``depth`` cells, linear in the depth between the probe's two
    points (attention grows linearly with the cells a step reads; the rest is constant)."""
    slope = max(0.0, (p.deep_ms - p.short_ms) / max(1, p.deep - p.short))
    return p.short_ms + slope * (depth - p.short)


def flash_faster_below(on: Probe, off: Probe) -> int:
    """KV cells below which a decode step is faster with flash attention on, from the
    steps the two probes timed (0: never). llama.cpp's CPU flash-attention kernel skips
    masked cells, while without it a step computes every cell of its 256-padded window:
    on wins at a short KV and loses as the cells it reads one by one add up, in steps
    rather than a line (:data:`~fastpilot.backends.llamacpp_probe.MID_DEPTHS`). The
    crossover is interpolated between the last depth where on was faster and the first
    where it was not; when on was faster at every depth, the two probes' last segments
    are extended (the probe's deep point, at least, when they never cross)."""
    on_steps, off_steps = dict(on.steps()), dict(off.steps())
    depths = sorted(set(on_steps) & set(off_steps))
    gaps = [off_steps[d] - on_steps[d] for d in depths]  # > 0: on is faster there
    if not gaps or gaps[0] <= 0:
        return 0
    for i in range(1, len(depths)):
        if gaps[i] <= 0:
            d0, d1 = depths[i - 1], depths[i]
            return int(d0 + (d1 - d0) * gaps[i - 1] / (gaps[i - 1] - gaps[i]))
    if len(depths) < 2:
        return depths[-1]
    d0, d1 = depths[-2], depths[-1]
    s_on = max(0.0, (on_steps[d1] - on_steps[d0]) / (d1 - d0))
    s_off = max(0.0, (off_steps[d1] - off_steps[d0]) / (d1 - d0))
    if s_on <= s_off:
        return d1
    return int(d1 + gaps[-1] / (s_on - s_off))


def _score(p: Probe, per_slot: int) -> float:
    depths = sorted({min(d, per_slot) for d in EDITOR_DEPTHS})
    return sum(_predict(p, d) for d in depths) / len(depths)


def cache_key(model_path: str | os.PathLike[str], lib: Any, threads: int, threads_batch: int):
    """What a calibration depends on: the model file, this CPU, the llama.cpp build, threads."""
    st = os.stat(model_path)
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "version": CALIBRATION_VERSION,
        "model": os.path.realpath(model_path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "system": lib.llama_print_system_info().decode("utf-8", "replace").strip(),
        "llama_cpp": getattr(lib, "__version__", ""),
        "threads": threads,
        "threads_batch": threads_batch,
    }


def calibrate(
    lib: Any,
    model: Any,
    model_path: str | os.PathLike[str],
    *,
    per_slot: int,
    threads: int,
    threads_batch: int,
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[bool, dict[str, Any]]:
    """Flash attention on or off for this model on this machine, and the evidence.

    Reads ``cache_dir/kernels/<key>.json`` when present; otherwise measures (up to
    :data:`ROUNDS` rounds of two throw-away contexts, each ~256 prompt tokens plus ~16
    decode steps: tens of ms for tiny-py, ~1-2 s for GPT-2-117M on 2 quiet cores) and
    writes it. An inconclusive measurement (no second round within :data:`BUDGET_S`,
    or rounds that disagree: the CPU was busy, see :func:`_consistent`) keeps flash
    attention on and is not cached; ``evidence["conclusive"]`` says which.
    ``cache_dir`` None: measure, cache nothing. A cache that cannot be written is
    logged, not fatal.
    """
    key = cache_key(model_path, lib, threads, threads_batch)
    path = _cache_file(cache_dir, "kernels", key)

    def reuse(saved: dict[str, Any]) -> tuple[bool, dict[str, Any]] | None:
        if saved.get("flash_attn") not in ("on", "off"):
            return None
        return saved["flash_attn"] == "on", {**saved["evidence"], "cached": True, "file": str(path)}

    cached = _load(path, key, reuse, "kernel calibration")
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    deep = max(2, min(PROBE_DEPTH, per_slot - 16))
    short = min(16, deep // 2)
    rounds: list[dict[bool, Probe]] = []
    over_budget = False
    # Interleaved rounds (on, off, on, off): a burst of load hits both; the fastest
    # step of each variant is the least disturbed. A second round only within budget.

    def measure() -> None:
        while len(rounds) < ROUNDS and (not rounds or time.perf_counter() - t0 < BUDGET_S / 2):
            rounds.append(
                {
                    on: probe(
                        lib,
                        model,
                        flash_attn=on,
                        n_ubatch=DEFAULT_UBATCH,
                        threads=threads,
                        threads_batch=threads_batch,
                        deep=deep,
                        short=short,
                        seed=len(rounds),
                        deadline=t0 + BUDGET_S,
                    )
                    for on in (True, False)
                }
            )

    try:  # not on the loading thread: see on_own_thread
        on_own_thread(measure, "fastpilot-calibration")
    except TimeoutError:  # a big model or a busy CPU: not worth a longer load
        over_budget = True
    if rounds:
        probes = {on: _fastest([r[on] for r in rounds]) for on in (True, False)}
        scores = {on: _score(p, per_slot) for on, p in probes.items()}
    else:
        probes, scores = {}, {True: 0.0, False: 0.0}
    conclusive = len(rounds) == ROUNDS and _consistent(rounds, probes)
    flash = not (conclusive and scores[False] < scores[True] * (1 - MARGIN))
    evidence: dict[str, Any] = {
        "cached": False,
        "conclusive": conclusive,
        "over_budget": over_budget,
        "seconds": round(time.perf_counter() - t0, 3),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "rule": f"on unless off is >{MARGIN:.0%} faster per decode step, mean over "
        f"{sorted({min(d, per_slot) for d in EDITOR_DEPTHS})} positions",
        "predicted_ms": {("on" if k else "off"): round(v, 3) for k, v in scores.items()},
        "flash_faster_below": flash_faster_below(probes[True], probes[False]) if probes else 0,
        "probes": [p.to_json() for r in rounds for p in r.values()],
    }
    if not conclusive:
        log.warning(
            "flash-attention calibration %s: using on, not cached",
            f"over its {BUDGET_S:.0f} s budget" if over_budget else "inconclusive (a busy CPU?)",
        )
    else:
        record = {"key": key, "flash_attn": "on" if flash else "off", "evidence": evidence}
        if _save(path, record, "kernel calibration"):
            evidence = {**evidence, "file": str(path)}
    return flash, evidence


def _cache_file(
    cache_dir: str | os.PathLike[str] | None, kind: str, key: dict[str, Any]
) -> Path | None:
    """``cache_dir/kind/<digest of key>.json`` (None: no cache)."""
    if cache_dir is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir, kind, f"{digest}.json")


def _load(
    path: Path | None, key: dict[str, Any], parse: Callable[[dict[str, Any]], T | None], what: str
) -> T | None:
    """``parse`` of the record cached at ``path`` for ``key``; None when there is none,
    it is for another key, or it is unreadable (logged)."""
    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return parse(saved) if saved.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable %s file %s", what, path)
        return None


def _save(path: Path | None, record: dict[str, Any], what: str) -> bool:
    """Write ``record`` to ``path`` atomically; False (logged) when it cannot be."""
    if path is None:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.replace(tmp, path)
        return True
    except OSError as ex:
        log.warning("could not cache the %s in %s: %s", what, path, ex)
        return False


def _consistent(rounds: list[dict[bool, Probe]], fastest: dict[bool, Probe]) -> bool:
    """False when noise visibly won: a step over more cells measured faster than one over
    16; the two variants 2x apart at 16 cells (attention is a sliver of a step there);
    or one variant's short step 2x apart between rounds."""

    def near(a: float, b: float) -> bool:
        return max(a, b) <= 2 * min(a, b)

    return (
        all(p.deep_ms >= 0.9 * p.short_ms for p in fastest.values())
        and near(fastest[True].short_ms, fastest[False].short_ms)
        and all(near(*(r[on].short_ms for r in rounds[:2])) for on in (True, False))
    )


def _fastest(probes: list[Probe]) -> Probe:
    """One probe with the fastest short step, deep step and prefill of ``probes``."""
    return replace(
        probes[0],
        short_ms=min(p.short_ms for p in probes),
        deep_ms=min(p.deep_ms for p in probes),
        prefill_ms=min(p.prefill_ms for p in probes),
    )


# Batch widths timed by batch_cost (a speculative step holds one token per stream plus
# its drafts): every width to 16, where llama.cpp's CPU kernels change, then sparser.
BATCH_WIDTHS = (*range(1, 17), 20, 24, 32, 48, 64)


def batch_cost(
    lib: Any,
    model: Any,
    model_path: str | os.PathLike[str],
    *,
    flash_attn: bool,
    n_ubatch: int,
    threads: int,
    kv_type: str,
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[tuple[float, ...] | None, dict[str, Any]]:
    """The time of a decode-only batch of ``n`` tokens relative to one token's, for
    ``n`` = 1 to 64 (widths between those timed are interpolated; at most half the
    trained context), and the evidence; (None, {}) for a model too short to time.

    Reads ``cache_dir/batch_cost/<key>.json`` when present; otherwise times
    :data:`BATCH_WIDTHS` (:func:`~fastpilot.backends.llamacpp_probe.batch_widths`, up
    to three rounds while under half of :data:`BUDGET_S`; two took 3.1-3.5 s for
    GPT-2-117M on 2 vCPUs) and caches the result. A
    measurement that noise visibly spoiled (a wider batch >20 % faster than one token)
    gives None: the policy's fitted line is used, nothing is cached. A width measured
    wrong otherwise is corrected by the steps the backend runs
    (:meth:`~fastpilot.backends.draft_policy.DecodeCost.relative`).
    """
    # A model with learned positions (GPT-2) has none past its trained context.
    trained = int(lib.llama_model_n_ctx_train(model)) or 2048
    widths = [w for w in BATCH_WIDTHS if w <= trained // 2]
    if len(widths) < 2:
        return None, {}
    key = {
        **cache_key(model_path, lib, threads, threads),
        "flash_attn": flash_attn,
        "n_ubatch": n_ubatch,
        "kv_type": kv_type,
        "widths": widths,
    }
    path = _cache_file(cache_dir, "batch_cost", key)

    def reuse(saved: dict[str, Any]) -> tuple[tuple[float, ...], dict[str, Any]]:
        ms = [float(v) for v in saved["ms"]]
        return _dense(widths, ms), {"cached": True, "file": str(path), **_evidence(widths, ms)}

    cached = _load(path, key, reuse, "batch-cost")
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    ms = on_own_thread(
        lambda: batch_widths(
            lib,
            model,
            widths=widths,
            flash_attn=flash_attn,
            n_ubatch=n_ubatch,
            threads=threads,
            kv_type=kv_type,
            depth=min(128, trained - widths[-1]),
            rounds=3,
            deadline=t0 + BUDGET_S / 2,
        ),  # fmt: skip
        "fastpilot-calibration",
    )
    seconds = round(time.perf_counter() - t0, 3)
    evidence = {"cached": False, "seconds": seconds, **_evidence(widths, ms)}
    if min(ms[1:]) < 0.8 * ms[0]:
        log.warning("batch-cost calibration inconclusive (a busy CPU?): drafts sized by a line")
        return None, {**evidence, "conclusive": False}
    if _save(path, {"key": key, "ms": ms}, "batch cost"):
        evidence["file"] = str(path)
    return _dense(widths, ms), evidence


def _evidence(widths: list[int], ms: list[float]) -> dict[str, Any]:
    return {"widths": widths, "ms": [round(v, 3) for v in ms]}


def _dense(widths: list[int], ms: list[float]) -> tuple[float, ...]:
    """Relative cost for every width 1..widths[-1], linear between timed widths.

    Each timed width in between is first replaced by the median of itself and its two
    neighbours: one width timed far off by noise (CodeGen-350M once measured 5 tokens at
    39 ms between 4 at 68 and 6 at 89) would otherwise be chosen over and over, while a
    step in the cost, as at 8 tokens, survives."""
    ms = [ms[0], *(sorted(ms[i - 1 : i + 2])[1] for i in range(1, len(ms) - 1)), ms[-1]]
    out: list[float] = []
    timed = list(zip(widths, ms, strict=True))
    for (w0, t0), (w1, t1) in zip(timed, timed[1:], strict=False):
        out += [(t0 + (t1 - t0) * (n - w0) / (w1 - w0)) / ms[0] for n in range(w0, w1)]
    return (*out, ms[-1] / ms[0])


def decide(
    lib: Any,
    model: Any,
    model_path: str | os.PathLike[str],
    n_batch: int,
    per_slot: int,
    gpu_layers: int,
    threads: int | None,
    threads_batch: int | None,
    *,
    flash_attn: str | bool | None = "auto",
    n_ubatch: int | None = None,
    kv_type: str | None = None,
    cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE,
    batch_shape: bool = False,
) -> KernelChoice:
    """Every context setting with its source; calibrates flash attention when it is auto.

    Args:
        n_batch: the most tokens one batch holds (the scheduler's capacity).
        per_slot: KV cells per sequence (caps the calibration's depths).
        gpu_layers: layers offloaded; with any, ``auto`` is llama.cpp's AUTO.
        threads: decode threads (None: every core); ``threads_batch``: prompt
            evaluation threads (None: ``threads``).
        flash_attn: ``"auto"``, ``"on"``, ``"off"`` (or True/False/None).
        n_ubatch: llama.cpp's micro-batch (None: :data:`DEFAULT_UBATCH`; at most
            ``n_batch``).
        kv_type: ``"f16"`` (None: the default) or ``"q8_0"`` (halves the KV bytes a
            step reads, changes the numbers slightly, needs flash attention).
        cache_dir: where :func:`calibrate` keeps its result (None: nowhere).
        batch_shape: also measure :func:`batch_cost` (speculation on; CPU only).

    Raises ValueError for an unknown flash-attention value or KV type, a size below
    1, or a q8_0 KV cache with flash attention off (llama.cpp cannot store a
    quantized V without it). Blocks while calibrating (see :func:`calibrate`).
    """
    flash_attn = parse_flash_attn(flash_attn)
    threads_given = bool(threads)
    threads = threads or os.cpu_count() or 1
    if kv_type is not None and kv_type not in KV_TYPES:
        raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, not {kv_type!r}")
    if (n_ubatch is not None and n_ubatch < 1) or (threads_batch is not None and threads_batch < 1):
        raise ValueError("n_ubatch and threads_batch must be >= 1")
    kv = kv_type or "f16"
    if kv != "f16" and flash_attn is FlashAttn.OFF:
        raise ValueError(f"a {kv} KV cache needs flash attention: use flash_attn on or auto")
    sources = {
        "threads": Source.USER if threads_given else Source.DEFAULT,
        "threads_batch": Source.DEFAULT if threads_batch is None else Source.USER,
        "n_ubatch": Source.DEFAULT if n_ubatch is None else Source.USER,
        "kv_type": Source.DEFAULT if kv_type is None else Source.USER,
    }
    tb = threads_batch or threads
    evidence: dict[str, Any] = {}
    flash: bool | None
    if flash_attn is not FlashAttn.AUTO:
        flash, sources["flash_attn"] = flash_attn is FlashAttn.ON, Source.USER
    elif gpu_layers:
        flash, sources["flash_attn"] = None, Source.LLAMA_CPP
    elif kv != "f16":
        flash, sources["flash_attn"] = True, Source.DEFAULT  # required by the quantized V
    else:
        flash, evidence = calibrate(
            lib,
            model,
            model_path,
            per_slot=per_slot,
            threads=threads,
            threads_batch=tb,
            cache_dir=default_cache_dir() if cache_dir == DEFAULT_CACHE else cache_dir,
        )
        sources["flash_attn"] = Source.CALIBRATED if evidence["conclusive"] else Source.DEFAULT
    ubatch = min(n_ubatch or DEFAULT_UBATCH, n_batch)
    shape: tuple[float, ...] | None = None
    shape_evidence: dict[str, Any] = {}
    if batch_shape and not gpu_layers:
        shape, shape_evidence = batch_cost(
            lib,
            model,
            model_path,
            flash_attn=bool(flash),
            n_ubatch=ubatch,
            threads=threads,
            kv_type=kv,
            cache_dir=default_cache_dir() if cache_dir == DEFAULT_CACHE else cache_dir,
        )
    return KernelChoice(
        flash_attn=flash,
        n_batch=n_batch,
        n_ubatch=ubatch,
        threads=threads,
        threads_batch=tb,
        kv_type=kv,
        sources=sources,
        calibration=evidence,
        batch_shape=shape,
        batch_evidence=shape_evidence,
    )


# A crossover below this many cells is not worth a second context.
SHORT_LANE_MIN = 32


@dataclass(frozen=True, slots=True)
class ShortLane:
    """A second context with flash attention on, for requests that stay short.

    On CPU the best attention kernel depends on how many KV cells a step reads: flash
    attention skips the masked cells of llama.cpp's 256-padded window but reads the
    others one by one, so it wins at a short KV and loses at editor depths (GPT-2-117M
    Q4_K_M, 2 EPYC threads, one stream: 0.81x the step time at 16 cells, 1.24x at 700;
    four streams: 0.90x at 16, 0.81x at 128, parity near 400). A context's kernel is fixed (the KV
    layout differs), so the model gets two: the main one (flash off) and this one, and a
    request goes here when all of it fits ``context`` cells and its mean decode depth,
    prompt plus half of ``max_tokens``, is under ``cells`` (or only this lane is busy:
    see :meth:`takes`).
    """

    cells: int  # flash attention is faster below this depth (the calibration's crossover)
    context: int  # KV cells per slot of the lane's context

    def takes(self, n_prompt: int, max_tokens: int, main_busy: bool, lane_busy: bool) -> bool:
        """Whether a request of ``n_prompt`` tokens and ``max_tokens`` goes to this lane.

        Two busy contexts cost two ``llama_decode`` calls a step, each a pass over the
        weights, so a request that fits either joins the one already decoding; with
        both idle or both busy, the mean depth decides.
        """
        if n_prompt + max_tokens > self.context:
            return False
        if main_busy != lane_busy:
            return lane_busy
        return 2 * n_prompt + max_tokens <= 2 * self.cells

    def to_json(self) -> dict[str, Any]:
        return {"flash_attn": "on", "cells": self.cells, "context": self.context}

    def summary(self) -> str:
        return f"short lane: flash_attn on below {self.cells} cells ({self.context} per slot)"


def short_lane_for(kernels: KernelChoice, per_slot: int, requested: int | None) -> ShortLane | None:
    """The short lane beside a context with ``kernels`` (None: no lane).

    Only beside a flash-off context. ``requested`` None: the calibration's measured
    crossover (``flash_faster_below``) when flash attention was calibrated off, none when
    it is under :data:`SHORT_LANE_MIN`; 0: no lane; N: N cells, whatever was measured.
    The lane's context holds twice ``cells`` (a request's mean depth is under ``cells``),
    rounded up to llama.cpp's 256-cell padding, at most ``per_slot``.
    """
    if kernels.flash_attn is not False or requested == 0:
        return None
    if requested is None:
        if kernels.sources.get("flash_attn") is not Source.CALIBRATED:
            return None
        requested = int(kernels.calibration.get("flash_faster_below", 0))
        if requested < SHORT_LANE_MIN:
            return None
    cells = min(requested, per_slot)
    return ShortLane(cells, min(per_slot, kv_padded(2 * cells)))
