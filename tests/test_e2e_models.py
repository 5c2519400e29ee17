"""End to end with real tiny models: ``fastpilot serve`` in a subprocess, real clients.

The server is the installed command line (``python -m fastpilot.cli serve``)
on 127.0.0.1 with port 0, serving a GGUF (llama.cpp) and a CTranslate2
conversion of the tiny random GPT-2 from ``tests/conftest.py``, with an API
key. Greedy outputs over HTTP must equal the same model loaded in-process.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastpilot.loader import load

KEY = "e2e-key-123"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def live(tiny_gpt2_models, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# test key\n{KEY}\n")
    cmd = [
        sys.executable,
        "-u",
        "-m",
        "fastpilot.cli",
        "serve",
        "--port",
        "0",
        "--model",
        f"gguf={tiny_gpt2_models['gguf-q8_0']}",
        "--model",
        f"ct2={tiny_gpt2_models['ct2-int8']}",
        "--threads",
        "1",
        "--slots",
        "2",
        "--api-key-file",
        str(key_file),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    lines: list[str] = []
    port = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
        if line.startswith("ready:"):
            break
    assert port and lines[-1].startswith("ready:"), "".join(lines)
    proc.startup_lines = lines
    proc.port = port
    proc.url = f"http://127.0.0.1:{port}"
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


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


def test_copilot_request_with_logprobs_and_prefix_key(live):
    body = {
        "prompt": "# Path: a.py\nimport os\n",
        "suffix": "",
        "max_tokens": 500,
        "temperature": 0.8,
        "top_p": 1,
        "n": 3,
        "stop": ["\n\n"],
        "stream": True,
        "logprobs": 2,
        "logit_bias": {"799": -100},
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
    seen = set()
    for line in data.decode().split("\n"):
        if not line.strip():
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        event = json.loads(payload)
        assert event["id"] and event["created"] > 0
        for choice in event["choices"]:
            seen.add(choice["index"])
            lp = choice["logprobs"]
            if lp and lp["tokens"]:
                assert all(x <= 0 for x in lp["token_logprobs"])
                assert all(len(t) >= 2 for t in lp["top_logprobs"])
    assert seen == {0, 1, 2}


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


def test_disconnect_frees_the_slot(live):
    import socket

    payload = json.dumps(
        {"model": "gguf", "prompt": "x", "max_tokens": 120, "ignore_eos": True, "stream": True}
    ).encode()
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
    sock.close()
    deadline = time.monotonic() + 5
    busy = None
    while time.monotonic() < deadline:
        _, data = request(live, "GET", "/metrics")
        m = re.search(rb'fastpilot_model_backend_busy_slots\{model="gguf"\} (\S+)', data)
        busy = float(m.group(1))
        if busy == 0:
            break
        time.sleep(0.05)
    assert busy == 0
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
    live.send_signal(signal.SIGTERM)
    out, _ = live.communicate(timeout=30)
    assert live.returncode == 0, out
    assert "shutting down" in out
