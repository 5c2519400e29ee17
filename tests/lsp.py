"""A minimal LSP client over stdio for driving a real language server in tests (holds no tests).

:class:`LspClient` frames JSON-RPC messages with ``Content-Length`` headers,
reads the server's stdout on a thread, answers the server's own requests
(``workspace/configuration``, ``client/registerCapability``, progress
creation...) with empty results so it never waits on us, and keeps every
notification for inspection (``window/logMessage`` carries the server's log).
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from pathlib import Path
from typing import Any


class LspError(RuntimeError):
    """The server answered a request with a JSON-RPC error."""


class LspClient:
    """One language-server child process; use as a context manager."""

    def __init__(self, cmd: list[str], *, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
        )
        self._next_id = 0
        self._pending: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.notifications: list[dict[str, Any]] = []
        self.stderr_lines: list[str] = []
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._err_reader.start()

    def _send(self, message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode("utf-8")
        header = f"Content-Length: {len(body)}\r\n\r\n".encode("ascii")
        assert self.proc.stdin is not None
        with self._lock:
            self.proc.stdin.write(header + body)
            self.proc.stdin.flush()

    def _read_message(self) -> dict[str, Any] | None:
        out = self.proc.stdout
        assert out is not None
        length = None
        while True:
            line = out.readline()
            if not line:
                return None
            line = line.strip()
            if not line:
                break
            name, _, value = line.decode("ascii").partition(":")
            if name.lower() == "content-length":
                length = int(value.strip())
        if length is None:
            return None
        return json.loads(out.read(length))

    def _read_loop(self) -> None:
        while True:
            message = self._read_message()
            if message is None:
                for waiter in list(self._pending.values()):
                    waiter.put({"error": {"message": "language server exited"}})
                return
            if "id" in message and "method" in message:
                self._answer_server_request(message)
            elif "id" in message:
                waiter = self._pending.pop(message["id"], None)
                if waiter is not None:
                    waiter.put(message)
            else:
                self.notifications.append(message)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            if len(self.stderr_lines) < 10_000:
                self.stderr_lines.append(raw.decode("utf-8", "replace"))

    def _answer_server_request(self, message: dict[str, Any]) -> None:
        method = message["method"]
        result: Any = None
        if method == "workspace/configuration":
            result = [None for _ in message.get("params", {}).get("items", [])]
        elif method == "workspace/workspaceFolders":
            result = []
        self._send({"id": message["id"], "result": result})

    def request(self, method: str, params: Any, timeout: float = 60) -> Any:
        """Send a request and wait for its result; raise :class:`LspError` on an error answer."""
        with self._lock:
            self._next_id += 1
            msg_id = self._next_id
        waiter: queue.Queue[dict[str, Any]] = queue.Queue()
        self._pending[msg_id] = waiter
        self._send({"id": msg_id, "method": method, "params": params})
        try:
            answer = waiter.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no answer to {method} in {timeout}s; log:\n{self.log()}") from None
        if "error" in answer:
            raise LspError(f"{method}: {answer['error']}\nlog:\n{self.log()}")
        return answer.get("result")

    def notify(self, method: str, params: Any) -> None:
        self._send({"method": method, "params": params})

    def log(self) -> str:
        """The server's ``window/logMessage`` lines and stderr, for failure messages."""
        lines = [
            str(n.get("params", {}).get("message", ""))
            for n in self.notifications
            if n.get("method") == "window/logMessage"
        ]
        return "\n".join(lines[-200:]) + "\n--- stderr ---\n" + "".join(self.stderr_lines[-100:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request("shutdown", None, timeout=10)
                self.notify("exit", None)
                self.proc.wait(10)
            except (TimeoutError, LspError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> LspClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
