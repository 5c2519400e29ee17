"""Several replicas behind nginx: the tested recipe of docs/team.md (slow; needs ``nginx``).

Two ``fastpilot serve`` replicas (the tiny random GPT-2, GGUF) and nginx as the
load balancer, all on loopback, nginx's config and temp paths in a tmp dir
(``daemon off``, ``-p``/``-e`` so it never touches /etc or /var, fine as non-root).
Checked:

- SSE passes through unbuffered: events reach the client one by one while the
  replica is still generating (a replica whose backend takes 50 ms per token,
  so the timing is visible), and a client hanging up at nginx cancels the
  generation at the replica. (nginx 1.22 also forwards chunked SSE early with
  ``proxy_buffering on``; the setting matters for slow clients, whose output
  nginx would otherwise spool to disk while the replica keeps generating.)
- ``hash $http_authorization consistent`` keeps one client (one API key) on one
  replica, so its prompt cache stays warm there; several clients use both.
- Killing a replica fails over: the next requests of its clients succeed on
  the other one.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fastpilot.backends.base import FinishReason
from fastpilot.settings import Settings
from tests.fakes import FakeBackend
from tests.servers import ServeProcess
from tests.test_api_support import serving

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed"),
]

KEYS = [f"team-key-{i:02d}" for i in range(8)]
STEP = 0.05  # seconds per token of the slow replica

# The recipe (docs/team.md shows the same block). {upstreams} and {listen} are filled in.
RECIPE = """
upstream fastpilot {{
    # One client (one API key) -> one replica, so its prompt cache stays warm.
    # "consistent" (ketama) moves only that replica's clients when one is added or lost.
    hash $http_authorization consistent;
{upstreams}
    keepalive 16;
}}

server {{
    listen {listen};

    location / {{
        proxy_pass http://fastpilot;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        # SSE: send every event as it comes; never collect the response first.
        proxy_buffering {buffering};
        proxy_cache off;
        proxy_read_timeout 600s;
        client_max_body_size 8m;
        # A replica that refuses connections or dies before answering: try the next.
        proxy_next_upstream error timeout http_502 http_503;
        proxy_next_upstream_tries 2;
        add_header X-Upstream $upstream_addr always;
    }}
}}
"""

MAIN = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    {recipe}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, tmp: Path, ports: list[int], *, buffered: bool = False) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        upstreams = "\n".join(
            f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;" for p in ports
        )
        recipe = RECIPE.format(
            upstreams=upstreams,
            listen=f"127.0.0.1:{self.port}",
            buffering="on" if buffered else "off",
        )
        conf = tmp / "nginx.conf"
        conf.write_text(MAIN.format(tmp=tmp, recipe=recipe))
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        log = (tmp / "error.log").read_text() if (tmp / "error.log").exists() else ""
        raise RuntimeError(f"nginx did not start: {self.proc.stdout.read()!r} {log}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def replicas(tiny_gpt2_models, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("\n".join(KEYS) + "\n")
    args = ["--model", f"tiny={tiny_gpt2_models['gguf-q4_k_m']}", "--threads", "1",
            "--slots", "16", "--api-key-file", str(keys)]  # fmt: skip
    procs = [ServeProcess(args), ServeProcess(args)]
    yield procs
    for p in procs:
        p.stop()


def call(port: int, body: dict, key: str, path: str = "/v1/completions"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=json.dumps(body),
                 headers={"Content-Type": "application/json",
                          "Authorization": f"Bearer {key}"})  # fmt: skip
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheader("X-Upstream"), data


@pytest.fixture(scope="module")
def slow_replica():
    """The real app on waitress over a backend that takes 50 ms per token (timing is visible)."""
    backend = FakeBackend(step_delay=STEP)
    with serving(Settings(port=0), ("slow", backend)) as running:
        running.backend = backend
        yield running


def open_stream(port: int, tokens: int) -> tuple[socket.socket, float]:
    body = json.dumps({"prompt": "hello", "max_tokens": tokens, "ignore_eos": True,
                       "stream": True}).encode()  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock, time.monotonic()


def arrivals(sock: socket.socket, t0: float, limit: int | None = None) -> list[tuple[float, int]]:
    """(seconds since the request, events in that read) per read, until [DONE] or ``limit``."""
    data, out = b"", []
    while b"data: [DONE]" not in data and (limit is None or sum(n for _, n in out) < limit):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        out.append((time.monotonic() - t0, chunk.count(b"data: {")))
    return out


def test_streaming_passes_through_unbuffered(slow_replica, tmp_path):
    nginx = Nginx(tmp_path / "stream", [slow_replica.port])
    try:
        sock, t0 = open_stream(nginx.port, 30)
        got = arrivals(sock, t0)
        sock.close()
    finally:
        nginx.stop()
    times = [t for t, n in got if n]
    assert sum(n for _, n in got) >= 25  # a token that ends mid-character makes no event
    # 30 tokens at 50 ms: events arrive one by one over ~1.5 s, not together at the end.
    assert times[0] < 0.5 and times[-1] - times[0] >= 0.6 * 25 * STEP, times
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert sum(g >= STEP / 3 for g in gaps) >= 0.7 * len(gaps), gaps
    print(f"\nnginx stream: first event {times[0]:.3f}s, last {times[-1]:.3f}s, {len(times)} reads")


def test_hangup_through_nginx_cancels_generation(slow_replica, tmp_path):
    backend = slow_replica.backend
    nginx = Nginx(tmp_path / "hangup", [slow_replica.port])
    try:
        sock, t0 = open_stream(nginx.port, 100)  # 5 s of generation
        assert sum(n for _, n in arrivals(sock, t0, limit=3)) >= 3
        sock.close()
        deadline = time.monotonic() + 3
        while backend.stats()["queue_depth"] > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        freed = time.monotonic() - (deadline - 3)
        assert backend.stats()["queue_depth"] == 0 and freed < 1.5, freed
        assert backend.streams[-1].finish_reason == FinishReason.CANCELLED
    finally:
        nginx.stop()


def test_one_client_sticks_to_one_replica_and_its_cache_stays_warm(replicas, tmp_path):
    nginx = Nginx(tmp_path / "sticky", [r.port for r in replicas])
    try:
        seen: dict[str, set[str]] = {}
        cached: dict[str, list[int]] = {}
        for round_ in range(4):
            for key in KEYS:
                prompt = f"# client {key}\n" + "import os\nimport sys\n" * 6 + f"x = {round_}\n"
                status, upstream, data = call(nginx.port, {"prompt": prompt, "max_tokens": 4,
                                                           "temperature": 0}, key)  # fmt: skip
                assert status == 200, data
                seen.setdefault(key, set()).add(upstream)
                usage = json.loads(data)["usage"]
                cached.setdefault(key, []).append(
                    (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                )
        assert all(len(ups) == 1 for ups in seen.values()), seen
        assert len(set().union(*seen.values())) == 2, seen  # the clients use both replicas
        # Back on the same replica, each client's shared prefix comes from its prompt cache.
        assert all(c[-1] > 0 for c in cached.values()), cached
        print(f"\nsticky: {sorted((k, sorted(v)[0]) for k, v in seen.items())}")
    finally:
        nginx.stop()


def test_killing_a_replica_fails_over(replicas, tmp_path):
    nginx = Nginx(tmp_path / "failover", [r.port for r in replicas])
    try:
        home = {}
        for key in KEYS:
            status, upstream, _ = call(nginx.port, {"prompt": "x", "max_tokens": 2}, key)
            assert status == 200
            home[key] = upstream
        victim = replicas[0]
        victim_addr = f"127.0.0.1:{victim.port}"
        moved = [k for k, up in home.items() if up == victim_addr]
        assert moved, home
        victim.proc.kill()
        victim.proc.wait(10)
        results = []
        for key in KEYS:
            for body in ({"prompt": "x", "max_tokens": 2},
                         {"prompt": "x", "max_tokens": 8, "stream": True}):  # fmt: skip
                status, upstream, data = call(nginx.port, body, key)
                results.append((key, status, upstream))
                assert status == 200, (key, data[:200])
                assert upstream.split(", ")[-1] == f"127.0.0.1:{replicas[1].port}"
                if body.get("stream"):
                    assert data.endswith(b"data: [DONE]\n\n")
        print(f"\nfailover: {len(moved)} clients moved, {len(results)} requests after the kill "
              "all 200")  # fmt: skip
    finally:
        nginx.stop()
