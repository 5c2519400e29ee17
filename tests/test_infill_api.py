"""``POST /infill`` (llama.cpp server's shape) on the fake backend: fields, streaming, bad bodies.

The real-model checks (greedy parity, warm-up then cached follow-up) are in
tests/test_fim_gguf.py.
"""

from __future__ import annotations

import json

import pytest

from fastpilot.backends.fim_tokens import FimTokenIds
from fastpilot.settings import Settings
from tests.test_api_support import client

PRE, SUF, MID = 1, 2, 3
SCRIPT = " world\n\ndef fib(n):\n    return n\n"


@pytest.fixture
def fim_api():
    api, backend, registry = client()
    backend.fim_tokens = FimTokenIds(pre=PRE, suf=SUF, mid=MID)
    yield api, backend
    registry.close_all()


def test_infill_answers_llama_cpp_fields(fim_api):
    api, backend = fim_api
    body = {"input_prefix": "ab", "input_suffix": "cd", "prompt": "e", "n_predict": 40,
            "temperature": 0, "cache_prompt": True, "id_slot": -1,
            "samplers": ["top_k", "top_p", "infill"]}  # fmt: skip
    r = api.simulate_post("/infill", json=body)
    assert r.status_code == 200, r.text
    out = r.json
    # The prompt went through the FIM layer: prefix + prompt, then the suffix.
    assert backend.submitted[-1].prompt_ids == [PRE, 97, 98, 101, SUF, 99, 100, MID]
    assert out["content"] == SCRIPT
    assert out["stop"] is True and out["truncated"] is False
    assert out["tokens_evaluated"] == 8
    # the end-of-sequence token is not a step (backends/base.py), so it is not counted
    assert out["tokens_predicted"] == len(backend.tokenize(SCRIPT))
    t = out["timings"]
    assert t["prompt_n"] == 8 and t["predicted_n"] == out["tokens_predicted"]
    assert t["prompt_ms"] >= 0 and t["predicted_ms"] >= 0 and t["predicted_per_second"] >= 0
    # The same infill through /v1/completions' suffix gives the same text.
    r2 = api.simulate_post(
        "/v1/completions",
        json={"prompt": "abe", "suffix": "cd", "max_tokens": 40, "temperature": 0},
    )
    assert r2.json["choices"][0]["text"] == SCRIPT


def test_response_fields_select_paths(fim_api):
    api, _ = fim_api
    r = api.simulate_post(
        "/infill",
        json={"input_prefix": "a", "input_suffix": "b", "n_predict": 3, "temperature": 0,
              "response_fields": ["content", "timings/prompt_n", "truncated", "nope/x"]},
    )  # fmt: skip
    assert r.status_code == 200
    assert set(r.json) == {"content", "timings/prompt_n", "truncated"}
    assert r.json["timings/prompt_n"] == 5


def test_streamed_events(fim_api):
    api, backend = fim_api
    api_tokens = backend.tokenize
    r = api.simulate_post(
        "/infill",
        json={"input_prefix": "a", "input_suffix": "b", "n_predict": 40, "temperature": 0,
              "stream": True},
    )  # fmt: skip
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks)
    assert "[DONE]" not in r.text  # llama.cpp's native stream has no [DONE]
    events = [json.loads(b[6:]) for b in blocks]
    assert len(events) > 3
    assert all(e["stop"] is False and e["content"] for e in events[:-1])
    assert "".join(e["content"] for e in events) == SCRIPT
    last = events[-1]
    assert last["stop"] is True and last["content"] == ""
    counts = [e["tokens_predicted"] for e in events]
    assert counts == sorted(counts) and counts[0] >= 1
    assert last["tokens_predicted"] == len(api_tokens(SCRIPT))  # end of sequence is no step
    assert last["timings"]["predicted_n"] == last["tokens_predicted"]
    assert {"tokens_evaluated", "truncated", "timings"} <= set(last)


def test_warm_up_evaluates_without_text(fim_api):
    api, backend = fim_api
    before = len(backend.submitted)
    r = api.simulate_post(
        "/infill",
        json={"input_prefix": "ab", "input_suffix": "cd", "n_predict": 0,
              "input_extra": [{"filename": "a.py", "text": "x = 1\n"}]},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json["content"] == "" and r.json["tokens_predicted"] == 0
    # The prompt really went to the backend (to be evaluated and cached).
    assert len(backend.submitted) == before + 1
    sent = backend.submitted[-1].prompt_ids
    assert r.json["tokens_evaluated"] == len(sent) and sent[-1] == MID
    assert "x = 1" in backend.detokenize(sent)


def test_key_prefix_and_model_selection(fim_api):
    api, backend = fim_api
    r = api.simulate_post(
        "/infill", json={"model": "fake", "input_prefix": "a", "n_predict": 2, "temperature": 0}
    )
    assert r.status_code == 200
    api2, b2, registry = client(Settings(api_key=("k1",)))
    try:
        b2.fim_tokens = FimTokenIds(pre=PRE, suf=SUF, mid=MID)
        body = {"input_prefix": "a", "n_predict": 2}
        assert api2.simulate_post("/infill", json=body).status_code == 401
        assert api2.simulate_post("/k/k1/infill", json=body).status_code == 200
    finally:
        registry.close_all()


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input_prefix": 3}, "input_prefix"),
        ({"input_suffix": ["x"]}, "input_suffix"),
        ({"prompt": {"a": 1}}, "prompt"),
        ({"input_extra": "x"}, "input_extra"),
        ({"input_extra": [{"filename": "a", "text": 5}]}, "input_extra"),
        ({"input_extra": [1]}, "input_extra"),
        ({"input_extra": [{"text": "x"}] * 1000}, "input_extra"),
        ({"n_predict": "many"}, "n_predict"),
        ({"n_predict": True}, "n_predict"),
        ({"n_predict": 10**9}, "n_predict"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": "x"}, "top_k"),
        ({"stop": 5}, "stop"),
        ({"cache_prompt": "yes"}, "cache_prompt"),
        ({"samplers": "top_k"}, "samplers"),
        ({"response_fields": "content"}, "response_fields"),
        ({"model": 5}, "model"),
    ],
)
def test_bad_bodies_get_400_and_the_server_keeps_serving(fim_api, body, param):
    api, _ = fim_api
    r = api.simulate_post("/infill", json=body)
    assert r.status_code == 400, r.text
    assert r.json["error"]["param"] == param
    ok = api.simulate_post("/infill", json={"input_prefix": "a", "n_predict": 1})
    assert ok.status_code == 200


def test_huge_body_and_non_object(fim_api):
    api, _ = fim_api
    huge = {"input_extra": [{"filename": "f", "text": "x" * (1 << 20)}] * 12}
    r = api.simulate_post("/infill", json=huge)
    assert r.status_code == 413
    r = api.simulate_post("/infill", body="[1, 2]", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert (
        api.simulate_post("/infill", json={"input_prefix": "a", "n_predict": 1}).status_code == 200
    )


def test_model_without_fim_gets_a_clear_400():
    api, _, registry = client()
    try:
        r = api.simulate_post("/infill", json={"input_prefix": "a", "input_suffix": "b"})
        assert r.status_code == 400
        err = r.json["error"]
        assert err["code"] == "not_supported" and "fill in the middle" in err["message"]
        r = api.simulate_post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        assert r.status_code == 200
    finally:
        registry.close_all()


def test_editor_stops_pass_through(fim_api):
    """llama.vim's n_indent / t_max_predict_ms reach the engine's editor stops."""
    api, _ = fim_api
    body = {"input_prefix": "a", "input_suffix": "b", "n_predict": 40, "temperature": 0}
    r = api.simulate_post("/infill", json={**body, "n_indent": 4})
    ref = api.simulate_post(
        "/v1/completions",
        json={"prompt": "a", "suffix": "b", "max_tokens": 40, "temperature": 0, "n_indent": 4},
    )
    text = ref.json["choices"][0]["text"]
    assert r.status_code == 200 and r.json["content"] == text
    assert text and SCRIPT.startswith(text) and len(text) < len(SCRIPT)
    bad = api.simulate_post("/infill", json={**body, "n_indent": "deep"})
    assert bad.status_code == 400 and bad.json["error"]["param"] == "n_indent"
