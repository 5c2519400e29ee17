"""Helpers for tests that run ``fastpilot serve`` as a real process (this module holds no tests).

:class:`ServeProcess` starts ``python -m fastpilot.cli serve`` on 127.0.0.1
with port 0, waits for ``ready:``, and reads the process's resident memory,
thread count and open file descriptors from ``/proc`` (Linux); :meth:`ServeProcess.stop`
sends a signal and returns the exit code with the whole log in ``output``.
:func:`run_serve` runs the same command when it is expected to refuse and exit.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def serve_command(args: list[str]) -> list[str]:
    """``python -u -m fastpilot.cli serve --port 0 ARGS`` with this interpreter."""
    return [sys.executable, "-u", "-m", "fastpilot.cli", "serve", "--port", "0", *args]


def serve_env(env: dict[str, str] | None = None, unset: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment with this checkout importable first, plus ``env``, minus
    ``unset``. A ``PYTHONPATH`` already set stays behind the checkout (the GPU run's
    packages live there)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    out = {**os.environ, "PYTHONPATH": path, **(env or {})}
    for name in unset:
        out.pop(name, None)
    return out


def run_serve(
    args: list[str], *, unset: tuple[str, ...] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``fastpilot serve`` expected to exit on its own (a refusal); capture its output."""
    return subprocess.run(
        serve_command(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=serve_env(unset=unset),
        cwd=ROOT,
    )


class ServeProcess:
    """One ``fastpilot serve`` child process; use as a context manager."""

    def __init__(
        self, args: list[str], *, env: dict[str, str] | None = None, start_timeout: float = 120.0
    ) -> None:
        self.proc = subprocess.Popen(
            serve_command(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=serve_env(env),
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self.port = 0
        ready = False
        timer = threading.Timer(start_timeout, self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                self.lines.append(line)
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                if line.startswith("ready:"):
                    ready = True
                    break
        finally:
            timer.cancel()
        if not ready:
            self.proc.kill()
            raise RuntimeError("fastpilot serve did not start:\n" + "".join(self.lines))
        # Keep draining the log so the child never blocks on a full pipe.
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _read_rest(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if len(self.lines) < 100_000:
                self.lines.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        text = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(
                method,
                path,
                body=None if body is None else json.dumps(body),
                headers={"Content-Type": "application/json", **(headers or {})},
            )
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def stop(self, timeout: float = 30, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (killing after ``timeout`` s) and return the exit code; log complete."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._drain.join(10)  # the pipe closed with the process: the log is complete
        return self.proc.returncode

    @property
    def output(self) -> str:
        """Everything the process printed so far (all of it once :meth:`stop` returned)."""
        return "".join(self.lines)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
