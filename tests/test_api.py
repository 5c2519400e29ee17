"""The app through falcon.testing.TestClient over the engine's FakeBackend.

FakeBackend greedily writes its script (" world\\n\\ndef fib(n):\\n    return n\\n"),
so expected texts are exact.
"""

from __future__ import annotations

import json
import logging
import re

import pytest

from fastpilot.settings import Settings
from tests.fakes import FakeBackend
from tests.test_api_support import CREATED, client, joined_text, make_registry, sse_events

SCRIPT = " world\n\ndef fib(n):\n    return n\n"


@pytest.fixture
def api():
    c, backend, registry = client()
    yield c
    registry.close_all()


def error_of(result, status: int) -> dict:
    assert result.status_code == status, result.text
    body = result.json
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    return err


# -- completions ----------------------------------------------------------------------


def test_post_completion_greedy_text_and_usage(api):
    r = api.simulate_post(
        "/v1/completions", json={"prompt": "hello", "max_tokens": 40, "temperature": 0}
    )
    assert r.status_code == 200
    body = r.json
    assert body["object"] == "text_completion"
    assert body["created"] == CREATED and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == SCRIPT
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 1  # "hello" is one token in the fake vocab
    assert body["usage"]["completion_tokens"] > 0
    assert r.headers["openai-model"] == "fake"
    assert r.headers["x-request-id"].startswith("req-")
    assert int(r.headers["openai-processing-ms"]) >= 0


def test_request_id_is_echoed(api):
    r = api.simulate_post(
        "/v1/completions",
        json={"prompt": "x", "max_tokens": 1},
        headers={"X-Request-Id": "abc-123"},
    )
    assert r.headers["x-request-id"] == "abc-123"
    # A header that could break the log line is replaced, not echoed.
    r = api.simulate_post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": "a b\tc"}
    )
    assert r.headers["x-request-id"] != "a b\tc"


def test_get_form_reads_typed_query(api):
    r = api.simulate_get(
        "/v1/engines/codegen/completions",
        query_string="prompt=hello&max_tokens=40&temperature=0&echo=false&stop=def&stop=%0A%0A&n=2",
    )
    assert r.status_code == 200, r.text
    choices = r.json["choices"]
    assert len(choices) == 2
    # echo=false means false; the first stop ("\n\n") cuts before "def".
    assert [c["text"] for c in choices] == [" world", " world"]
    assert all(c["finish_reason"] == "stop" for c in choices)


def test_get_form_echo_true_and_logit_bias_json(api):
    r = api.simulate_get(
        "/v1/completions",
        query_string="prompt=hello&max_tokens=2&temperature=0&echo=true&logit_bias="
        + '{"257": -100}'.replace('"', "%22").replace(" ", "%20"),
    )
    assert r.status_code == 200, r.text
    text = r.json["choices"][0]["text"]
    assert text.startswith("hello")
    assert " world" not in text  # token 257 (" world") is banned


def test_get_form_bad_values(api):
    err = error_of(
        api.simulate_get("/v1/completions", query_string="prompt=x&max_tokens=lots"), 400
    )
    assert err["param"] == "max_tokens"
    err = error_of(
        api.simulate_get("/v1/completions", query_string="prompt=x&logit_bias={bad"), 400
    )
    assert err["param"] == "logit_bias"
    err = error_of(api.simulate_get("/v1/completions", query_string="prompt=x&n=1&n=2"), 400)
    assert err["param"] == "n"


def test_stream_events_single_line_with_finish_on_last_content(api):
    r = api.simulate_post(
        "/v1/engines/copilot-codex/completions",
        json={"prompt": "hello", "max_tokens": 40, "temperature": 0, "stream": True},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert len(events) > 3
    assert joined_text(events) == SCRIPT
    assert all(e["id"] == events[0]["id"] and e["created"] == CREATED for e in events)
    reasons = [e["choices"][0]["finish_reason"] for e in events]
    assert reasons[-1] == "stop" and all(x is None for x in reasons[:-1])
    assert events[-1]["choices"][0]["text"]  # finish_reason rides on text, not an empty event


def test_stream_include_usage(api):
    r = api.simulate_post(
        "/v1/completions",
        json={
            "prompt": "hello",
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse_events(r.content)
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 5


def test_logprobs_are_numbers(api):
    r = api.simulate_post(
        "/v1/completions",
        json={"prompt": "hello", "max_tokens": 4, "temperature": 0, "logprobs": 2},
    )
    lp = r.json["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 4
    assert all(x < 0 for x in lp["token_logprobs"])
    assert all(len(t) >= 2 for t in lp["top_logprobs"])


def test_suffix_without_fim_sets_header(api):
    r = api.simulate_post(
        "/v1/completions", json={"prompt": "hello", "suffix": "end", "max_tokens": 2}
    )
    assert r.status_code == 200
    assert r.headers.get("x-fastpilot-suffix") == "ignored"
    r = api.simulate_post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
    assert "x-fastpilot-suffix" not in r.headers


def test_context_modes_differ_by_route(api):
    long_prompt = "x" * 200  # 200 tokens > 128 context
    err = error_of(
        api.simulate_post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 5}), 400
    )
    assert err["code"] == "context_length_exceeded"
    r = api.simulate_post(
        "/v1/completions", json={"prompt": long_prompt, "max_tokens": 5, "truncate": True}
    )
    assert r.status_code == 200
    r = api.simulate_post(
        "/v1/engines/codegen/completions", json={"prompt": long_prompt, "max_tokens": 5}
    )
    assert r.status_code == 200
    assert r.json["usage"]["prompt_tokens"] < 128


# -- other routes ---------------------------------------------------------------------


def test_chat_ask_embeddings(api):
    msgs = [{"role": "user", "content": "hi"}]
    r = api.simulate_post(
        "/v1/chat/completions", json={"messages": msgs, "max_tokens": 40, "temperature": 0}
    )
    assert r.status_code == 200
    # Exactly as generated: the script's leading space is the model's, not noise.
    assert r.json["choices"][0]["message"]["content"] == SCRIPT
    r = api.simulate_post(
        "/v1/chat/completions",
        json={"messages": msgs, "max_tokens": 40, "temperature": 0, "stream": True},
    )
    events = sse_events(r.content)
    assert events[0]["object"] == "chat.completion.chunk"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == SCRIPT
    r = api.simulate_post("/ask", json={"messages": msgs, "max_tokens": 40, "temperature": 0})
    assert r.json["reply"] == SCRIPT
    assert r.json["usage"]["completion_tokens"] > 0
    err = error_of(api.simulate_post("/v1/chat/completions", json={"messages": "hi"}), 400)
    assert err["param"] == "messages"
    r = api.simulate_post("/v1/embeddings", json={"input": ["hello", "def"]})
    data = r.json["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert len(data[0]["embedding"]) == 16 and data[0]["embedding"] != data[1]["embedding"]
    err = error_of(api.simulate_post("/v1/embeddings", json={"input": 5}), 400)
    assert err["param"] == "input"


def test_listings_and_lookup(api):
    models = api.simulate_get("/v1/models").json
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["fake"]
    assert models["data"][0]["object"] == "model" and models["data"][0]["context_length"] == 128
    for path in ("/v1/engines", "/v1/engines/list"):
        data = api.simulate_get(path).json["data"]
        assert data[0]["object"] == "engine" and data[0]["id"] == "fake"
    assert api.simulate_get("/v1/engines/whatever-copilot-sends").json["id"] == "fake"
    assert api.simulate_get("/v1/models/fake").json["id"] == "fake"
    err = error_of(api.simulate_get("/v1/models/nope"), 404)
    assert err["code"] == "model_not_found"


def test_tokenize_roundtrip(api):
    r = api.simulate_post("/v1/tokenize", json={"prompt": "hello world"})
    assert r.json["tokens"] == [256, 257] and r.json["count"] == 2
    r = api.simulate_post("/v1/detokenize", json={"tokens": [256, 257]})
    assert r.json["text"] == "hello world"
    err = error_of(api.simulate_post("/v1/detokenize", json={"tokens": [10**6]}), 400)
    assert err["param"] == "tokens"


def test_health_metrics_token(api):
    assert api.simulate_get("/health").json == {"status": "ok", "models": ["fake"]}
    api.simulate_post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
    text = api.simulate_get("/metrics").text
    assert 'fastpilot_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert 'fastpilot_tokens_total{kind="completion",model="fake"} 3.0' in text
    assert "fastpilot_request_seconds_bucket" in text
    assert 'fastpilot_model_backend_queue_depth{model="fake"}' in text
    tok = api.simulate_get("/copilot_internal/v2/token").json
    assert tok["expires_at"] > CREATED and tok["endpoints"]["api"] == "http://127.0.0.1:5000/"


def test_health_503_while_loading(caplog):
    c, _, registry = client()
    registry.loading = True
    try:
        with caplog.at_level(logging.INFO, logger="fastpilot"):
            err = error_of(c.simulate_get("/health"), 503)
            assert err["code"] == "model_loading"
            assert c.simulate_post("/v1/completions", json={"prompt": "x"}).status_code == 503
        # A load in progress is a state, not a failure: no error (and no traceback) per poll.
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        registry.close_all()


def test_playground_page(api):
    r = api.simulate_get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<script" in r.text and "https://" not in r.text  # self-contained, no CDN
    assert "const AUTH_REQUIRED = false;" in r.text


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "temperature": [1]}, "temperature"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "n": 17}, "n"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "stop": [f"s{i}" for i in range(33)]}, "stop"),
        ({"prompt": "x", "echo": "maybe"}, "echo"),
        ({"prompt": "x", "model": 3}, "model"),
    ],
)
def test_bad_values_400(api, body, param):
    err = error_of(api.simulate_post("/v1/completions", json=body), 400)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_body_and_protocol_errors(api):
    err = error_of(
        api.simulate_post(
            "/v1/completions", body="{not json", headers={"Content-Type": "application/json"}
        ),
        400,
    )
    assert err["code"] == "invalid_json"
    err = error_of(
        api.simulate_post(
            "/v1/completions", body="[1,2]", headers={"Content-Type": "application/json"}
        ),
        400,
    )
    assert err["code"] == "invalid_json"
    err = error_of(
        api.simulate_post(
            "/v1/completions",
            body="prompt=x",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        415,
    )
    assert "application/json" in err["message"]
    # charset is fine, and so is no content type at all.
    r = api.simulate_post(
        "/v1/completions",
        body=json.dumps({"prompt": "x", "max_tokens": 1}),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 200
    r = api.simulate_post("/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 1}))
    assert r.status_code == 200
    err = error_of(api.simulate_delete("/v1/completions"), 405)
    assert err["code"] == "method_not_allowed"
    err = error_of(api.simulate_get("/v2/nothing"), 404)
    assert err["code"] == "not_found"


def test_body_cap_413():
    c, _, registry = client(Settings(max_body_bytes=1000))
    try:
        big = json.dumps({"prompt": "x" * 2000})
        err = error_of(
            c.simulate_post(
                "/v1/completions", body=big, headers={"Content-Type": "application/json"}
            ),
            413,
        )
        assert err["code"] == "request_too_large"
    finally:
        registry.close_all()


def test_strict_models_404_else_default():
    c, _, registry = client(Settings(strict_models=True))
    try:
        err = error_of(
            c.simulate_post("/v1/engines/copilot-codex/completions", json={"prompt": "x"}), 404
        )
        assert err["code"] == "model_not_found"
        err = error_of(
            c.simulate_post("/v1/completions", json={"prompt": "x", "model": "gpt-9"}), 404
        )
        assert err["param"] == "model"
        assert (
            c.simulate_post("/v1/completions", json={"prompt": "x", "model": "fake"}).status_code
            == 200
        )
    finally:
        registry.close_all()


def test_queue_full_429_with_retry_after():
    backend = FakeBackend(max_queue=0)
    registry = make_registry(("fake", backend))
    c, _, _ = client(registry=registry)
    try:
        r = c.simulate_post("/v1/completions", json={"prompt": "x", "stream": True})
        err = error_of(r, 429)
        assert err["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
    finally:
        registry.close_all()


class _Exploding:
    """A model whose generation raises an unexpected exception (not a FastpilotError)."""

    name = "boom"
    context_length = 128

    def complete(self, request):
        raise RuntimeError("/secret/path/model.bin: segfault-ish")

    def stream(self, request):
        def gen():
            yield {"id": "cmpl-x", "created": 1, "choices": [{"text": "a", "index": 0}]}
            raise RuntimeError("/secret/path exploded mid-stream")

        return gen()


class _OneModelRegistry:
    loading = False

    def __init__(self, model):
        self.model = model

    def names(self):
        return [self.model.name]

    def get(self, name=None, *, strict=False):
        return self.model


def test_unexpected_error_is_generic_500_and_mid_stream_error_event(caplog):
    import falcon.testing

    from fastpilot.app import create_app

    app = create_app(Settings(), _OneModelRegistry(_Exploding()))
    c = falcon.testing.TestClient(app, headers={"Host": "localhost"})
    err = error_of(c.simulate_post("/v1/completions", json={"prompt": "x"}), 500)
    assert "/secret" not in err["message"] and err["type"] == "server_error"
    r = c.simulate_post("/v1/completions", json={"prompt": "x", "stream": True})
    assert r.status_code == 200
    events = sse_events(r.content)
    assert events[0]["choices"][0]["text"] == "a"
    assert set(events[-1]) == {"error"} and "/secret" not in events[-1]["error"]["message"]
    assert "/secret/path" in caplog.text  # the detail goes to the log


# -- security -------------------------------------------------------------------------


def test_api_keys_bearer_and_prefix():
    c, _, registry = client(Settings(api_key=("s3cret", "other")))
    body = {"prompt": "x", "max_tokens": 1}
    try:
        err = error_of(c.simulate_post("/v1/completions", json=body), 401)
        assert err["code"] == "invalid_api_key"
        error_of(
            c.simulate_post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}),
            401,
        )
        ok = c.simulate_post(
            "/v1/completions", json=body, headers={"Authorization": "Bearer other"}
        )
        assert ok.status_code == 200
        # The Copilot plugin sends its own GitHub token; the prefix key wins.
        ok = c.simulate_post(
            "/k/s3cret/v1/engines/copilot-codex/completions",
            json=body,
            headers={"Authorization": "Bearer ghu_xxx"},
        )
        assert ok.status_code == 200
        error_of(c.simulate_post("/k/wrong/v1/completions", json=body), 401)
        error_of(c.simulate_get("/metrics"), 401)
        error_of(c.simulate_get("/v1/models"), 401)
        assert c.simulate_get("/health").status_code == 200
        assert c.simulate_get("/").status_code == 200
        assert "const AUTH_REQUIRED = true;" in c.simulate_get("/").text
        tok = c.simulate_get("/k/s3cret/copilot_internal/v2/token").json
        assert tok["endpoints"]["api"].endswith("/k/s3cret/")
    finally:
        registry.close_all()


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:5000", 200),
        ("localhost", 200),
        ("LOCALHOST:8080", 200),
        ("[::1]:5000", 200),
        ("evil.example", 403),
        ("evil.example:5000", 403),
        ("127.0.0.1.evil.example", 403),
        ("code.internal:5000", 200),  # --allowed-host
    ],
)
def test_host_header_rebinding(host, status):
    c, _, registry = client(Settings(allowed_host=("code.internal",)))
    try:
        r = c.simulate_get("/health", headers={"Host": host})
        assert r.status_code == status
        if status == 403:
            assert error_of(r, 403)["code"] == "host_not_allowed"
    finally:
        registry.close_all()


def test_public_bind_skips_host_check():
    c, _, registry = client(Settings(host="0.0.0.0", api_key=("k",)))
    try:
        r = c.simulate_get("/health", headers={"Host": "myserver.lan:5000"})
        assert r.status_code == 200
    finally:
        registry.close_all()


def test_cors_off_by_default_and_reflects_listed_origins():
    c, _, registry = client()
    try:
        r = c.simulate_get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    finally:
        registry.close_all()
    c, _, registry = client(Settings(cors_origin=("https://ok.example",), api_key=("k",)))
    try:
        auth = {"Authorization": "Bearer k"}
        r = c.simulate_get("/v1/models", headers={"Origin": "https://ok.example", **auth})
        assert r.headers["access-control-allow-origin"] == "https://ok.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"]
        r = c.simulate_get("/v1/models", headers={"Origin": "https://evil.example", **auth})
        assert "access-control-allow-origin" not in r.headers
        # Preflight: no credentials, still answered.
        r = c.simulate_options(
            "/v1/completions",
            headers={
                "Origin": "https://ok.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert r.status_code == 200
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-allow-origin"] == "https://ok.example"
    finally:
        registry.close_all()


# -- logging, metrics of streams, deadlines -------------------------------------------


def test_one_access_line_per_request_without_prompt_text(api, caplog):
    caplog.set_level("INFO", logger="fastpilot.access")
    api.simulate_post(
        "/v1/completions",
        json={"prompt": "hello secret", "max_tokens": 40, "temperature": 0, "stream": True},
        headers={"X-Request-Id": "log-1"},
    )
    api.simulate_post("/v1/completions", json={"prompt": "hello secret", "max_tokens": 3})
    lines = [r.getMessage() for r in caplog.records if r.name == "fastpilot.access"]
    assert len(lines) == 2
    stream_line = lines[0]
    assert stream_line.startswith("log-1 POST /v1/completions model=fake status=200")
    # Usage of a stream is known only when it ends; the line is written then.
    assert re.search(r"prompt=\d+ completion=1\d cached=0 ms=\d+ stream done", stream_line)
    assert "completion=3" in lines[1]
    assert all("secret" not in line for line in lines)


def test_log_prompts_opt_in(caplog):
    caplog.set_level("INFO", logger="fastpilot.access")
    c, _, registry = client(Settings(log_prompts=True))
    try:
        c.simulate_post("/v1/completions", json={"prompt": "hello secret", "max_tokens": 1})
    finally:
        registry.close_all()
    assert "prompt_text='hello secret'" in caplog.text


def test_stream_tokens_reach_metrics(api):
    api.simulate_post(
        "/v1/completions",
        json={"prompt": "hello", "max_tokens": 5, "temperature": 0, "stream": True, "suffix": "x"},
    )
    text = api.simulate_get("/metrics").text
    assert 'fastpilot_tokens_total{kind="completion",model="fake"} 5.0' in text
    assert 'fastpilot_requests_total{route="/v1/completions",status="200"} 1.0' in text


def test_stream_suffix_header():
    c, _, registry = client()
    try:
        r = c.simulate_post(
            "/v1/completions", json={"prompt": "a", "suffix": "b", "max_tokens": 2, "stream": True}
        )
        assert r.headers.get("x-fastpilot-suffix") == "ignored"
    finally:
        registry.close_all()


def test_deadline_is_504_before_output_and_error_event_after():
    # 100 tokens take 5 s; the 1 s deadline passes mid-run, with the first token made
    # (50 ms) long before it even on a loaded machine.
    backend = FakeBackend(step_delay=0.05)
    registry = make_registry(("fake", backend), timeout=1.0)
    c, _, _ = client(registry=registry)
    try:
        body = {"prompt": "hello", "max_tokens": 100, "ignore_eos": True}
        err = error_of(c.simulate_post("/v1/completions", json=body), 504)
        assert err["code"] == "timeout"
        r = c.simulate_post("/v1/completions", json={**body, "stream": True})
        assert r.status_code == 200
        events = sse_events(r.content)
        assert joined_text(events[:-1])  # text made before the deadline was sent
        assert events[-1]["error"]["code"] == "timeout"
    finally:
        registry.close_all()


# -- one reading of each field on every route -------------------------------------------


@pytest.mark.parametrize("flag", [1, "1", "true", "True", True])
def test_stream_spellings_stream_on_chat_and_completions(api, flag):
    msgs = [{"role": "user", "content": "hi"}]
    for path, body in (
        ("/v1/chat/completions", {"messages": msgs}),
        ("/v1/completions", {"prompt": "hello"}),
        ("/v1/engines/fake/completions", {"prompt": "hello"}),
    ):
        r = api.simulate_post(path, json={**body, "max_tokens": 4, "stream": flag})
        assert r.status_code == 200, (path, r.text)
        assert r.headers["content-type"].startswith("text/event-stream"), path
        assert sse_events(r.content)


@pytest.mark.parametrize("flag", [0, "0", "false", False])
def test_stream_off_spellings_answer_json_on_chat(api, flag):
    msgs = [{"role": "user", "content": "hi"}]
    r = api.simulate_post(
        "/v1/chat/completions", json={"messages": msgs, "max_tokens": 4, "stream": flag}
    )
    assert r.status_code == 200 and r.json["object"] == "chat.completion"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/ask", "/v1/completions"])
def test_bad_boolean_is_400_on_every_route(api, path):
    body = {"messages": [{"role": "user", "content": "hi"}], "prompt": "x", "echo": "maybe"}
    if path != "/v1/completions":
        body["ignore_eos"] = body.pop("echo")
    err = error_of(api.simulate_post(path, json=body), 400)
    assert err["param"] in ("echo", "ignore_eos")


def test_chat_content_keeps_whitespace_equal_to_its_logprob_tokens(api):
    msgs = [{"role": "user", "content": "hi"}]
    body = {"messages": msgs, "max_tokens": 40, "temperature": 0, "logprobs": True}
    r = api.simulate_post("/v1/chat/completions", json=body)
    choice = r.json["choices"][0]
    tokens = "".join(t["token"] for t in choice["logprobs"]["content"])
    assert choice["message"]["content"] == tokens == SCRIPT
    assert tokens.startswith(" ") and tokens.endswith("\n")
    r = api.simulate_post("/v1/chat/completions", json={**body, "stream": 1})
    events = sse_events(r.content)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    lp_tokens = "".join(
        t["token"]
        for e in events
        if e["choices"][0]["logprobs"]
        for t in e["choices"][0]["logprobs"]["content"]
    )
    assert streamed == lp_tokens == SCRIPT


def test_max_stop_setting_is_a_flag_and_caps_requests():
    from fastpilot.settings import load_settings

    assert load_settings([], {}).limits.max_stop == 32
    assert load_settings(["--max-stop", "40"], {}).limits.max_stop == 40
    c, _backend, registry = client(Settings(max_stop=2))
    try:
        r = c.simulate_post("/v1/completions", json={"prompt": "x", "stop": ["a", "b", "c"]})
        err = error_of(r, 400)
        assert err["param"] == "stop" and "at most 2" in err["message"]
        r = c.simulate_post(
            "/v1/completions",
            json={"prompt": "hello", "stop": ["def", "\n\n"], "temperature": 0, "max_tokens": 40},
        )
        assert r.json["choices"][0]["text"] == " world"
    finally:
        registry.close_all()
