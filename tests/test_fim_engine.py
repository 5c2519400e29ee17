"""The FIM layer (engine/fim.py, engine/prompt.py) on the fake backend: formats, budget, routes.

The fake's tokenizer is byte-level (one id per byte outside its few words), so
token counts below are character counts, and marker ids are easy to read.
"""

from __future__ import annotations

import pytest

from fastpilot.backends.base import FimTemplate
from fastpilot.backends.fim_tokens import FimTokenIds
from fastpilot.engine.fim import (
    ContextFile,
    FimFormat,
    FimOrder,
    FimStyle,
    build_fim_prompt,
    fim_format,
    split_budget,
)
from fastpilot.engine.model import Model
from fastpilot.engine.params import CompletionRequest, ContextMode
from fastpilot.engine.prompt import prepare
from fastpilot.errors import ContextLengthExceeded, InvalidRequest, NotSupported
from tests.fakes import FakeBackend
from tests.test_api_support import client

# Three byte ids the fake's text never produces in these tests stand in for FIM tokens.
PRE, SUF, MID, REP, SEP, PAD = 1, 2, 3, 4, 5, 6
IDS = FimTokenIds(pre=PRE, suf=SUF, mid=MID, pad=PAD, rep=REP, sep=SEP, end=frozenset({PAD}))


@pytest.fixture
def backend():
    b = FakeBackend(context_length=64)
    yield b
    b.close()


def ids(b: FakeBackend, text: str) -> list[int]:
    return b.tokenize(text)


def test_split_budget_keeps_prefix_end_and_suffix_start():
    assert split_budget(10, 5, 100) == (10, 5)  # both fit
    assert split_budget(100, 100, 40) == (30, 10)  # 3:1 when both are long
    assert split_budget(5, 100, 40) == (5, 35)  # a short prefix leaves the rest to the suffix
    assert split_budget(100, 3, 40) == (37, 3)  # a short suffix leaves the rest to the prefix
    assert split_budget(100, 100, 0) == (0, 0)


def test_format_comes_from_what_the_model_declares(backend):
    assert fim_format(backend).style is FimStyle.CANNOT
    backend.fim_tokens = IDS
    assert fim_format(backend) == FimFormat.from_token_ids(IDS)
    backend.fim_spec = {"order": "spm"}
    assert fim_format(backend).order is FimOrder.SPM
    backend.fim_spec = {"style": "codegen2", "mask": "<mask_1>", "eot": "<|endoftext|>",
                        "sep": "<sep>", "end": "<eom>"}  # fmt: skip
    assert fim_format(backend).style is FimStyle.CODEGEN2
    backend.fim_spec = {"style": "t5-span", "sentinel": "<extra_id_0>"}
    assert fim_format(backend).style is FimStyle.T5_SPAN
    backend.fim_spec, backend.fim_tokens = None, None
    backend.fim = FimTemplate("<PRE>", "<SUF>", "<MID>")
    assert fim_format(backend).style is FimStyle.TEMPLATE


def test_token_ids_render_psm_and_spm(backend):
    fmt = FimFormat.from_token_ids(IDS)
    fp = build_fim_prompt(backend, fmt, "ab", "cd", room=100)
    assert list(fp.ids) == [PRE, *ids(backend, "ab"), SUF, *ids(backend, "cd"), MID]
    assert PAD in fp.stop_ids
    spm = FimFormat.from_token_ids(IDS, FimOrder.SPM)
    fp = build_fim_prompt(backend, spm, "ab", "cd", room=100)
    assert list(fp.ids) == [SUF, *ids(backend, "cd"), PRE, *ids(backend, "ab"), MID]


def test_codegen2_layout_and_eom_stop(backend):
    fmt = FimFormat.codegen2()
    fp = build_fim_prompt(backend, fmt, "x=", ";", room=200)
    text = "x=<mask_1>;<|endoftext|><sep><mask_1>"
    assert list(fp.ids) == ids(backend, text)
    assert fp.stop_ids == frozenset(ids(backend, "<eom>"))


def test_t5_span_layout(backend):
    fp = build_fim_prompt(backend, FimFormat.t5_span(), "a", "b", room=100)
    assert list(fp.ids) == ids(backend, "a<extra_id_0>b")


def test_repo_level_context_and_oldest_files_dropped_first(backend):
    fmt = FimFormat.from_token_ids(IDS)
    files = [ContextFile("old.py", "o" * 20), ContextFile("new.py", "n" * 5)]
    fp = build_fim_prompt(backend, fmt, "p", "s", files, room=200)
    head = [REP, *ids(backend, "myproject\n")]
    body = [SEP, *ids(backend, "old.py\n" + "o" * 20), SEP, *ids(backend, "new.py\n" + "n" * 5)]
    foot = [SEP, *ids(backend, "filename\n")]
    assert list(fp.ids) == head + body + foot + [PRE, ids(backend, "p")[0], SUF,
                                                 ids(backend, "s")[0], MID]  # fmt: skip
    # Room for the newest file only: the oldest goes first, prefix and suffix stay whole.
    room = len(fp.ids) - 10
    fp2 = build_fim_prompt(backend, fmt, "p", "s", files, room=room)
    assert (fp2.files_kept, fp2.files_dropped, fp2.truncated) == (1, 1, 0)
    text = backend.detokenize(fp2.ids)
    assert "new.py" in text and "old.py" not in text


def test_plain_separator_without_file_sep_token(backend):
    fmt = FimFormat.from_token_ids(FimTokenIds(pre=PRE, suf=SUF, mid=MID))
    fp = build_fim_prompt(backend, fmt, "p", "s", [ContextFile("a.py", "AAA")], room=200)
    text = backend.detokenize(fp.ids)
    assert text.startswith("\n\n--- snippet ---\n\nAAA") and "a.py" not in text


def test_prepare_truncates_prefix_start_and_suffix_end(backend):
    backend.fim_tokens = IDS
    prefix, suffix = "".join(chr(65 + i % 26) for i in range(80)), "0123456789" * 8
    req = CompletionRequest(prompt=prefix, suffix=suffix, max_tokens=8)
    prep = prepare(backend, req)
    # 64 context - 8 reserved = 56 for the prompt; 3 markers; 53 split 40/13.
    assert len(prep.prompt_ids) == 56 and prep.max_tokens == 8
    assert prep.prompt_ids[1:41] == tuple(ids(backend, prefix[-40:]))
    assert prep.prompt_ids[42:55] == tuple(ids(backend, suffix[:13]))
    assert prep.truncated == 80 - 40 + 80 - 13


def test_prepare_error_mode_refuses_instead(backend):
    backend.fim_tokens = IDS
    req = CompletionRequest(
        prompt="a" * 40, suffix="b" * 40, max_tokens=8, context_mode=ContextMode.ERROR
    )
    with pytest.raises(ContextLengthExceeded):
        prepare(backend, req)


def test_markers_alone_too_long(backend):
    backend.fim_spec = {"prefix": "P" * 40, "suffix": "S" * 40, "middle": "M"}
    with pytest.raises(ContextLengthExceeded):
        prepare(backend, CompletionRequest(prompt="a", suffix="b", max_tokens=4))


def test_infill_on_a_model_that_cannot_is_refused(backend):
    with pytest.raises(NotSupported):
        prepare(backend, CompletionRequest(prompt="a", infill=True))
    # A plain suffix is ignored, and said so.
    prep = prepare(backend, CompletionRequest(prompt="a", suffix="b"))
    assert prep.suffix_ignored and not prep.fim_used


def test_echo_with_fim_is_refused(backend):
    backend.fim_tokens = IDS
    with pytest.raises(InvalidRequest):
        prepare(backend, CompletionRequest(prompt="a", suffix="b", echo=True))


def test_library_usage_counts_the_rendered_prompt_and_stops_at_fim_end():
    b = FakeBackend(script="x<PAD>")  # greedy writes "x" then byte "<", ... (no PAD id)
    b.fim_tokens = FimTokenIds(pre=PRE, suf=SUF, mid=MID, end=frozenset({ord("<")}))
    m = Model("fake", b)
    try:
        out = m.complete(prompt="ab", suffix="cd", max_tokens=10, temperature=0)
        assert out.fim_used and not out.suffix_ignored
        assert b.submitted[-1].prompt_ids == [PRE, 97, 98, SUF, 99, 100, MID]
        assert out["usage"]["prompt_tokens"] == 7
        # "<" is an end token of this format: the middle ends there, not returned.
        assert out["choices"][0]["text"] == "x"
        assert out["choices"][0]["finish_reason"] == "stop"
        assert m.supports_fim
    finally:
        m.close()


def test_http_suffix_header_only_for_models_that_cannot_infill():
    api, backend, registry = client()
    try:
        body = {"prompt": "ab", "suffix": "cd", "max_tokens": 2}
        r = api.simulate_post("/v1/completions", json=body)
        assert r.status_code == 200 and r.headers.get("x-fastpilot-suffix") == "ignored"
        assert api.simulate_get("/v1/models").json["data"][0]["supports_fim"] is False
        backend.fim_tokens = IDS
        r = api.simulate_post("/v1/completions", json=body)
        assert r.status_code == 200 and "x-fastpilot-suffix" not in r.headers
        assert r.json["usage"]["prompt_tokens"] == 7
        assert backend.submitted[-1].prompt_ids[0] == PRE
        assert api.simulate_get("/v1/models").json["data"][0]["supports_fim"] is True
        # The engine (Copilot) route uses the same layer.
        r = api.simulate_post("/v1/engines/copilot-codex/completions", json=body)
        assert r.status_code == 200 and backend.submitted[-1].prompt_ids[-1] == MID
    finally:
        registry.close_all()
