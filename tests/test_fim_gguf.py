"""Fill in the middle on real llama.cpp with Qwen2- and StarCoder2-layout GGUFs.

The GGUFs (tests/fim_models.py) are tiny random-weight files in the layout
llama.cpp's converter writes, served as a user serves a downloaded GGUF:
``fastpilot serve --model q=model.gguf --trust-unverified-models``. Every route
-- ``/v1/completions`` with ``suffix``, FIM markup written into ``prompt``,
``/infill`` and the library -- must give llama.cpp's own greedy continuation of
``[FIM_PRE] prefix [FIM_SUF] suffix [FIM_MID]``, computed here by a
``llama_decode`` + argmax loop that shares no code with fastpilot. The end of
the file checks that ``<|endoftext|>`` written in a prompt is the special token
on both backends (tiny GPT-2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastpilot.loader import load
from tests.fim_models import FimModel, Reference, build_fim_models
from tests.servers import ROOT, ServeProcess
from tests.tinymodels import EOT, SNIPPETS

PREFIX = "def fibonacci(n):\n    if n < 2:\n        return n\n    "
SUFFIX = "\n\nprint(fibonacci(10))\n"
N = 24  # tokens to generate


@pytest.fixture(scope="session")
def fim_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FimModel]:
    return build_fim_models(tmp_path_factory.mktemp("fim-gguf"))


@pytest.fixture(scope="module", params=["qwen2", "starcoder2"])
def arch(request: pytest.FixtureRequest, fim_models: dict[str, FimModel]):
    model = fim_models[request.param]
    ref = Reference(model.path)
    with ServeProcess(
        ["--model", f"q={model.path}", "--trust-unverified-models", "--threads", "1"]
    ) as server:
        yield model, ref, server
    ref.close()


def post(server: ServeProcess, path: str, body: dict) -> dict:
    status, data = server.request("POST", path, body, timeout=120)
    assert status == 200, data[:500]
    return json.loads(data)


def expected(ref: Reference, prefix: str, suffix: str) -> tuple[list[int], list[int], bool]:
    """(prompt ids, llama.cpp's greedy tokens, whether an end-of-generation token ended them)."""
    pre, suf, mid = ref.fim_ids()
    ids = [pre, *ref.tokenize(prefix), suf, *ref.tokenize(suffix), mid]
    out, ended = ref.greedy(ids, N)
    return ids, out, ended


def test_fim_tokens_are_found_and_listed(arch):
    model, ref, server = arch
    pre, suf, mid = ref.fim_ids()
    assert (pre, suf, mid) == tuple(ref.special(t) for t in (model.pre, model.suf, model.mid))
    status, data = server.request("GET", "/v1/models")
    assert status == 200 and json.loads(data)["data"][0]["supports_fim"] is True


def test_suffix_equals_llama_cpp_greedy_continuation(arch):
    model, ref, server = arch
    ids, out, ended = expected(ref, PREFIX, SUFFIX)
    text = ref.text(out[:-1] if ended else out)
    status, raw = server.request(
        "POST",
        "/v1/completions",
        {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": N, "temperature": 0},
    )
    assert status == 200, raw[:300]
    r = json.loads(raw)
    assert r["choices"][0]["text"] == text
    assert r["choices"][0]["finish_reason"] == ("stop" if ended else "length")
    assert r["usage"]["prompt_tokens"] == len(ids)
    assert r["usage"]["completion_tokens"] == len(out)
    # A FIM model does not say "ignored".
    assert b"x-fastpilot-suffix" not in raw


def test_client_rendered_markup_equals_the_suffix_form(arch):
    model, ref, server = arch
    ids, out, ended = expected(ref, PREFIX, SUFFIX)
    rendered = model.pre + PREFIX + model.suf + SUFFIX + model.mid
    r = post(server, "/v1/completions", {"prompt": rendered, "max_tokens": N, "temperature": 0})
    assert r["choices"][0]["text"] == ref.text(out[:-1] if ended else out)
    assert r["usage"]["prompt_tokens"] == len(ids)  # the markers became single tokens
    ids_r = post(server, "/v1/tokenize", {"prompt": rendered})
    assert ids_r["tokens"] == ids


def test_infill_route_equals_llama_cpp(arch):
    model, ref, server = arch
    ids, out, ended = expected(ref, PREFIX, SUFFIX)
    r = post(
        server,
        "/infill",
        {"input_prefix": PREFIX[:20], "prompt": PREFIX[20:], "input_suffix": SUFFIX,
         "n_predict": N, "temperature": 0},
    )  # fmt: skip
    assert r["content"] == ref.text(out[:-1] if ended else out)
    assert r["tokens_evaluated"] == len(ids) and r["tokens_predicted"] == len(out)
    assert r["stop"] is True and r["truncated"] is False


def test_library_infill_equals_llama_cpp(arch):
    model, ref, _ = arch
    _, out, ended = expected(ref, PREFIX, SUFFIX)
    lib_model = load(str(model.path), trust_unverified=True, threads=1)
    try:
        assert lib_model.supports_fim
        r = lib_model.complete(prompt=PREFIX, suffix=SUFFIX, max_tokens=N, temperature=0)
        assert r["choices"][0]["text"] == ref.text(out[:-1] if ended else out)
    finally:
        lib_model.close()


def test_warm_up_then_cached_follow_up(arch):
    model, ref, server = arch
    extra = [
        {"filename": "util.py", "text": "def helper(x):\n    return x * 2\n"},
        {"filename": "main.py", "text": "import util\n\nprint(util.helper(3))\n"},
    ]
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": extra,
            "temperature": 0, "cache_prompt": True}  # fmt: skip
    warm = post(server, "/infill", {**body, "n_predict": 0})
    assert warm["content"] == "" and warm["tokens_predicted"] == 0
    follow = post(server, "/infill", {**body, "n_predict": N})
    assert follow["tokens_evaluated"] == warm["tokens_evaluated"]
    # The warm-up left the prompt in the cache: the follow-up evaluates (almost) nothing.
    assert follow["timings"]["prompt_n"] < warm["timings"]["prompt_n"]
    assert follow["timings"]["prompt_n"] <= 1
    assert follow["tokens_cached"] == follow["tokens_evaluated"] - follow["timings"]["prompt_n"]
    # And the repository context is in the model's own format.
    pre, suf, mid = ref.fim_ids()
    lib = ref.lib
    rep, sep = int(lib.llama_vocab_fim_rep(ref.vocab)), int(lib.llama_vocab_fim_sep(ref.vocab))
    if model.arch == "qwen2":
        assert rep >= 0 and sep >= 0
        ctx = [rep, *ref.tokenize("myproject\n")]
        for f in extra:
            ctx += [sep, *ref.tokenize(f["filename"] + "\n" + f["text"])]
        ctx += [sep, *ref.tokenize("filename\n")]
    else:  # StarCoder2's vocabulary has no FIM_SEP llama.cpp knows: plain snippets
        assert sep < 0
        gap = ref.tokenize("\n\n--- snippet ---\n\n")
        ctx = [t for f in extra for t in gap + ref.tokenize(f["text"])] + gap
    ids = ctx + [pre, *ref.tokenize(PREFIX), suf, *ref.tokenize(SUFFIX), mid]
    assert follow["tokens_evaluated"] == len(ids)
    out, ended = ref.greedy(ids, N)
    assert follow["content"] == ref.text(out[:-1] if ended else out)


# -- special tokens written in the prompt, tiny GPT-2 on both backends -----------------------


@pytest.mark.parametrize("key", ["ct2-float32", "gguf-f32"])
def test_endoftext_in_prompt_is_the_special_token(tiny_gpt2_models: dict[str, Path], key: str):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tiny_gpt2_models["hf"] / "tokenizer.json"))
    eot = hf.token_to_id(EOT)
    model = load(str(tiny_gpt2_models[key]), threads=1)
    try:
        text = EOT + "def f(x):\n    return x" + EOT + "\n"
        ids = model.tokenize(text)
        assert ids.count(eot) == 2 and ids[0] == eot
        assert ids == hf.encode(text, add_special_tokens=False).ids
        # Plain text (no special tokens) tokenizes exactly as before.
        for snippet in SNIPPETS:
            assert model.tokenize(snippet) == hf.encode(snippet, add_special_tokens=False).ids
        as_text = model.complete(prompt=EOT + "def", max_tokens=8, temperature=0)
        as_ids = model.complete(prompt=[eot, *model.tokenize("def")], max_tokens=8, temperature=0)
        assert as_text["choices"][0]["text"] == as_ids["choices"][0]["text"]
        assert as_text["usage"]["prompt_tokens"] == 1 + len(model.tokenize("def"))
    finally:
        model.close()


def test_cli_complete_with_suffix_equals_llama_cpp(fim_models: dict[str, FimModel]):
    model = fim_models["qwen2"]
    ref = Reference(model.path)
    try:
        _, out, ended = expected(ref, PREFIX, SUFFIX)
        want = ref.text(out[:-1] if ended else out)
    finally:
        ref.close()
    cmd = [sys.executable, "-m", "fastpilot.cli", "complete", PREFIX, "--suffix", SUFFIX,
           "--model", str(model.path), "--max-tokens", str(N), "--threads", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FASTPILOT_TRUST_UNVERIFIED_MODELS": "1"}
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.decode("utf-8", "replace") == want + "\n"
    assert b"was ignored" not in done.stderr


def test_cli_warns_when_the_model_cannot_infill(tiny_gpt2_models: dict[str, Path]):
    cmd = [sys.executable, "-m", "fastpilot.cli", "complete", "def f(", "--suffix", "x)",
           "--model", str(tiny_gpt2_models["gguf-f32"]), "--max-tokens", "4"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert b"cannot fill in the middle; --suffix was ignored" in done.stderr


def test_truncation_keeps_prefix_end_and_suffix_start(arch):
    """Copilot's engine route truncates: what the model saw is what usage counts."""
    model, ref, server = arch
    prefix = "".join(SNIPPETS) * 3 + PREFIX
    suffix = SUFFIX + "".join(reversed(SNIPPETS)) * 3
    n_pre, n_suf = len(ref.tokenize(prefix)), len(ref.tokenize(suffix))
    room = 256 - 3 - min(16, 256 // 4)  # context - markers - reserved completion tokens
    assert n_pre + n_suf > room  # the case under test
    # The documented split: the suffix keeps at least a quarter, the prefix the rest.
    keep_s = min(n_suf, max(room // 4, room - n_pre))
    keep_p = min(n_pre, room - keep_s)
    pre, suf, mid = ref.fim_ids()
    ids = [pre, *ref.tokenize(prefix)[n_pre - keep_p :], suf, *ref.tokenize(suffix)[:keep_s], mid]
    out, ended = ref.greedy(ids, 16)
    r = post(
        server,
        "/v1/engines/copilot-codex/completions",
        {"prompt": prefix, "suffix": suffix, "max_tokens": 16, "temperature": 0},
    )
    assert r["usage"]["prompt_tokens"] == len(ids)
    assert r["choices"][0]["text"] == ref.text(out[:-1] if ended else out)
    # /v1/completions refuses the same request unless asked to truncate.
    status, raw = server.request(
        "POST", "/v1/completions", {"prompt": prefix, "suffix": suffix, "max_tokens": 16}
    )
    assert status == 400 and json.loads(raw)["error"]["code"] == "context_length_exceeded"


def test_bad_infill_bodies_on_the_real_server(arch):
    _, _, server = arch
    bad = [
        {"input_prefix": 1},
        {"input_extra": [{"filename": "a.py", "text": None}]},
        {"input_extra": [{"text": "x"}] * 5000},
        {"n_predict": "lots"},
        {"input_prefix": "x", "stop": [{"no": 1}]},
    ]
    for body in bad:
        status, raw = server.request("POST", "/infill", body)
        assert status == 400, (body, raw[:200])
        assert json.loads(raw)["error"]["type"] == "invalid_request_error"
    huge = {"input_extra": [{"filename": "f.py", "text": "x = 1\n" * 200_000}] * 5}
    status, _ = server.request("POST", "/infill", huge)
    assert status == 413
    # Still serving, and an input_extra far beyond the context just loses its oldest chunks.
    many = [{"filename": f"f{i}.py", "text": f"v{i} = {i}\n" * 20} for i in range(40)]
    body = {"input_prefix": PREFIX, "input_extra": many, "n_predict": 2, "temperature": 0}
    r = post(server, "/infill", body)
    assert r["tokens_evaluated"] <= 256 - 2 and r["tokens_predicted"] == 2
