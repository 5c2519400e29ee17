"""Security properties, checked against every route the router has (not a hand-kept list).

- With keys set, every route but ``/health`` and ``/`` answers 401 without a
  key, with a wrong key, and with a wrong ``/k/<key>/`` prefix -- for every
  method the route implements -- and works with the right key either way.
- Keys are compared with :func:`hmac.compare_digest`, once per configured key,
  whatever matched (no early exit that would time which key is right).
- On a loopback bind, a foreign ``Host`` (DNS rebinding) is refused, over a real socket.
- CORS headers only for listed origins, never ``*``.
- No response body ever holds a traceback, a server path, or another request's text.
"""

from __future__ import annotations

import hmac
import http.client
import json
import re
import threading
from pathlib import Path

import falcon.testing
import pytest

from fastpilot.app import create_app
from fastpilot.backends.base import FimTemplate
from fastpilot.serve import start_in_thread
from fastpilot.settings import Settings
from tests.fakes import FakeBackend
from tests.test_api_support import make_registry, serving
from tests.test_openapi import app_routes

KEYS = ("k-first-0123456789", "k-second-abcdefghij", "k-third-zyxwvutsrq")
OPEN = {"/health", "/"}
ROOT = str(Path(__file__).resolve().parent.parent)

BODIES = {
    "/v1/completions": {"prompt": "x", "max_tokens": 1},
    "/v1/engines/{engine}/completions": {"prompt": "x", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
    "/ask": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
    "/v1/embeddings": {"input": "x"},
    "/v1/tokenize": {"prompt": "x"},
    "/v1/detokenize": {"tokens": [104]},
    "/tokenize": {"content": "x"},
    "/detokenize": {"tokens": [104]},
    "/telemetry": {"name": "event"},
    "/infill": {"input_prefix": "x", "input_suffix": "y", "n_predict": 1},
}


@pytest.fixture(scope="module")
def keyed():
    # A FIM template, so /infill answers 200 with the right key.
    registry = make_registry(("fake", FakeBackend(fim=FimTemplate("<PRE>", "<SUF>", "<MID>"))))
    app = create_app(Settings(api_key=KEYS), registry)
    yield falcon.testing.TestClient(app, headers={"Host": "127.0.0.1:5000"})
    registry.close_all()


def _concrete(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "fake", template)


def _cases(client) -> list[tuple[str, str, dict | None]]:
    cases = []
    for template, methods in sorted(app_routes(client.app).items()):
        for method in sorted(methods):
            body = BODIES.get(template) if method == "post" else None
            cases.append((method.upper(), template, body))
    return cases


def test_every_protected_route_needs_the_key(keyed):
    cases = _cases(keyed)
    assert len(cases) >= 19  # the router walk found the routes
    protected = 0
    for method, template, body in cases:
        path = _concrete(template)
        attempts = {
            "no key": (path, {}),
            "wrong key": (path, {"Authorization": "Bearer k-first-012345678X"}),
            "key prefix only": (path, {"Authorization": "Bearer k-first"}),
            "not bearer": (path, {"Authorization": f"Basic {KEYS[0]}"}),
            "wrong path key": (f"/k/nope{path}", {}),
            "empty path key": (f"/k/{path}", {}),
            "right key, wrong route prefix": (f"/k/{KEYS[0]}x{path}", {}),
        }
        for name, (url, headers) in attempts.items():
            resp = keyed.simulate_request(method, url, json=body, headers=headers)
            if template in OPEN and name in ("no key", "wrong key", "key prefix only",
                                             "not bearer"):  # fmt: skip
                assert resp.status_code == 200, (method, url, name)
                continue
            assert resp.status_code == 401, (method, url, name, resp.status_code)
            err = resp.json["error"]
            assert err["code"] == "invalid_api_key" and KEYS[0] not in resp.text
        if template not in OPEN:
            protected += 1
        for url, headers in (
            (path, {"Authorization": f"Bearer {KEYS[2]}"}),
            (f"/k/{KEYS[1]}{path}", {}),
        ):
            resp = keyed.simulate_request(method, url, json=body, headers=headers)
            assert resp.status_code == 200, (method, url, resp.text[:200])
    assert protected >= 17
    # Falcon's default OPTIONS responder is behind the key too while CORS is off.
    assert keyed.simulate_options("/v1/completions").status_code == 401


def test_keys_are_compared_in_constant_time(keyed, monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for given in (KEYS[0], KEYS[2], "wrong", KEYS[0][:-1], ""):
        for url, headers in (
            ("/v1/models", {"Authorization": f"Bearer {given}"}),
            (f"/k/{given}/v1/models", {}),
        ):
            calls.clear()
            keyed.simulate_get(url, headers=headers)
            if not given and url.startswith("/v1"):
                assert calls == []  # an empty bearer token is refused before comparing
                continue
            # One comparison per configured key, whichever matched, on the whole key.
            assert sorted(a for a, _ in calls) == sorted(k.encode() for k in KEYS), (given, url)
            assert all(b == given.encode() for _, b in calls)


# -- Host header (DNS rebinding), over a real socket ---------------------------------------------


@pytest.fixture(scope="module")
def live():
    settings = Settings(port=0, allowed_host=("fastpilot.internal",))
    with serving(settings, ("fake", FakeBackend())) as running:
        yield running


def _raw_get(port: int, head: bytes) -> tuple[int, bytes]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:5000", 200),
        ("localhost", 200),
        ("LOCALHOST:80", 200),
        ("[::1]:5000", 200),
        ("fastpilot.internal:8080", 200),
        ("evil.example", 403),
        ("evil.example:5000", 403),
        ("localhost.evil.example", 403),
        ("127.0.0.1.nip.io", 403),
        ("localhost.", 403),
        ("", 403),
    ],
)
def test_rebinding_hosts_are_refused_on_loopback(live, host, status):
    head = f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    got, body = _raw_get(live.port, head)
    assert got == status, (host, body[:200])
    if status == 403:
        assert json.loads(body)["error"]["code"] == "host_not_allowed"


def test_absolute_uri_cannot_smuggle_a_host(live):
    head = (
        b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert _raw_get(live.port, head)[0] == 403


# -- CORS ---------------------------------------------------------------------------------


def test_cors_only_for_listed_origins():
    registry = make_registry(("fake", FakeBackend()))
    allowed = "https://editor.example"
    try:
        for settings in (Settings(cors_origin=(allowed,)), Settings(cors_origin=(allowed,),
                                                                    api_key=KEYS)):  # fmt: skip
            headers = {"Host": "localhost", "Authorization": f"Bearer {KEYS[0]}"}
            c = falcon.testing.TestClient(create_app(settings, registry), headers=headers)
            for origin, expect in ((allowed, allowed), ("https://evil.example", None),
                                   ("null", None), (allowed + ".evil", None)):  # fmt: skip
                r = c.simulate_get("/v1/models", headers={"Origin": origin})
                assert r.headers.get("access-control-allow-origin") == expect, origin
                pre = c.simulate_options(
                    "/v1/completions",
                    headers={
                        "Origin": origin,
                        "Access-Control-Request-Method": "POST",
                        "Authorization": "",
                    },  # fmt: skip
                )
                assert pre.headers.get("access-control-allow-origin") == expect, origin
                assert "*" not in (r.headers.get("access-control-allow-origin") or "")
        off = falcon.testing.TestClient(create_app(Settings(), registry),
                                        headers={"Host": "localhost"})  # fmt: skip
        r = off.simulate_get("/v1/models", headers={"Origin": allowed})
        assert "access-control-allow-origin" not in r.headers
    finally:
        registry.close_all()


# -- nothing leaks into response bodies --------------------------------------------------------

MARKER = "PRIVATE-7f3a9c-do-not-leak"

BAD_INPUTS = [
    ("POST", "/v1/completions", b"{oops"),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": "ten"}'),
    ("POST", "/v1/completions", b'{"prompt": "x", "n": 1e400}'),
    ("POST", "/v1/completions", b'{"prompt": "x", "logit_bias": {"abc": 1}}'),
    (
        "POST",
        "/v1/completions",
        b'{"prompt": "x", "stop": %s}' % json.dumps(list(map(str, range(33)))).encode(),
    ),
    ("POST", "/v1/completions", b'{"prompt": "' + b"x" * 400 + b'", "max_tokens": 4}'),
    ("POST", "/v1/completions", b"[" * 5000),
    ("POST", "/v1/completions", b'{"prompt": "\\ud800"}'),
    ("POST", "/v1/completions", b'{"prompt": [999999999]}'),
    ("POST", "/v1/completions", b"\xff\xfe\xfd"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": {"x": 1}}]}'),
    ("POST", "/v1/chat/completions", b'{"messages": "hi"}'),
    ("POST", "/ask", b'{"messages": []}'),
    ("POST", "/v1/embeddings", b'{"input": {"a": 1}}'),
    ("POST", "/v1/embeddings", b'{"input": "x", "encoding_format": "hex"}'),
    ("POST", "/v1/tokenize", b'{"prompt": 5}'),
    ("POST", "/v1/detokenize", b'{"tokens": [-1]}'),
    ("GET", "/v1/completions?max_tokens=%ff", None),
    ("GET", "/v1/completions?n=1&n=2", None),
    ("GET", "/v1/models/does-not-exist", None),
    ("GET", "/v1/nothing/here", None),
    ("DELETE", "/v1/completions", None),
    ("PUT", "/health", None),
    ("GET", "/../../../etc/passwd", None),
    ("GET", "/v1/engines/..%2F..%2Fetc%2Fpasswd/completions?prompt=x", None),
    ("POST", "/v1/engines/%00/completions", b'{"prompt": "x", "max_tokens": 1}'),
]


def test_error_bodies_never_leak(tmp_path):
    fast = FakeBackend()
    registry = make_registry(("fake", fast))
    settings = Settings(port=0, max_body_bytes=64 * 1024, strict_models=True)
    running = start_in_thread(create_app(settings, registry), settings)
    bodies: list[bytes] = []
    stop = threading.Event()

    def private_traffic() -> None:
        # Another user's prompt, in flight the whole time, in every form.
        while not stop.is_set():
            for body in (
                {"model": "fake", "prompt": MARKER, "max_tokens": 2, "stream": True},
                {"model": "fake", "messages": [{"role": "user", "content": MARKER}]},
            ):
                path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
                conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
                conn.request("POST", path, body=json.dumps(body),
                             headers={"Content-Type": "application/json"})  # fmt: skip
                conn.getresponse().read()
                conn.close()

    worker = threading.Thread(target=private_traffic)
    worker.start()
    try:
        for _ in range(3):
            for method, path, raw in BAD_INPUTS:
                conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
                headers = {"Content-Type": "application/json"} if raw is not None else {}
                conn.request(method, path, body=raw, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                assert 400 <= resp.status < 500, (method, path, resp.status, data[:200])
                assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}
                bodies.append(data)
        for path in ("/metrics", "/v1/models", "/health", "/openapi.json"):
            conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
            conn.request("GET", path)
            bodies.append(conn.getresponse().read())
            conn.close()
    finally:
        stop.set()
        worker.join(10)
        running.stop()
        registry.close_all()
    leaks = (MARKER, "Traceback", 'File "', ROOT, "site-packages", "/root", "/home", "/tmp",
             str(tmp_path))  # fmt: skip
    for data in bodies:
        text = data.decode("utf-8", "replace")
        for leak in leaks:
            assert leak not in text, (leak, text[:300])
