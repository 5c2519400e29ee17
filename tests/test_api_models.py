"""The app through TestClient over real tiny models (llama.cpp GGUF and CTranslate2)."""

from __future__ import annotations

import math

import falcon.testing
import pytest

from fastpilot.app import create_app
from fastpilot.loader import load
from fastpilot.models import Registry
from fastpilot.settings import Settings
from tests.test_api_support import LOCAL, sse_events


@pytest.fixture(scope="module")
def real(tiny_gpt2_models):
    registry = Registry()
    registry.add("gguf", load(tiny_gpt2_models["gguf-f32"], threads=1))
    registry.add("ct2", load(tiny_gpt2_models["ct2-float32"], threads=1))
    app = create_app(Settings(), registry)
    yield falcon.testing.TestClient(app, headers=dict(LOCAL)), registry
    registry.close_all()


@pytest.mark.parametrize("engine", ["gguf", "ct2"])
def test_get_echo_with_real_logprobs(real, engine):
    client, registry = real
    r = client.simulate_get(
        f"/v1/engines/{engine}/completions",
        query_string="prompt=import%20os&max_tokens=6&temperature=0&echo=true&logprobs=3",
    )
    assert r.status_code == 200, r.text
    choice = r.json["choices"][0]
    assert choice["text"].startswith("import os")
    lp = choice["logprobs"]
    n_prompt = len(registry.get(engine).tokenize("import os"))
    assert len(lp["tokens"]) == n_prompt + 6
    assert lp["token_logprobs"][0] is None  # nothing precedes the first prompt token
    values = lp["token_logprobs"][1:]
    assert all(isinstance(x, float) and x <= 0 and math.isfinite(x) for x in values)
    # Greedy: every generated token is the most likely one in its top_logprobs.
    for top, chosen in zip(
        lp["top_logprobs"][n_prompt:], lp["token_logprobs"][n_prompt:], strict=True
    ):
        assert chosen == pytest.approx(max(top.values()), abs=1e-4)
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_backends_agree_on_greedy_text_and_stream(real):
    client, _ = real
    texts = {}
    for engine in ("gguf", "ct2"):
        body = {"prompt": "def main():\n", "max_tokens": 12, "temperature": 0}
        plain = client.simulate_post(f"/v1/engines/{engine}/completions", json=body).json
        events = sse_events(
            client.simulate_post(
                f"/v1/engines/{engine}/completions", json={**body, "stream": True}
            ).content
        )
        streamed = "".join(e["choices"][0]["text"] for e in events)
        assert streamed == plain["choices"][0]["text"]
        texts[engine] = streamed
    # Both are f32 conversions of one checkpoint: greedy text must agree.
    assert texts["gguf"] == texts["ct2"]


def test_tokenize_matches_model_and_context_errors(real):
    client, registry = real
    text = "def f(x):\n    return x * 2\n"
    r = client.simulate_post("/v1/tokenize", json={"model": "ct2", "prompt": text})
    assert r.json["tokens"] == registry.get("ct2").tokenize(text)
    back = client.simulate_post("/v1/detokenize", json={"model": "ct2", "tokens": r.json["tokens"]})
    assert back.json["text"] == text
    long_prompt = text * 30
    r = client.simulate_post("/v1/completions", json={"model": "gguf", "prompt": long_prompt})
    assert r.status_code == 400 and r.json["error"]["code"] == "context_length_exceeded"
    r = client.simulate_post(
        "/v1/engines/gguf/completions", json={"prompt": long_prompt, "max_tokens": 8}
    )
    assert r.status_code == 200
    assert r.json["usage"]["prompt_tokens"] + r.json["usage"]["completion_tokens"] <= 128


def test_embeddings_from_llamacpp(real):
    client, registry = real
    r = client.simulate_post("/v1/embeddings", json={"model": "gguf", "input": ["import os", "x"]})
    assert r.status_code == 200, r.text
    data = r.json["data"]
    assert len(data) == 2 and len(data[0]["embedding"]) == 256
    assert data[0]["embedding"] != data[1]["embedding"]
    assert r.json["usage"]["prompt_tokens"] == len(registry.get("gguf").tokenize("import os")) + 1
