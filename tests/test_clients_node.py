"""The ``openai`` npm package (openai-node), unmodified, against a real ``fastpilot serve``.

``tests/clients/openai_node.mjs`` runs one scenario with the SDK and prints
what the SDK parsed; each test compares that with fastpilot's own greedy
answer to the same request. Skipped only when ``node`` is missing (CI installs
it); a missing ``node_modules`` is a failure that says to run ``npm ci``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ServeProcess

CLIENTS = Path(__file__).resolve().parent / "clients"
KEY = "node-key-7"
pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@pytest.fixture(scope="module")
def server(tiny_gpt2_models):
    args = ["--model", f"tiny={tiny_gpt2_models['gguf-f32']}", "--threads", "1", "--api-key", KEY]
    with ServeProcess(args) as proc:
        yield proc


def sdk(server: ServeProcess, scenario: str) -> Any:
    if not (CLIENTS / "node_modules" / "openai" / "package.json").is_file():
        pytest.fail(f"openai-node is not installed: run `npm ci` in {CLIENTS}")
    done = subprocess.run(
        [str(shutil.which("node")), "openai_node.mjs", server.url + "/v1", KEY, "tiny", scenario],
        cwd=CLIENTS,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def direct(server: ServeProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, raw = server.request("POST", path, body, headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200, raw
    return json.loads(raw)


GREEDY = {"model": "tiny", "max_tokens": 8, "temperature": 0}


def test_completion(server):
    got = sdk(server, "completion")
    want = direct(server, "/v1/completions", {**GREEDY, "prompt": "def fib(n):"})
    assert got["texts"] == [want["choices"][0]["text"]]
    # Token counts are the model's; how many drafted tokens speculation accepted or
    # rejected depends on what the server measured before (draft length adapts), so
    # only the presence and sum of those details are compared.
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: got["usage"][k] for k in counts} == {k: want["usage"][k] for k in counts}
    assert got["usage"]["completion_tokens"] > 0
    details = got["usage"]["completion_tokens_details"]
    assert set(details) == {"accepted_prediction_tokens", "rejected_prediction_tokens"}
    assert 0 <= details["accepted_prediction_tokens"] <= got["usage"]["completion_tokens"]


def test_streaming_completion(server):
    got = sdk(server, "stream")
    want = direct(server, "/v1/completions", {**GREEDY, "prompt": "def fib(n):"})
    assert got == {
        "text": want["choices"][0]["text"],
        "finish": want["choices"][0]["finish_reason"],
    }


def test_prompt_list(server):
    got = sdk(server, "prompt-list")
    texts = [
        direct(server, "/v1/completions", {**GREEDY, "prompt": p})["choices"][0]["text"]
        for p in ("def fib(n):", "import os\n")
    ]
    assert got["choices"] == [{"index": i, "text": t} for i, t in enumerate(texts)]


def test_chat(server):
    got = sdk(server, "chat")
    want = direct(
        server,
        "/v1/chat/completions",
        {**GREEDY, "messages": [{"role": "user", "content": "Write a function."}]},
    )
    assert got == {"content": want["choices"][0]["message"]["content"], "role": "assistant"}


def test_models_list(server):
    assert sdk(server, "models") == {"ids": ["tiny"]}
