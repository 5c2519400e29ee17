"""Routes for clients of other servers, through the real app over the fake backend.

GitHub's API as Copilot's language server reads it (the shapes its bundled JS
validates), llama.cpp-server's ``/tokenize`` ``/detokenize`` ``/props``, the
``x-github-request-id`` header and the access line's asked-for engine. The real
clients drive the same routes end to end in ``tests/test_clients_*.py``.
"""

from __future__ import annotations

import pytest

from fastpilot.settings import Settings
from tests.test_api_support import CREATED, client


@pytest.fixture()
def api():
    c, _, registry = client()
    yield c
    registry.close_all()


def test_every_answer_carries_the_github_request_id(api):
    # Copilot's language server drops any answer without it ("does not appear to
    # originate from GitHub"); errors and unknown routes included.
    given = api.simulate_get("/copilot_internal/v2/token", headers={"X-Request-Id": "abc-1"})
    assert given.headers["x-github-request-id"] == "abc-1" == given.headers["x-request-id"]
    for resp in (
        api.simulate_get("/copilot_internal/user"),
        api.simulate_get("/models"),
        api.simulate_get("/nothing/here"),
        api.simulate_post("/v1/completions", json={"prompt": "x", "n": 10_000}),
    ):
        generated = resp.headers["x-github-request-id"]
        assert generated and generated == resp.headers["x-request-id"]
    other = api.simulate_get("/models").headers["x-github-request-id"]
    assert other != generated  # a fresh id per request


def test_token_endpoints_point_back_with_trailing_slash_and_key_prefix():
    c, _, registry = client(Settings(api_key=("s3cret",)))
    try:
        tok = c.simulate_get("/k/s3cret/copilot_internal/v2/token").json
        # The client resolves "telemetry", "models", "v1/engines/..." against these
        # URLs: without the final "/" the key segment would be replaced.
        assert set(tok["endpoints"].values()) == {"http://127.0.0.1:5000/k/s3cret/"}
        assert tok["expires_at"] == CREATED + 3600 and tok["refresh_in"] == 1800
        user = c.simulate_get("/k/s3cret/copilot_internal/user").json
        assert user["endpoints"]["api"] == "http://127.0.0.1:5000/k/s3cret/"
        assert c.simulate_get("/copilot_internal/user").status_code == 401
    finally:
        registry.close_all()


def test_user_object_has_the_fields_the_client_reads(api):
    user = api.simulate_get("/copilot_internal/user").json
    assert user["login"] and user["copilot_plan"] == "individual"
    assert user["access_type_sku"] != "free_limited_copilot"  # not a quota-limited free user
    assert "quota_snapshots" not in user  # no quota: the client shows none
    assert user["organization_list"] == [] and user["can_signup_for_limited"] is False


def test_models_is_githubs_catalogue_of_completion_models(api):
    body = api.simulate_get("/models").json
    [entry] = body["data"]
    assert entry["id"] == entry["name"] == "fake"
    assert isinstance(entry["model_picker_enabled"], bool) and isinstance(entry["version"], str)
    caps = entry["capabilities"]
    assert caps["type"] == "completion"
    assert {"tokenizer", "family", "object"} <= set(caps)
    assert caps["limits"]["max_context_window_tokens"] == 128  # the fake's context


def test_embeddings_models_and_telemetry(api):
    assert api.simulate_get("/embeddings/models").json == {"models": []}
    exp = api.simulate_get("/telemetry").json
    assert [c["Id"] for c in exp["Configs"]] == ["vscode"] and "AssignmentContext" in exp
    ack = api.simulate_post("/telemetry", json=[{"name": "a"}, {"name": "b"}]).json
    assert ack == {"itemsReceived": 2, "itemsAccepted": 2, "errors": []}
    # Not JSON at all still gets an answer: telemetry must never fail the client.
    assert api.simulate_post("/telemetry", body=b"\x00junk").json["itemsReceived"] == 1


def test_llamacpp_tokenize_detokenize_roundtrip(api):
    ours = api.simulate_post("/v1/tokenize", json={"prompt": "def fib(n):"}).json["tokens"]
    tokens = api.simulate_post("/tokenize", json={"content": "def fib(n):"}).json
    assert tokens == {"tokens": ours} and ours
    pieces = api.simulate_post(
        "/tokenize", json={"content": "def fib(n):", "with_pieces": True, "add_special": False}
    ).json["tokens"]
    assert [p["id"] for p in pieces] == ours
    assert "".join(p["piece"] for p in pieces) == "def fib(n):"
    back = api.simulate_post("/detokenize", json={"tokens": ours}).json
    assert back == {"content": "def fib(n):", "prompt": "def fib(n):"}
    # vLLM's names, as lm-eval's remote tokenizer sends them.
    vllm = api.simulate_post(
        "/tokenize", json={"prompt": "def fib(n):", "add_special_tokens": False}
    )
    assert vllm.json == {"tokens": ours}


def test_tokenizer_info_names_the_end_of_text_token(api):
    info = api.simulate_get("/tokenizer_info").json
    # The fake's end-of-text is its last id; the info names it by its text.
    last = info["vocab_size"] - 1
    text = api.simulate_post("/tokenize", json={"content": "x", "with_pieces": True}).json
    assert text["tokens"][0]["piece"] == "x"
    assert (
        info["eos_token"]
        == api.simulate_post("/detokenize", json={"tokens": [last]}).json["content"]
    )
    assert info["model_max_length"] == 128 and info["model"] == "fake"


def test_llamacpp_tokenize_pieces_of_a_split_character_are_bytes(api):
    # The fake tokenizer is byte-level: "é" is two tokens, neither valid UTF-8 alone.
    pieces = api.simulate_post("/tokenize", json={"content": "é", "with_pieces": True}).json
    assert [p["piece"] for p in pieces["tokens"]] == [[0xC3], [0xA9]]


def test_llamacpp_routes_refuse_bad_fields_in_the_openai_envelope(api):
    for path, body, param in (
        ("/tokenize", {"text": "x"}, "content"),
        ("/tokenize", {"prompt": ["x"]}, "prompt"),
        ("/tokenize", {"content": "x", "with_pieces": "yes"}, "with_pieces"),
        ("/detokenize", {"tokens": "1 2"}, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ):
        resp = api.simulate_post(path, json=body)
        assert resp.status_code == 400, (path, resp.text)
        assert resp.json["error"]["param"] == param


def test_llamacpp_props(api):
    props = api.simulate_get("/props").json
    assert props["default_generation_settings"]["n_ctx"] == 128 == props["n_ctx"]
    assert props["model_alias"] == "fake" and props["infill"] is False
    assert props["total_slots"] >= 1 and props["model_path"] == "fake"  # never a disk path
    assert api.simulate_get("/props", params={"model": "fake"}).json["model_alias"] == "fake"


def test_llamacpp_routes_under_the_key_prefix():
    c, _, registry = client(Settings(api_key=("s3cret",)))
    try:
        assert c.simulate_get("/props").status_code == 401
        assert c.simulate_get("/k/s3cret/props").json["n_ctx"] == 128
        tok = c.simulate_post("/k/s3cret/tokenize", json={"content": "ab"}).json["tokens"]
        assert c.simulate_post("/k/s3cret/detokenize", json={"tokens": tok}).json["content"] == "ab"
        assert c.simulate_get("/k/s3cret/tokenizer_info").json["model_max_length"] == 128
    finally:
        registry.close_all()


def test_access_line_names_the_engine_asked_for_not_the_template(caplog):
    caplog.set_level("INFO", logger="fastpilot.access")
    c, _, registry = client(Settings(api_key=("s3cret",)))
    try:
        body = {"prompt": "hello", "max_tokens": 2}
        c.simulate_post(
            "/k/s3cret/v1/engines/copilot-codex/completions",
            json=body,
            headers={"OpenAI-Intent": "copilot-ghost"},
        )
        c.simulate_post("/k/s3cret/v1/completions", json={**body, "model": "gpt-3.5 turbo"})
        c.simulate_post("/k/s3cret/v1/completions", json={**body, "model": "fake"})
        metrics = c.simulate_get("/k/s3cret/metrics").text
    finally:
        registry.close_all()
    lines = [r.getMessage() for r in caplog.records if r.name == "fastpilot.access"]
    assert (
        " POST /v1/engines/copilot-codex/completions model=fake asked=copilot-codex " in (lines[0])
    )
    assert lines[0].endswith(" intent=copilot-ghost")
    # A space in a name cannot split the line's fields; the key never shows.
    assert " POST /v1/completions model=fake asked=gpt-3.5%20turbo " in lines[1]
    assert "asked=" not in lines[2]
    assert all("s3cret" not in line and "{engine}" not in line for line in lines)
    # The metrics keep the template: invented engine names add no label values.
    assert 'route="/v1/engines/{engine}/completions"' in metrics
