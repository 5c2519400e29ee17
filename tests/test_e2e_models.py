"""End to end with real tiny models: ``fastpilot serve`` in a subprocess, real clients.

The server is the installed command line (``python -m fastpilot.cli serve``)
on 127.0.0.1 with port 0, serving a GGUF (llama.cpp) and a CTranslate2
conversion of the tiny random GPT-2 from ``tests/conftest.py``, with an API
key. Greedy outputs over HTTP must equal the same model loaded in-process.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import signal
import socket

import pytest

from fastpilot.loader import load
from tests.gates import wait_until
from tests.servers import ServeProcess

KEY = "e2e-key-123"
SLOTS = 2


@pytest.fixture(scope="module")
def live(tiny_gpt2_models, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# test key\n{KEY}\n")
    args = [
        "--model",
        f"gguf={tiny_gpt2_models['gguf-q8_0']}",
        "--model",
        f"ct2={tiny_gpt2_models['ct2-int8']}",
        "--threads",
        "1",
        "--slots",
        str(SLOTS),
        "--api-key-file",
        str(key_file),
    ]
    with ServeProcess(args) as server:
        server.startup_lines = list(server.lines)
        yield server


def request(live, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    hdrs.update(headers or {})
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def test_startup_prints_what_it_loads(live):
    text = "".join(live.startup_lines)
    assert "loading gguf from" in text and "loaded gguf: llamacpp q8_0" in text
    assert "loaded ct2: ctranslate2 int8" in text
    assert "default: gguf" in text


def test_openai_package_matches_in_process_model(live, tiny_gpt2_models):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
    prompt = "def fib(n):"
    for name, key in (("gguf", "gguf-q8_0"), ("ct2", "ct2-int8")):
        local = load(tiny_gpt2_models[key], threads=1)
        try:
            want = local.complete(prompt=prompt, max_tokens=12, temperature=0)["choices"][0]["text"]
            want_emb = local.embed(["def"])["data"][0]["embedding"] if name == "gguf" else None
        finally:
            local.close()
        got = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want, name
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model=name, prompt=prompt, max_tokens=12, temperature=0, stream=True
            )
            if c.choices
        )
        assert streamed == want, name
        if want_emb is not None:
            emb = client.embeddings.create(model=name, input="def")
            assert len(emb.data[0].embedding) == len(want_emb) == 256
            assert emb.data[0].embedding == pytest.approx(want_emb, abs=1e-5)
    chat = client.chat.completions.create(
        model="gguf", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens > 0
    assert sorted(m.id for m in client.models.list()) == ["ct2", "gguf"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()


def sse_events(data: bytes) -> list[dict]:
    """The JSON events of one SSE body, in order; it must end with ``data: [DONE]``."""
    text = data.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    events = []
    for block in text.split("\n\n")[:-2]:
        assert block.startswith("data: ") and "\n" not in block, block
        events.append(json.loads(block[6:]))
    return events


def greedy(live, prompt: str, **extra) -> dict:
    body = {"model": "gguf", "prompt": prompt, "temperature": 0, "logprobs": 1, **extra}
    resp, data = request(live, "POST", "/v1/completions", body)
    assert resp.status == 200, data
    return json.loads(data)["choices"][0]


def test_copilot_request_with_logprobs_and_prefix_key(live):
    prompt = "# Path: a.py\nimport os\n"
    # What greedy decoding writes here: a stop string it must meet and a token to ban.
    free = greedy(live, prompt, max_tokens=24, ignore_eos=True)
    text = free["text"]
    assert len(free["logprobs"]["tokens"]) == 24 and len(text) >= 8, free
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = greedy(live, prompt, max_tokens=24, ignore_eos=True, stop=[stop])
    assert cut["text"] == text[: text.index(stop)] and cut["finish_reason"] == "stop", cut
    first = free["logprobs"]["tokens"][0]
    _, data = request(live, "POST", "/v1/tokenize", {"model": "gguf", "prompt": first})
    (banned,) = json.loads(data)["tokens"]
    biased = greedy(live, prompt, max_tokens=24, ignore_eos=True, logit_bias={str(banned): -100})
    assert first not in biased["logprobs"]["tokens"], biased

    body = {
        "prompt": prompt,
        "suffix": "",
        "max_tokens": 500,
        "temperature": 0.8,
        "top_p": 1,
        "n": 3,
        "stop": ["\n\n", stop],
        "stream": True,
        "logprobs": 2,
        "logit_bias": {"799": -100, str(banned): -100},  # 799: <|endoftext|>
        "extra": {"language": "python"},
    }
    resp, data = request(
        live,
        "POST",
        f"/k/{KEY}/v1/engines/copilot-codex/completions",
        body,
        headers={"Authorization": "Bearer ghu_not_our_key"},
    )
    assert resp.status == 200, data
    texts: dict[int, str] = {}
    sampled: dict[int, list[str]] = {}
    reasons: dict[int, list[str]] = {}
    for event in sse_events(data):
        assert event["id"] and event["created"] > 0
        for choice in event["choices"]:
            i = choice["index"]
            texts[i] = texts.get(i, "") + choice["text"]
            if choice["finish_reason"] is not None:
                reasons.setdefault(i, []).append(choice["finish_reason"])
            lp = choice["logprobs"]
            if not choice["text"]:
                continue
            # Every chunk that carries text carries the logprobs of its tokens.
            assert lp is not None and lp["tokens"], choice
            sampled.setdefault(i, []).extend(lp["tokens"])
            assert len(lp["token_logprobs"]) == len(lp["tokens"]) == len(lp["top_logprobs"])
            for tok, val, top in zip(
                lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
            ):
                assert isinstance(val, float) and math.isfinite(val) and val <= 0, lp
                assert len(top) >= 2 and top[tok] == val, lp
    assert sorted(texts) == [0, 1, 2]
    assert all(len(r) == 1 and r[0] in ("stop", "length") for r in reasons.values())
    assert sorted(reasons) == [0, 1, 2]
    for i, choice_text in texts.items():
        assert "\n\n" not in choice_text and stop not in choice_text, choice_text
        assert "<|endoftext|>" not in sampled.get(i, []) and first not in sampled.get(i, [])


def test_context_handling_real_tokenizer(live):
    long_prompt = "def f():\n    return 1\n" * 40  # well over 128 tokens
    resp, data = request(live, "POST", "/v1/completions", {"prompt": long_prompt, "max_tokens": 4})
    assert resp.status == 400
    assert json.loads(data)["error"]["code"] == "context_length_exceeded"
    resp, data = request(
        live, "POST", "/v1/engines/gguf/completions", {"prompt": long_prompt, "max_tokens": 4}
    )
    assert resp.status == 200
    usage = json.loads(data)["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 128
    resp, data = request(live, "POST", "/v1/tokenize", {"prompt": "import os"})
    n = json.loads(data)["count"]
    assert n > 0
    resp, data = request(live, "GET", "/health")
    assert resp.status == 200


def model_stats(live, model: str = "gguf") -> dict[str, float]:
    """The model's gauges from ``/metrics`` (``requests_active``, ``backend_busy_slots`` ...)."""
    _, data = request(live, "GET", "/metrics")
    pattern = rb'^fastpilot_model_(\w+)\{model="' + model.encode() + rb'"\} (\S+)$'
    return {
        m.group(1).decode(): float(m.group(2)) for m in re.finditer(pattern, data, re.MULTILINE)
    }


def test_disconnect_frees_the_slot(live):
    # 16 sequences of 120 tokens over 2 slots: running them all takes at least
    # 16 * 120 / 2 = 960 decode steps (one token per slot per step), ~1 s here, so
    # only the hang-up can end the request early.
    n, max_tokens = 16, 120
    steps0 = model_stats(live)["backend_decode_steps"]
    body = {
        "model": "gguf",
        "prompt": "x",
        "n": n,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=30)
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    got = b""
    while b"data: " not in got:  # headers and the first event may come in separate packets
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before the first event: {got!r}"
        got += chunk
    sock.close()  # the client hangs up after one event

    def idle() -> bool:
        stats = model_stats(live)
        held = ("requests_active", "backend_busy_slots", "backend_queue_depth")
        return all(stats[k] == 0 for k in held)

    assert wait_until(idle, 60), model_stats(live)
    steps = model_stats(live)["backend_decode_steps"] - steps0
    assert steps < n * max_tokens / SLOTS, f"{steps} decode steps: the hang-up cancelled nothing"
    resp, _ = request(
        live, "POST", "/v1/completions", {"model": "gguf", "prompt": "x", "max_tokens": 2}
    )
    assert resp.status == 200


def test_eight_concurrent_streams_real_backends(live):
    import threading

    results: dict[tuple[str, int], str] = {}

    def one(model: str, i: int) -> None:
        body = {
            "model": model,
            "prompt": "import os\n",
            "max_tokens": 16,
            "temperature": 0,
            "stream": True,
        }
        resp, data = request(live, "POST", "/v1/completions", body)
        text = ""
        for line in data.decode().split("\n"):
            payload = line[5:].strip()
            if payload and payload != "[DONE]":
                text += "".join(c["text"] for c in json.loads(payload)["choices"])
        results[(model, i)] = f"{resp.status}:{text}"

    threads = [threading.Thread(target=one, args=(m, i)) for m in ("gguf", "ct2") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    for model in ("gguf", "ct2"):
        resp, data = request(
            live,
            "POST",
            "/v1/completions",
            {"model": model, "prompt": "import os\n", "max_tokens": 16, "temperature": 0},
        )
        want = "200:" + json.loads(data)["choices"][0]["text"]
        assert all(results[(model, i)] == want for i in range(4)), (model, results, want)


def test_sigterm_shuts_down_cleanly(live):
    # Runs last in this module: the server goes away.
    code = live.stop(timeout=30, sig=signal.SIGTERM)
    assert code == 0, live.output
    assert "shutting down" in live.output
