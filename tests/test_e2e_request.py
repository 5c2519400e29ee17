"""Several prompts, editor stops and chat whitespace on real tiny models over real HTTP.

``fastpilot serve`` runs as a subprocess with the tiny random GPT-2 as a GGUF
(llama.cpp) and a CTranslate2 conversion; the client is the official
``openai`` package. A multi-prompt answer must equal the same prompts sent
one at a time (greedy), with OpenAI's ``choices[i * n + j]`` and usage summed.
"""

from __future__ import annotations

import json

import pytest

from fastpilot.engine.editor_stops import LineLimits, LineStops
from tests.servers import ServeProcess

openai = pytest.importorskip("openai")

PROMPTS = ["def fib(n):", "import os\n", "The quick brown"]
MODELS = ("gguf", "ct2")


@pytest.fixture(scope="module")
def live(tiny_gpt2_models):
    args = [
        "--model",
        f"gguf={tiny_gpt2_models['gguf-q8_0']}",
        "--model",
        f"ct2={tiny_gpt2_models['ct2-float32']}",
        "--threads",
        "1",
        "--slots",
        "4",
    ]
    with ServeProcess(args) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def post(live, path: str, body: dict) -> dict:
    status, data = live.request("POST", path, body)
    assert status == 200, data[:500]
    return json.loads(data)


def token_id(live, model: str, text: str) -> int:
    ids = post(live, "/v1/tokenize", {"model": model, "prompt": text})["tokens"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


@pytest.mark.parametrize("model", MODELS)
def test_openai_client_several_prompts_equal_single_requests(client, model):
    n = 2
    logprobs = 1
    out = client.completions.create(
        model=model, prompt=PROMPTS, n=n, max_tokens=8, temperature=0, logprobs=logprobs
    )
    assert [c.index for c in out.choices] == list(range(len(PROMPTS) * n))
    prompt_tokens = completion_tokens = 0
    for i, prompt in enumerate(PROMPTS):
        one = client.completions.create(
            model=model, prompt=prompt, n=n, max_tokens=8, temperature=0, logprobs=logprobs
        )
        for j in range(n):
            got, want = out.choices[i * n + j], one.choices[j]
            assert got.text == want.text and got.finish_reason == want.finish_reason
            assert got.logprobs.tokens == want.logprobs.tokens
            assert got.logprobs.token_logprobs == pytest.approx(
                want.logprobs.token_logprobs, abs=1e-4
            )
        prompt_tokens += one.usage.prompt_tokens
        completion_tokens += one.usage.completion_tokens
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == completion_tokens
    assert out.usage.total_tokens == prompt_tokens + completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_openai_client_token_id_prompts_and_streaming(live, client, model):
    ids = [post(live, "/v1/tokenize", {"model": model, "prompt": p})["tokens"] for p in PROMPTS]
    by_text = client.completions.create(model=model, prompt=PROMPTS, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    texts: dict[int, str] = {}
    for chunk in client.completions.create(
        model=model, prompt=PROMPTS, max_tokens=6, temperature=0, stream=True
    ):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {i: c.text for i, c in enumerate(by_text.choices)}


@pytest.mark.parametrize("model", MODELS)
def test_n_indent_over_http_cuts_the_sampled_text_at_the_first_shallow_line(live, model):
    # Sampling (seeded) among three tokens makes text with lines of both kinds.
    bias = {str(token_id(live, model, t)): 30 for t in ("\n", "x", " ")}
    body = {
        "model": model,
        "prompt": "def f():\n",
        "max_tokens": 48,
        "temperature": 1.0,
        "seed": 11,
        "logit_bias": bias,
    }
    full = post(live, "/v1/completions", body)["choices"][0]["text"]
    expected, cut = LineStops(LineLimits(n_indent=1)).feed(full)
    assert cut and expected != full, repr(full)  # the sample really has a shallow line
    choice = post(live, "/v1/completions", {**body, "n_indent": 1})["choices"][0]
    assert choice["text"] == expected
    assert choice["finish_reason"] == "stop"
    # Copilot's form of the same stop, on the engine route.
    extra = {"trim_by_indentation": True, "next_indent": 0}
    choice = post(live, f"/v1/engines/{model}/completions", {**body, "extra": extra})
    assert choice["choices"][0]["text"] == expected


@pytest.mark.parametrize("model", MODELS)
def test_chat_content_keeps_whitespace_tokens(live, client, model):
    space = token_id(live, model, " ")
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        logit_bias={str(space): 100},
    )
    content = chat.choices[0].message.content
    tokens = "".join(t.token for t in chat.choices[0].logprobs.content)
    assert content == tokens and content.strip() == "" and content
