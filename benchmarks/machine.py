"""The machine line and the memory-bandwidth measurement that bounds decode speed.

Single-stream decoding reads every weight once per token, so on a CPU its ceiling is
``read bandwidth / bytes of weights``. Bandwidth is measured here with numpy on arrays
far larger than the caches (512 MiB): a max-reduction (read only; SIMD and cheaper per
byte than a float sum, whose pairwise adds can be compute-bound) on one thread and on T
threads (numpy's reductions release the GIL, so T Python threads each reducing a slice
run in parallel), and a copy (read + write, counted as 2x the array's bytes). The bound
uses the best read figure.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np

__all__ = ["bandwidth", "machine_info"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return ",".join(
                    f
                    for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni")
                    if f in have
                )
    except OSError:
        pass
    return ""


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def machine_info() -> dict:
    """CPU model, cores, RAM, OS and the versions of every library in the comparison."""
    pkgs = (
        "fastpilot",
        "llama_cpp_python",
        "ctranslate2",
        "torch",
        "transformers",
        "numpy",
        "waitress",
        "falcon",
    )
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "ram_gib": round(_ram_gib(), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in pkgs},
    }


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bandwidth(threads: int, mib: int = 512, reps: int = 5) -> dict:
    """Measure memory bandwidth in GB/s (10^9 bytes/s); best of ``reps`` each.

    Allocates two ``mib`` MiB float32 arrays (touched before timing). Takes a few seconds.
    """
    n = mib * 2**20 // 4
    a = np.ones(n, dtype=np.float32)
    b = np.empty_like(a)
    nbytes = a.nbytes
    a.max()  # warm: page-in and frequency ramp

    t_read1 = _best(lambda: a.max(), reps)

    def parallel_read() -> None:
        parts = np.array_split(a, threads)
        ts = [threading.Thread(target=p.max) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    t_readt = _best(parallel_read, reps)
    t_copy = _best(lambda: np.copyto(b, a), reps)

    return {
        "array_mib": mib,
        "read_gbs_1thread": nbytes / t_read1 / 1e9,
        "read_gbs_threads": nbytes / t_readt / 1e9,
        "read_gbs": nbytes / min(t_read1, t_readt) / 1e9,
        "copy_gbs": 2 * nbytes / t_copy / 1e9,
        "threads": threads,
    }
