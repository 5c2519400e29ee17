"""Schemathesis against the running server: requests generated from ``/openapi.json``.

The server is the real stack -- waitress on an ephemeral loopback port, the
Falcon app, a real llama.cpp model (the tiny random GPT-2, q4_k_m) -- and every
operation of the OpenAPI document gets generated requests, valid and invalid
(schemathesis's positive and negative modes: wrong types, missing fields,
out-of-range values, odd strings). Properties checked on every response:

- no 5xx (the one exception: 504 ``timeout`` when the generated request itself
  asked for a deadline shorter than the work),
- every error is the OpenAI envelope ``{"error": {message, type, param, code}}``
  as JSON, and no body carries a traceback or a server path,
- a stream has at least one event, ends with ``data: [DONE]`` and every event is one
  JSON line; a JSON reply with ``choices`` never has an empty list,
- ``/health`` still answers afterwards.

Cost is bounded for CI: ``FASTPILOT_FUZZ_EXAMPLES`` examples per operation
(default 40; 19 operations, under a minute on two cores).
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from fastpilot.api.openapi import build_document  # noqa: E402
from fastpilot.app import create_app  # noqa: E402
from fastpilot.loader import load  # noqa: E402
from fastpilot.models import Registry  # noqa: E402
from fastpilot.serve import start_in_thread  # noqa: E402
from fastpilot.settings import Settings  # noqa: E402

EXAMPLES = int(os.environ.get("FASTPILOT_FUZZ_EXAMPLES", "40"))
ROOT = str(Path(__file__).resolve().parent.parent)
TRIED: dict[str, int] = {}


@pytest.fixture(scope="module")
def live(tiny_gpt2_models):
    registry = Registry()
    model = load(tiny_gpt2_models["gguf-q4_k_m"], name="tiny", threads=1, slots=4, max_queue=64)
    registry.add("tiny", model)
    # Small caps keep each valid request cheap; the fuzzer explores around them.
    settings_ = Settings(port=0, max_tokens=16, max_n=4, slots=4, timeout=30.0)
    running = start_in_thread(create_app(settings_, registry), settings_, n_models=1)
    running.model_path = str(tiny_gpt2_models["gguf-q4_k_m"])
    yield running
    running.stop()
    registry.close_all()


# Built from the same document the server serves (test_openapi.py proves they are
# equal); schemathesis's lazy ``from_fixture`` loader does not work under pytest 9.
schema = schemathesis.openapi.from_dict(build_document())
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES
)


def check_response(response, live) -> None:
    status = response.status_code
    body = response.content
    text = body.decode("utf-8", "replace")
    assert "Traceback" not in text and ROOT not in text and live.model_path not in text
    # schemathesis keeps headers as {lower-case name: [values]}.
    ctype = (response.headers.get("content-type") or [""])[0]
    if status >= 400:
        assert ctype.startswith("application/json"), (status, ctype, text[:300])
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"], err
        if status >= 500:
            assert status == 504 and err["code"] == "timeout", (status, err)
        return
    if ctype.startswith("text/event-stream"):
        assert text.endswith("data: [DONE]\n\n"), text[-300:]
        blocks = text.split("\n\n")[:-2]
        assert blocks, "a stream with no event before [DONE]"
        for block in blocks:
            assert block.startswith("data: ") and "\n" not in block, block
            event = json.loads(block[6:])
            if "error" in event:
                assert event["error"]["code"] == "timeout", event
    elif ctype.startswith("application/json") and body:  # OPTIONS answers carry none
        doc = json.loads(body)
        if isinstance(doc, dict) and "choices" in doc:
            assert doc["choices"], f"a 200 with empty choices: {text[:300]}"


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_generated_requests(case, live):
    response = case.call(base_url=live.url, timeout=60)
    label = case.operation.label
    TRIED[label] = TRIED.get(label, 0) + 1
    check_response(response, live)


def test_server_still_healthy_after_fuzzing(live, request):
    # Runs after the generated requests (same module, file order).
    with urllib.request.urlopen(live.url + "/health", timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    total = sum(TRIED.values())
    print(f"\nfuzz: {total} generated requests over {len(TRIED)} operations")
    fuzzed = [i for i in request.session.items if i.originalname == "test_generated_requests"]
    if not fuzzed:
        return  # only this test was selected: nothing was meant to be generated
    # The generated test ran in this session: it must have sent requests to (nearly)
    # every operation, else the fuzzing above checked nothing.
    assert total >= len(TRIED) >= 15, TRIED
