"""Python client packages, unmodified, against a real ``fastpilot serve`` on a tiny model.

Each test drives the package the way its documentation says to point it at an
OpenAI-compatible server, and compares what the package returns with
fastpilot's own answer to the same request:

- ``langchain-openai``: ``OpenAI(...).generate([...])`` and ``.batch([...])``
  send every prompt in one request (``prompt: [str, ...]``).
- ``llm``: a completion model declared in ``extra-openai-models.yaml`` under a
  throwaway ``LLM_USER_PATH``, run through its command line (it streams).
- ``lm-eval``: ``local-completions`` on a five-question task written here
  (``tests/clients/lm_eval/tiny_mc.jsonl``); loglikelihoods from token-id
  prompts, string prompts, batches of four and the remote tokenizer (fastpilot's
  ``/tokenizer_info`` + ``/tokenize``) must all equal the ones computed from
  fastpilot's echoed logprobs directly.

The packages are in the ``dev`` extra (``pip install -e '.[dev]'``).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
TASK_DATA = ROOT / "tests" / "clients" / "lm_eval" / "tiny_mc.jsonl"
KEY = "py-clients-key"
GREEDY = {"model": "tiny", "max_tokens": 8, "temperature": 0}
PROMPTS = ["def fib(n):", "import os\n", "class Stack:"]


@pytest.fixture(scope="module")
def server(tiny_gpt2_models):
    args = ["--model", f"tiny={tiny_gpt2_models['gguf-f32']}", "--threads", "1", "--api-key", KEY]
    with ServeProcess(args) as proc:
        yield proc


def direct(server: ServeProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, raw = server.request("POST", path, body, headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200, raw
    return json.loads(raw)


def greedy_text(server: ServeProcess, prompt: str) -> str:
    return direct(server, "/v1/completions", {**GREEDY, "prompt": prompt})["choices"][0]["text"]


def completion_requests(server: ServeProcess) -> float:
    """How many ``/v1/completions`` requests fastpilot answered 200 (from /metrics)."""
    status, raw = server.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200
    m = re.search(
        r'fastpilot_requests_total\{route="/v1/completions",status="200"\} ([0-9.]+)',
        raw.decode(),
    )
    return float(m.group(1)) if m else 0.0


# -- langchain-openai ---------------------------------------------------------------------


def test_langchain_generate_and_batch_send_prompt_lists(server):
    pytest.importorskip("langchain_openai")
    from langchain_openai import OpenAI

    llm = OpenAI(
        base_url=server.url + "/v1",
        api_key=KEY,
        model="tiny",
        temperature=0,
        max_tokens=8,
        max_retries=0,
    )
    want = [greedy_text(server, p) for p in PROMPTS]
    before = completion_requests(server)
    result = llm.generate(PROMPTS)
    assert [gens[0].text for gens in result.generations] == want
    # One request: the three prompts travelled as one list, not one call each.
    assert completion_requests(server) == before + 1
    assert llm.batch(PROMPTS) == want
    assert completion_requests(server) == before + 2
    usage = result.llm_output["token_usage"]
    assert usage["completion_tokens"] == sum(
        direct(server, "/v1/completions", {**GREEDY, "prompt": p})["usage"]["completion_tokens"]
        for p in PROMPTS
    )


# -- llm ----------------------------------------------------------------------------------


def test_llm_completion_model_from_extra_openai_models(server, tmp_path):
    pytest.importorskip("llm")
    user_dir = tmp_path / "llm"
    user_dir.mkdir()
    (user_dir / "extra-openai-models.yaml").write_text(
        "- model_id: fastpilot-tiny\n"
        "  model_name: tiny\n"
        f"  api_base: {server.url}/v1\n"
        "  completion: true\n"
        "  api_key_name: fastpilot\n"
    )
    (user_dir / "keys.json").write_text(json.dumps({"fastpilot": KEY}))
    cmd = [
        str(Path(sys.executable).with_name("llm")),
        "-m",
        "fastpilot-tiny",
        "-o",
        "temperature",
        "0",
        "-o",
        "max_tokens",
        "8",
        "--no-log",
        PROMPTS[0],
    ]
    env = {**os.environ, "LLM_USER_PATH": str(user_dir)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    # llm prints the streamed text and one newline.
    assert done.stdout == greedy_text(server, PROMPTS[0]) + "\n"


# -- lm-evaluation-harness -----------------------------------------------------------------


def reference_loglikelihoods(server: ServeProcess, tokenizer_dir: Path) -> list[list[float]]:
    """Each (question, choice)'s loglikelihood from fastpilot's echoed logprobs directly.

    lm-eval scores ``choice`` after ``question`` as the sum of the logprobs of the
    choice's tokens; an empty question is replaced by the end-of-text token.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    out = []
    for line in TASK_DATA.read_text().splitlines():
        doc = json.loads(line)
        row = []
        for choice in doc["choices"]:
            context, continuation = doc["question"], " " + choice  # target_delimiter " "
            # lm-eval moves the context's trailing whitespace into the continuation,
            # then splits the whole text's tokens at the context's token count.
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if context:
                ctx = tok.encode(context).ids
                whole = tok.encode(context + continuation).ids
                ids, n_ctx = whole, len(ctx)
            else:
                ids, n_ctx = [eot, *tok.encode(continuation).ids], 1
            body = {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}
            logprobs = direct(server, "/v1/completions", body)["choices"][0]["logprobs"]
            row.append(sum(logprobs["token_logprobs"][n_ctx:]))
        out.append(row)
    return out


def run_lm_eval(server: ServeProcess, tmp_path: Path, tokenizer_dir: Path, **model_args: Any):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "tiny_mc.yaml").write_text(
        "task: fastpilot_tiny_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {TASK_DATA}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    batch_size = model_args.pop("batch_size", 1)
    args = {
        "model": "tiny",
        "base_url": f"{server.url}/k/{KEY}/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(tokenizer_dir),
        "max_retries": 1,
        **model_args,
    }
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=",".join(f"{k}={v}" for k, v in args.items()),
        tasks=["fastpilot_tiny_mc"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        batch_size=batch_size,
    )
    samples = sorted(results["samples"]["fastpilot_tiny_mc"], key=lambda s: s["doc_id"])
    return [[resp[0] for resp in s["filtered_resps"]] for s in samples]


@pytest.fixture(scope="module")
def lm_eval_env(tmp_path_factory):
    pytest.importorskip("lm_eval")
    home = tmp_path_factory.mktemp("hf")
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_HOME=str(home), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def assert_close(got: list[list[float]], want: list[list[float]]) -> None:
    assert len(got) == len(want)
    for row_got, row_want in zip(got, want, strict=True):
        assert all(
            math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)
            for a, b in zip(row_got, row_want, strict=True)
        ), (
            row_got,
            row_want,
        )


def test_lm_eval_token_id_prompts_one_and_four_per_request(
    server, tmp_path, tiny_tokenizer_dir, lm_eval_env
):
    want = reference_loglikelihoods(server, tiny_tokenizer_dir)
    one = run_lm_eval(server, tmp_path, tiny_tokenizer_dir, tokenized_requests=True)
    four = run_lm_eval(server, tmp_path, tiny_tokenizer_dir, tokenized_requests=True, batch_size=4)
    assert_close(one, want)
    assert_close(four, want)


def test_lm_eval_string_prompts(server, tmp_path, tiny_tokenizer_dir, lm_eval_env):
    # The empty question makes lm-eval send "<|endoftext|>" as text: it must be the one
    # special token, as the token-id path sends it.
    want = reference_loglikelihoods(server, tiny_tokenizer_dir)
    got = run_lm_eval(server, tmp_path, tiny_tokenizer_dir, tokenized_requests=False, batch_size=4)
    assert_close(got, want)


def test_lm_eval_remote_tokenizer(server, tmp_path, tiny_tokenizer_dir, lm_eval_env):
    # tokenizer_backend=remote: lm-eval tokenizes through /tokenizer_info and /tokenize.
    want = reference_loglikelihoods(server, tiny_tokenizer_dir)
    got = run_lm_eval(
        server, tmp_path, tiny_tokenizer_dir, tokenizer_backend="remote", batch_size=4
    )
    assert_close(got, want)
