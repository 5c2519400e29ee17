"""A recording HTTP relay for end-to-end client tests (holds no tests).

:class:`Recorder` listens on 127.0.0.1, forwards every request unchanged to a
real ``fastpilot serve`` and keeps each exchange (method, path, request
headers and body, status, response body), so a test can compare what a real
client shows its user with what fastpilot answered to the exact request the
client sent. It buffers each answer before relaying it (a client reading SSE
still gets the same bytes, only later) and copies the status and headers.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Per-connection headers that a relay must not copy (RFC 9110 section 7.6.1). Host is
# kept: fastpilot builds URLs back to itself from it, and those must lead here again.
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass(frozen=True, slots=True)
class Exchange:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    response: bytes


class Recorder:
    """Relay to ``127.0.0.1:<upstream_port>``; ``exchanges`` grows as requests pass."""

    def __init__(self, upstream_port: int) -> None:
        self.exchanges: list[Exchange] = []
        lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=300)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
                    status = resp.status
                finally:
                    conn.close()
                with lock:
                    recorder.exchanges.append(
                        Exchange(self.command, self.path, headers, body, status, data)
                    )
                self.send_response(status)
                for key, value in out_headers:
                    if key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _relay

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def matching(self, fragment: str) -> list[Exchange]:
        """The exchanges whose path contains ``fragment``, oldest first."""
        return [e for e in list(self.exchanges) if fragment in e.path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
