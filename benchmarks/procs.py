"""Start servers in their own process groups, wait for them, sample their memory, kill them.

Every process the harness starts goes through :class:`Managed`, which puts it in a new
session (``start_new_session=True``) so that killing the group also kills workers it
forked (uvicorn, OpenMP helpers). The harness keeps a registry of live groups and kills
them all on exit, including on Ctrl-C and on errors, so no server outlives a run.
"""

from __future__ import annotations

import atexit
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "DISTURBED",
    "REDO_MAX",
    "REDO_ROUNDS",
    "SETTLE_QUIET",
    "Redo",
    "may_redo",
    "CpuWatch",
    "Managed",
    "RssSampler",
    "free_port",
    "kill_all",
    "rotated",
    "settle",
    "steal_under_load",
    "tree_rss_bytes",
]

_LIVE: dict[int, subprocess.Popen] = {}
_LOCK = threading.Lock()


def rotated(items: list, k: int) -> list:
    """``items`` starting at index ``k`` (mod its length) and wrapping round: the order in
    which the sections that run their servers together visit them in round ``k``, so no
    server always goes first."""
    k = k % len(items) if items else 0
    return items[k:] + items[:k]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (racy, fine on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc (all threads' children files)."""
    out: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def _rss(pid: int) -> int:
    """Resident set size of one process in bytes (VmRSS), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(pid: int) -> int:
    """Sum of VmRSS over ``pid`` and all its descendants.

    Shared pages (an mmap'd model file read by two processes) are counted once per
    process, which over-states a multi-process server; the servers measured here are
    single processes, so the sum is their RSS.
    """
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss(p)
        stack.extend(_children(p))
    return total


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int | str) -> tuple[str, float] | None:
    """(command name, utime + stime seconds) of one process; None if it is gone."""
    try:
        head, tail = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
    except OSError:
        return None
    fields = tail.split()
    return head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / _TICK


def _proc_cpu(pid: int) -> float:
    """utime + stime of one process in seconds (0 if it is gone)."""
    stat = _proc_stat(pid)
    return stat[1] if stat else 0.0


def _tree_pids(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(_children(p))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants, in seconds (10 ms ticks). A process's
    own count keeps the time of its threads that ended, which a sum over the live threads'
    ``schedstat`` loses (fastpilot's idle worker ends its OpenMP helper thread)."""
    return sum(_proc_cpu(p) for p in _tree_pids(pid))


def _cpu_seconds() -> tuple[float, float, float]:
    """(busy, steal, irq) CPU seconds of all cores since boot, from one read of /proc/stat:
    busy excludes idle and iowait and includes steal, the time the hypervisor gave to
    other guests, and irq (hard and soft interrupts), which no process is charged for."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / _TICK, v[7] / _TICK, (v[5] + v[6]) / _TICK


def _every_process() -> dict[int, tuple[str, float]]:
    """pid -> (command name, utime + stime seconds) of every process now."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (stat := _proc_stat(d.name)) is not None:
            out[int(d.name)] = stat
    return out


# A round in which another tenant of the machine took this share of all cores (hypervisor
# steal, mostly: CpuWatch) is run again. Measured in run 20261128-091945:
# tiny-py's single-stream rounds (~0.5 s each) with 9-23 % steal read 0.58-0.85x the
# same contender's median clean round, for fastpilot and llama-server alike; the clean
# rounds had <= 3 %.
DISTURBED = 0.05
REDO_ROUNDS = 2  # at most this many rounds run again per measurement ...
# ... or, where rounds are short, as many as fit in REDO_SECONDS (up to REDO_MAX): in run
# 20261128-100256 a minute of steal disturbed tiny-py's first round three times running.
REDO_SECONDS = 60.0
REDO_MAX = 6


def may_redo(done: int, spent: float, next_round: float) -> bool:
    """Whether a measurement that ran ``done`` rounds again, taking ``spent`` seconds,
    may run one more, of about ``next_round`` seconds."""
    if done < REDO_ROUNDS:
        return True
    return done < REDO_MAX and spent + next_round <= REDO_SECONDS


class Redo:
    """One measurement's rounds run again: :meth:`again` says whether a round just measured
    is to be run again, at most ``limit`` times (the prompt sets to spare) and as
    :func:`may_redo` allows, and counts it."""

    def __init__(self, limit: int = REDO_ROUNDS) -> None:
        self.limit = limit
        self.done = 0
        self.spent = 0.0

    def again(self, shares: Iterable[float | None], took: float = 0.0) -> bool:
        """``shares``: each contender's other-CPU share in the round; ``took``: its seconds."""
        if not any((share or 0) > DISTURBED for share in shares):
            return False
        if self.done >= self.limit or not may_redo(self.done, self.spent, took):
            return False
        self.done, self.spent = self.done + 1, self.spent + took
        return True


def steal_under_load(seconds: float = 2.0) -> float:
    """The share of all cores the hypervisor withheld while every core was kept busy for
    ``seconds`` (one spinning process per core). Steal only shows while a guest wants to
    run, so an idle machine cannot show it; this asks for every core and counts."""
    cores = os.cpu_count() or 1
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    spin = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(cores)]
    t0, (_, steal0, _) = time.monotonic(), _cpu_seconds()
    for proc in spin:
        proc.wait()
    wall = time.monotonic() - t0
    return (_cpu_seconds()[1] - steal0) / (wall * cores) if wall > 0 else 0.0


# Waiting for the hypervisor: in runs 091945 and 100256 about a minute of steal followed
# minutes of both cores at full load, and fell on tiny-py's first rounds.
SETTLE_WAIT = 90.0  # at most this long before a measurement ...
SETTLE_PAUSE = 15.0  # ... idle this long between two probes ...
# ... while a probe reads more than this. Quiet probes read 0-0.2 %; in run 20261128-120857
# a probe of 4.8 % went before tiny-py rounds with 9-28 % steal.
SETTLE_QUIET = 0.01


def settle(max_wait: float = SETTLE_WAIT, pause: float = SETTLE_PAUSE) -> dict:
    """Before a measurement: probe :func:`steal_under_load` and, while it is above
    :data:`SETTLE_QUIET`, leave the machine idle ``pause`` seconds and probe again, for at most
    ``max_wait``. Returns the probes' shares and the seconds it took (probes included)."""
    t0, probes = time.monotonic(), []
    while True:
        probes.append(round(steal_under_load(), 3))
        waited = time.monotonic() - t0
        if probes[-1] <= SETTLE_QUIET or waited + pause > max_wait:
            return {"probes": probes, "seconds": round(waited, 1)}
        time.sleep(pause)


class CpuWatch:
    """How much CPU went to processes other than ours while a contender ran.

    ``foreign_share`` = (system busy time - server tree CPU - harness CPU) / (wall * cores):
    0 means the machine was ours alone; 0.3 means a third of all cores ran someone else's
    work, and the contender's numbers are pessimistic by up to that much. What it was:
    ``steal_share`` (the hypervisor's other guests), ``irq_share`` (interrupts, charged to
    no process) and ``top`` (the other process that used the most, name and share).
    """

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.foreign_share: float | None = None
        self.steal_share: float | None = None  # the part of it that was hypervisor steal
        self.irq_share: float | None = None
        self.top: tuple[str, float] | None = None

    def _ours(self) -> float:
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return own + (tree_cpu_seconds(self.pid) if self.pid else 0.0)

    def __enter__(self) -> CpuWatch:
        self._procs0 = _every_process()
        self._t0, self._ours0 = time.monotonic(), self._ours()
        self._busy0, self._steal0, self._irq0 = _cpu_seconds()
        return self

    def stop(self) -> None:
        """Take the end reading; call while the server still runs (its CPU is then readable)."""
        wall = time.monotonic() - self._t0
        busy, steal, irq = _cpu_seconds()
        busy, steal, irq = busy - self._busy0, steal - self._steal0, irq - self._irq0
        ours = self._ours() - self._ours0
        procs = _every_process()
        cores = os.cpu_count() or 1
        if wall <= 0:
            return
        self.foreign_share = max(0.0, busy - ours) / (wall * cores)
        self.steal_share = steal / (wall * cores)
        self.irq_share = irq / (wall * cores)
        skip = {os.getpid(), *(_tree_pids(self.pid) if self.pid else ())}
        used = [
            (cpu - self._procs0.get(pid, (name, 0.0))[1], name)
            for pid, (name, cpu) in procs.items()
            if pid not in skip
        ]
        if used:
            cpu, name = max(used)
            self.top = (name, cpu / (wall * cores))

    def __exit__(self, *exc: object) -> None:
        if self.foreign_share is None:
            self.stop()


class RssSampler:
    """Poll a process tree's RSS every ``interval`` seconds on a daemon thread; keep the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.peak = max(self.peak, tree_rss_bytes(self.pid))


class Managed:
    """One child process in its own process group, with its output sent to a log file.

    Use as a context manager: leaving the block (normally or by an exception) sends
    SIGTERM to the whole group, then SIGKILL after ``grace`` seconds.
    """

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        nice: int = 0,
        grace: float = 5.0,
    ) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.nice = nice
        self.grace = grace
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Managed:
        """Spawn the process (new session, stdout+stderr to the log)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        niceness = self.nice

        def _pre() -> None:
            if niceness:
                os.nice(niceness)

        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_pre if niceness else None,
        )
        with _LOCK:
            _LIVE[self.proc.pid] = self.proc
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_http(self, port: int, path: str, timeout: float) -> None:
        """Block until ``GET path`` answers 200 on 127.0.0.1:port.

        Raises:
            RuntimeError: the process exited, or ``timeout`` seconds passed; the message
                carries the tail of its log.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.argv[0]} exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", path)
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(
            f"{self.argv[0]} not ready on :{port}{path} after {timeout:.0f}s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Terminate the process group (SIGTERM, then SIGKILL after the grace period)."""
        if self.proc is not None:
            _kill_group(self.proc, self.grace)
            with _LOCK:
                _LIVE.pop(self.proc.pid, None)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Managed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    # The child is a session leader, so its pgid is its pid; the group outlives a dead leader.
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # Leader gone; make sure no forked worker is left in the group.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break


def kill_all() -> None:
    """Kill every group this harness started and that is still registered."""
    with _LOCK:
        procs = list(_LIVE.values())
        _LIVE.clear()
    for p in procs:
        _kill_group(p, 2.0)


atexit.register(kill_all)
