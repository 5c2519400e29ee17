"""End to end against a real waitress server (in a thread) over the engine's FakeBackend.

What only a real socket shows: each SSE event leaves when its token is made
(no buffering in waitress), a client that hangs up cancels its generation,
concurrent streams, real clients (the ``openai`` package, ``curl``, raw
HTTP as a browser or the Copilot plugin sends it), and the server surviving
every kind of bad input.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest

from fastpilot.app import create_app
from fastpilot.backends.base import FinishReason
from fastpilot.serve import start_in_thread
from fastpilot.settings import Settings
from tests.fakes import FakeBackend
from tests.gates import WorkerGate, wait_until
from tests.test_api_support import make_registry

SCRIPT = " world\n\ndef fib(n):\n    return n\n"
STEP = 0.03  # seconds per decode round of the fake backend


@pytest.fixture(scope="module")
def server():
    fast = FakeBackend()
    slow = FakeBackend(step_delay=STEP)
    registry = make_registry(("fake", fast), ("slow", slow))
    settings = Settings(port=0, max_body_bytes=64 * 1024, api_key=(), slots=8)
    app = create_app(settings, registry)
    running = start_in_thread(app, settings, n_models=2)
    running.fast = fast
    running.slow = slow
    yield running
    running.stop()
    registry.close_all()


def post(server, path: str, body, *, headers=None, raw: bytes | None = None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers or {})
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body), headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def health_ok(server) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status == 200


def raw_stream(server, body: dict, path="/v1/completions"):
    """Open a raw socket, send one streaming POST, return the socket."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        + payload
    )
    return sock


def read_events_timed(sock: socket.socket, limit: int | None = None, *, headers: bool = True):
    """(arrival time, event payload) for each complete SSE event, as bytes arrive.

    ``headers=False`` goes on reading a response whose headers an earlier call consumed.
    """
    buf = b""
    events = []
    header_done = not headers
    while True:
        chunk = sock.recv(65536)
        now = time.monotonic()
        if not chunk:
            break
        buf += chunk
        if not header_done:
            if b"\r\n\r\n" not in buf:
                continue
            head, buf = buf.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200"), head
            header_done = True
        # Chunked transfer framing: strip "<hex>\r\n" ... "\r\n" around events.
        while b"data: " in buf and b"\n\n" in buf[buf.index(b"data: ") :]:
            start = buf.index(b"data: ")
            end = buf.index(b"\n\n", start)
            events.append((now, buf[start + 6 : end].decode()))
            buf = buf[end + 2 :]
            if events[-1][1] == "[DONE]" or (limit and len(events) >= limit):
                return events
    return events


# -- streaming really streams -----------------------------------------------------------


def test_events_reach_the_socket_as_tokens_are_made(server, monkeypatch):
    n_tokens = 20
    # The worker parks after its 6th token: the events of the tokens made so far must
    # reach the socket while it waits. Had waitress buffered the response, they would
    # arrive only with the rest, after the gate let go.
    gate = WorkerGate(monkeypatch, server.slow, after=6, timeout=20)
    try:
        sock = raw_stream(
            server,
            {
                "model": "slow",
                "prompt": "hello",
                "max_tokens": n_tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            },
        )
        # The lookahead holds one delta back, so tokens 1..5 are sendable at the gate.
        early = read_events_timed(sock, limit=5)
        assert len(early) == 5 and gate.parked.is_set() and not gate.expired
        assert server.slow.decode_steps == 6  # the worker is still parked
        gate.release()
        events = early + read_events_timed(sock, headers=False)
    finally:
        gate.release()
    sock.close()
    assert events[-1][1] == "[DONE]"
    content = [json.loads(e) for _, e in events[:-1]]
    assert len(content) >= n_tokens - 2


def test_disconnect_mid_stream_cancels_generation(server):
    slow = server.slow
    sock = raw_stream(
        server,
        {
            "model": "slow",
            "prompt": "hello",
            "max_tokens": 120,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        },
    )
    got = read_events_timed(sock, limit=3)
    assert len(got) == 3
    assert slow.stats()["queue_depth"] == 1.0
    steps_at_close = slow.decode_steps
    sock.close()
    assert wait_until(lambda: slow.stats()["queue_depth"] == 0, 30), (
        "the hung-up stream still occupies the backend"
    )
    assert slow.streams[-1].finish_reason is FinishReason.CANCELLED
    steps = slow.decode_steps
    time.sleep(5 * STEP)
    assert slow.decode_steps == steps  # nothing decodes for nobody
    # Freed within a few steps of the hang-up, not the 117 the run had left; the bound
    # leaves the server ~1.7 s (at 30 ms a step) to notice, for a loaded machine.
    assert steps - steps_at_close < (120 - 3) // 2
    # The next request is not delayed by the abandoned one: its 3 tokens are the only
    # steps the backend takes.
    resp, data = post(
        server, "/v1/completions", {"model": "slow", "prompt": "hello", "max_tokens": 3}
    )
    assert resp.status == 200
    assert slow.decode_steps - steps == 3


def _copilot_parse(body: bytes) -> tuple[dict[int, str], list[dict]]:
    """The Copilot plugin's parser: split on \\n, drop 'data:', JSON.parse each line alone."""
    texts: dict[int, str] = {}
    events = []
    for line in body.decode().split("\n"):
        if not line.strip():
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        event = json.loads(payload)  # must not fail: one event per line
        events.append(event)
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts, events


def test_copilot_style_client(server):
    body = {
        "prompt": "# Path: fib.py\nhello",
        "suffix": "",
        "max_tokens": 500,
        "temperature": 0,
        "top_p": 1,
        "n": 3,
        "stop": ["\n\n\n"],
        "stream": True,
        "logprobs": 2,
        "logit_bias": {"50256": -100},
        "nwo": "me/repo",
        "extra": {"language": "python", "next_indent": 0, "trim_by_indentation": True},
        "feature_flags": [],
    }
    resp, data = post(
        server,
        "/k/anything/v1/engines/copilot-codex/completions",
        body,
        headers={
            "Authorization": "Bearer ghu_github_token",
            "X-Request-Id": "copilot-1",
            "OpenAI-Intent": "copilot-ghost",
        },
    )
    assert resp.status == 200
    assert resp.getheader("x-request-id") == "copilot-1"
    assert int(resp.getheader("openai-processing-ms")) >= 0
    texts, events = _copilot_parse(data)
    # trim_by_indentation with next_indent 0: the block ends before "def" at column 0.
    block = " world\n"
    assert texts == {0: block, 1: block, 2: block}
    assert all(e["id"] and e["created"] > 0 for e in events)
    lps = [c["logprobs"] for e in events for c in e["choices"] if c["logprobs"]]
    assert lps and all(x < 0 for lp in lps for x in lp["token_logprobs"])


def test_eight_concurrent_streams(server, monkeypatch):
    results: dict[int, object] = {}
    slow = server.slow
    before = len(slow.streams)
    # The worker parks after the first token: all eight requests must reach the backend
    # while it waits -- served side by side, not one after another.
    gate = WorkerGate(monkeypatch, after=1, timeout=60)

    def one(i: int) -> None:
        try:
            resp, data = post(
                server,
                "/v1/completions",
                {
                    "model": "slow",
                    "prompt": "hello",
                    "max_tokens": 40,
                    "temperature": 0,
                    "stream": True,
                },
            )
            texts, _ = _copilot_parse(data)
            results[i] = (resp.status, texts.get(0))
        except Exception as ex:  # pragma: no cover - reported below
            results[i] = ex

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        # Served one at a time, the second would wait for the first, held at the gate.
        assert wait_until(lambda: len(slow.streams) - before == 8, 30), len(slow.streams)
        assert not gate.expired
    finally:
        gate.release()
    for t in threads:
        t.join(30)
    assert results == {i: (200, SCRIPT) for i in range(8)}


# -- real clients -------------------------------------------------------------------------


def test_openai_package(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="fake", prompt="hello", max_tokens=40, temperature=0)
    assert out.choices[0].text == SCRIPT and out.usage.completion_tokens > 0
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model="fake", prompt="hello", max_tokens=40, temperature=0, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == SCRIPT and len(pieces) > 3
    chat = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=40, temperature=0
    )
    assert chat.choices[0].message.content == SCRIPT
    deltas = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=40,
            temperature=0,
            stream=True,
        )
    ]
    assert "".join(deltas) == SCRIPT
    assert sorted(m.id for m in client.models.list()) == ["fake", "slow"]
    emb = client.embeddings.create(model="fake", input=["hello", "def"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 16
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="fake", prompt="x", max_tokens=5, n=100)
    assert info.value.body["param"] == "n"


def test_browser_get_with_query(server):
    query = urllib.parse.urlencode(
        {"prompt": "hello", "max_tokens": 40, "n": 2, "temperature": 0, "echo": "true"}
    )
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "GET",
        f"/v1/engines/117M/completions?{query}",
        headers={"Accept": "text/html,application/xhtml+xml", "User-Agent": "Mozilla/5.0"},
    )
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 200
    assert [c["text"] for c in body["choices"]] == ["hello" + SCRIPT] * 2


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(server):
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            server.url + "/v1/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps({"prompt": "hello", "max_tokens": 40, "temperature": 0}),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(out.stdout)["choices"][0]["text"] == SCRIPT
    out = subprocess.run(
        [
            "curl",
            "-sSN",
            server.url + "/v1/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps({"prompt": "hello", "max_tokens": 40, "temperature": 0, "stream": True}),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.endswith("data: [DONE]\n\n")
    # curl -d without a JSON content type gets a 415 that says what to do.
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            server.url + "/v1/completions",
            "-d",
            json.dumps({"prompt": "hello"}),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "415" and "application/json" in json.loads(body)["error"]["message"]


# -- bad input battery --------------------------------------------------------------------


BAD = [
    ("wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("n over cap", "/v1/completions", {"prompt": "x", "n": 99}, 400, "n"),
    ("logprobs 6", "/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    (
        "33 stops",
        "/v1/completions",
        {"prompt": "x", "stop": [f"s{i}" for i in range(33)]},
        400,
        "stop",
    ),
    ("context too long", "/v1/completions", {"prompt": "x" * 300, "max_tokens": 4}, 400, "prompt"),
    ("bad messages", "/v1/chat/completions", {"messages": [{"role": "robot"}]}, 400, "messages"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_battery(server, name, path, body, status, param):
    resp, data = post(server, path, body)
    assert resp.status == status
    err = json.loads(data)["error"]
    assert err["param"] == param and err["message"]
    assert health_ok(server)


def test_truncation_on_engine_route(server):
    resp, data = post(
        server, "/v1/engines/codegen/completions", {"prompt": "x" * 300, "max_tokens": 4}
    )
    assert resp.status == 200
    assert json.loads(data)["usage"]["prompt_tokens"] <= 128


def test_protocol_errors_over_the_wire(server):
    cases = [
        (
            "invalid json",
            "POST",
            "/v1/completions",
            b"{oops",
            {"Content-Type": "application/json"},
            400,
        ),
        (
            "form body",
            "POST",
            "/v1/completions",
            b"prompt=x",
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
        ),
        ("method", "PUT", "/v1/completions", b"{}", {"Content-Type": "application/json"}, 405),
        ("route", "GET", "/v1/nothing", None, {}, 404),
        (
            "too large",
            "POST",
            "/v1/completions",
            b'{"prompt": "' + b"x" * 70000 + b'"}',
            {"Content-Type": "application/json"},
            413,
        ),
        ("rebinding", "GET", "/v1/models", None, {"Host": "attacker.example"}, 403),
    ]
    for name, method, path, body, headers, status in cases:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        assert resp.status == status, (name, data)
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "param", "code"}, name
        assert health_ok(server), name


def test_chunked_body_over_cap_is_413(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    body = b'{"prompt": "' + b"y" * 70000 + b'"}'
    chunked = (
        b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 8192]), body[i : i + 8192])
            for i in range(0, len(body), 8192)
        )
        + b"0\r\n\r\n"
    )
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked
    )
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert health_ok(server)
