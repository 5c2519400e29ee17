"""The client workloads: editors typing, concurrent clients, browser GETs, a decode probe.

Every workload is bounded twice: by a request count and by a wall-clock cap checked
before each new request (a request in flight is always allowed to finish, so no stream
is cut short by the harness). Requests are greedy (temperature 0) with EOS ignored, so
every contender generates the same number of tokens unless a stop string ends a
completion; the token count of each completion is recorded to show it.
"""

from __future__ import annotations

import random
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.client import Call, Result, send

__all__ = [
    "Req",
    "TypingSession",
    "Outcome",
    "typing_sessions",
    "editors",
    "clients",
    "browser",
    "decode_probe",
]


@dataclass(frozen=True, slots=True)
class Req:
    """A contender-neutral request; each contender's adapter turns it into an HTTP call."""

    prompt: str
    max_tokens: int
    stop: tuple[str, ...] = ()
    stream: bool = True
    get: bool = False  # browser-style GET (fastpilot) / its POST equivalent (peers)


Adapter = Callable[[Req], Call]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The results of one workload run on one contender."""

    results: tuple[Result, ...]
    wall: float  # seconds from the first request sent to the last byte received
    tags: tuple[str, ...]  # per result: "cold" (first of a typing session) / "cached" / ""


# --------------------------------------------------------------------------- editors

STDLIB_FILES = ("argparse.py", "difflib.py", "textwrap.py", "json/decoder.py", "configparser.py")


@dataclass(frozen=True, slots=True)
class TypingSession:
    """One editor typing through a real stdlib file.

    The window start is fixed for the session (at a line start, like the plugin's
    line-granular trimming) so that each prompt extends the previous one by the
    characters just typed; the first prompt is ``start_tokens`` long and the last
    stays under the token budget.
    """

    path: str
    header: str  # the plugin's "# Path: <file>" line
    text: str
    window_start: int
    cursor0: int
    steps: tuple[int, ...]  # characters typed before each request

    def prompts(self) -> list[str]:
        out, cur = [], self.cursor0
        for s in self.steps:
            cur += s
            out.append(self.header + self.text[self.window_start : cur])
        return out


def typing_sessions(
    count: int,
    n_requests: int,
    start_tokens: int,
    count_tokens: Callable[[str], int],
    seed: int = 0,
) -> list[TypingSession]:
    """Build ``count`` typing sessions, each on its own stdlib file.

    ``count_tokens`` is the model's tokenizer (the plugin budgets with its own).
    Keystroke bursts are 2-6 characters (seeded), which keeps every prompt within
    ``start_tokens + ~2 * n_requests`` tokens.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    sessions = []
    for rel in STDLIB_FILES[:count]:
        text = (stdlib / rel).read_text(encoding="utf-8")
        header = f"# Path: Lib/{rel}\n"
        lines = text.splitlines(keepends=True)
        starts = [0]
        for ln in lines:
            starts.append(starts[-1] + len(ln))
        # Cursor: the first line end after which the file holds >= start_tokens tokens,
        # placed mid-file so that real code follows it for typing.
        budget = start_tokens - count_tokens(header)
        first = len(lines) // 5
        cursor0 = None
        for i in range(first + 1, len(starts)):
            if count_tokens(text[starts[first] : starts[i]]) >= budget:
                cursor0 = starts[i]
                break
        if cursor0 is None:
            raise RuntimeError(f"{rel} too short for a {start_tokens}-token window")
        # Window start: the latest line start that keeps the window within budget.
        w = next(
            s for s in starts if s >= starts[first] and count_tokens(text[s:cursor0]) <= budget
        )
        steps = tuple(rng.randint(2, 6) for _ in range(n_requests))
        if cursor0 + sum(steps) > len(text):
            raise RuntimeError(f"{rel}: not enough text after the cursor")
        sessions.append(TypingSession(rel, header, text, w, cursor0, steps))
    return sessions


def _type(
    adapter: Adapter, port: int, sess: TypingSession, cap: float, out: list, t_end: float
) -> None:
    for i, prompt in enumerate(sess.prompts()):
        if i > 0 and time.perf_counter() > t_end:
            break
        r = send(port, adapter(Req(prompt, 32, ("\n",), stream=True)))
        out.append((r, "cold" if i == 0 else "cached"))


def editors(adapter: Adapter, port: int, sessions: list[TypingSession], cap: float) -> Outcome:
    """Run one typing session per editor, all at once (one thread each).

    Each editor sends its next request when the previous one finished (the user keeps
    typing but the editor has at most one suggestion in flight).
    """
    t0 = time.perf_counter()
    per: list[list] = [[] for _ in sessions]
    threads = [
        threading.Thread(target=_type, args=(adapter, port, s, cap, per[k], t0 + cap), daemon=True)
        for k, s in enumerate(sessions)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = [x for p in per for x in p]
    return Outcome(tuple(r for r, _ in flat), wall, tuple(tag for _, tag in flat))


# --------------------------------------------------------------------------- clients

PROMPTS = (
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\ndef main(argv):\n",
    "class Stack:\n    def __init__(self):\n",
    "# Parse a CSV file and return rows as dicts\ndef read_rows(path):\n",
    "from dataclasses import dataclass\n\n@dataclass\nclass Point:\n",
    "def quicksort(items):\n    if len(items) <= 1:\n",
    "async def fetch(session, url):\n",
    "SELECT name, count(*) FROM users\n",
    "def test_addition():\n    assert",
    "<html>\n<head>\n<title>",
    "for i in range(10):\n",
    "# Compute the SHA-256 of a file\nimport hashlib\n",
)


def clients(
    adapter: Adapter, port: int, concurrency: int, max_tokens: int, rounds: int, cap: float
) -> Outcome:
    """``concurrency`` clients, each sending ``rounds`` streamed requests back to back.

    Prompts are distinct per client (no shared prefix). Aggregate tokens/s is the sum of
    completion tokens over the wall time.
    """
    t0 = time.perf_counter()
    out: list[list[Result]] = [[] for _ in range(concurrency)]

    def run(k: int) -> None:
        for j in range(rounds):
            if j > 0 and time.perf_counter() > t0 + cap:
                break
            p = PROMPTS[(k + j * concurrency) % len(PROMPTS)] + f"# client {k} request {j}\n"
            out[k].append(send(port, adapter(Req(p, max_tokens, (), stream=True))))

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = tuple(r for rs in out for r in rs)
    return Outcome(flat, wall, ("",) * len(flat))


def browser(adapter: Adapter, port: int, n: int, max_tokens: int, cap: float) -> Outcome:
    """Sequential non-streamed requests (fastpilot: GET with a query string)."""
    t0 = time.perf_counter()
    res = []
    for i in range(n):
        if i > 0 and time.perf_counter() > t0 + cap:
            break
        res.append(
            send(
                port,
                adapter(Req(PROMPTS[i % len(PROMPTS)], max_tokens, (), stream=False, get=True)),
            )
        )
    return Outcome(tuple(res), time.perf_counter() - t0, ("",) * len(res))


DECODE_PROMPT = "def fibonacci(n):\n    "


def decode_probe(adapter: Adapter, port: int, max_tokens: int, reps: int) -> Outcome:
    """Single-stream decode speed: one short streamed prompt, ``reps`` times, one at a time.

    The first request is a warm-up and is dropped (it pays first-touch page faults).
    """
    send(port, adapter(Req(DECODE_PROMPT, 8, (), stream=True)))
    t0 = time.perf_counter()
    res = tuple(
        send(port, adapter(Req(DECODE_PROMPT, max_tokens, (), stream=True))) for _ in range(reps)
    )
    return Outcome(res, time.perf_counter() - t0, ("",) * len(res))
