"""Several prompts in one request, through the app (falcon TestClient) over the FakeBackend.

Every multi-prompt answer is compared with the same prompts sent one by one:
choice ``j`` of prompt ``i`` must be ``choices[i * n + j]`` and equal the
single-prompt request's choice ``j``, usage must be the sum.
"""

from __future__ import annotations

import pytest

from fastpilot.engine.model import Model
from fastpilot.settings import Settings
from tests.fakes import FakeBackend
from tests.test_api_support import client, sse_events

PROMPTS = ["hello", "def fib(n):", "中"]


@pytest.fixture
def api():
    c, backend, registry = client()
    c.backend = backend
    yield c
    registry.close_all()


def single(api, path: str, prompt, **body):
    r = api.simulate_post(path, json={"prompt": prompt, **body})
    assert r.status_code == 200, r.text
    return r.json


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/engines/fake/completions"])
@pytest.mark.parametrize(
    "body",
    [
        {"temperature": 0, "max_tokens": 12, "echo": True, "logprobs": 2},
        {"temperature": 1.0, "seed": 7, "max_tokens": 10},
        # lm-evaluation-harness scoring: the prompts' own logprobs, nothing generated.
        {"temperature": 0, "max_tokens": 0, "echo": True, "logprobs": 1},
        {"temperature": 1.0, "seed": 3, "max_tokens": 6, "best_of": 3},
    ],
)
def test_choices_are_indexed_prompt_major_and_equal_single_requests(api, path, body):
    n = 2
    r = api.simulate_post(path, json={"prompt": PROMPTS, "n": n, **body})
    assert r.status_code == 200, r.text
    out = r.json
    assert [c["index"] for c in out["choices"]] == list(range(len(PROMPTS) * n))
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for i, prompt in enumerate(PROMPTS):
        one = single(api, path, prompt, n=n, **body)
        for j in range(n):
            got, want = out["choices"][i * n + j], one["choices"][j]
            assert got["text"] == want["text"]
            assert got["logprobs"] == want["logprobs"]
            assert got["finish_reason"] == want["finish_reason"]
        for key in usage:
            usage[key] += one["usage"][key]
    if body.get("echo"):
        assert all(out["choices"][i * n].get("text").startswith(p) for i, p in enumerate(PROMPTS))
    assert out["usage"]["prompt_tokens"] == usage["prompt_tokens"]
    assert out["usage"]["completion_tokens"] == usage["completion_tokens"]
    assert out["usage"]["total_tokens"] == sum(usage.values())


def test_token_id_lists_and_a_flat_list_of_ints(api):
    ids = [api.simulate_post("/v1/tokenize", json={"prompt": p}).json["tokens"] for p in PROMPTS]
    body = {"temperature": 0, "max_tokens": 8, "echo": True}
    by_text = api.simulate_post("/v1/completions", json={"prompt": PROMPTS, **body}).json
    by_ids = api.simulate_post("/v1/completions", json={"prompt": ids, **body}).json
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]
    # One flat list of ints is still one prompt.
    flat = api.simulate_post("/v1/completions", json={"prompt": ids[1], **body}).json
    assert len(flat["choices"]) == 1
    assert flat["choices"][0]["text"] == by_text["choices"][1]["text"]


def test_streamed_events_carry_the_choice_index_and_one_usage(api):
    n = 2
    body = {"temperature": 0, "max_tokens": 12, "n": n}
    r = api.simulate_post(
        "/v1/completions",
        json={"prompt": PROMPTS, "stream": True, "stream_options": {"include_usage": True}, **body},
    )
    events = sse_events(r.content)
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    ids = {e["id"] for e in events}
    assert len(ids) == 1
    for e in events[:-1]:
        assert e["usage"] is None
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                finished[c["index"]] = c["finish_reason"]
    assert sorted(texts) == list(range(len(PROMPTS) * n)) == sorted(finished)
    total = 0
    for i, prompt in enumerate(PROMPTS):
        one = single(api, "/v1/completions", prompt, **body)
        for j in range(n):
            assert texts[i * n + j] == one["choices"][j]["text"]
        total += one["usage"]["total_tokens"]
    last = events[-1]
    assert last["choices"] == [] and last["usage"]["total_tokens"] == total


def test_every_prompt_is_submitted_before_any_is_read():
    backend = FakeBackend(step_delay=0.01)
    model = Model("fake", backend)
    try:
        stream = model.stream(prompt=PROMPTS, n=2, max_tokens=4, temperature=0)
        # Nothing consumed yet, and every sequence of every prompt is with the backend.
        assert len(backend.submitted) == len(PROMPTS) * 2
        chunks = list(stream)
        assert {c["choices"][0]["index"] for c in chunks} == set(range(6))
    finally:
        model.close()


def test_max_n_counts_prompts_times_n():
    c, _backend, registry = client(Settings(max_n=4))
    try:
        r = c.simulate_post("/v1/completions", json={"prompt": PROMPTS, "n": 2})
        assert r.status_code == 400
        err = r.json["error"]
        assert err["param"] == "prompt"
        assert "--max-n" in err["message"] and "6" in err["message"]
        r = c.simulate_post("/v1/completions", json={"prompt": PROMPTS[:2], "n": 2})
        assert r.status_code == 200 and len(r.json["choices"]) == 4
    finally:
        registry.close_all()


def test_queue_full_fails_the_whole_request_and_cancels_what_was_submitted():
    c, backend, registry = client(max_queue=3, step_delay=0.01)
    try:
        r = c.simulate_post(
            "/v1/completions", json={"prompt": PROMPTS[:2], "n": 2, "max_tokens": 50}
        )
        assert r.status_code == 429
        assert len(backend.submitted) == 3  # the fourth sequence did not fit
        assert all(s.cancelled for s in backend.streams)
        assert backend.wait_idle()
    finally:
        registry.close_all()


def test_a_prompt_that_does_not_fit_fails_the_request():
    c, backend, registry = client(context_length=32)
    try:
        r = c.simulate_post(
            "/v1/completions", json={"prompt": ["short", "x" * 100], "max_tokens": 4}
        )
        assert r.status_code == 400
        assert r.json["error"]["code"] == "context_length_exceeded"
        assert all(s.cancelled for s in backend.streams)
    finally:
        registry.close_all()


@pytest.mark.parametrize("prompt", [["a", 1], [[1], "a"], [[1, -2], [3]], [["a"]], [{}]])
def test_malformed_prompt_lists_are_400(api, prompt):
    r = api.simulate_post("/v1/completions", json={"prompt": prompt})
    assert r.status_code == 400
    assert r.json["error"]["param"] == "prompt"
