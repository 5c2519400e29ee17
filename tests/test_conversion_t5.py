"""T5 (CodeT5 / CodeT5+) conversion: logit and greedy parity of CT2 against transformers.

Shapes (``tests/tinymodels_infill.T5_SHAPES``): CodeT5-base-like (relu, tied, 4x64
heads), CodeT5+-770m-like (deeper, 8x32 heads) and a T5 v1.1-like variant (gated
GELU, untied head, attention width != d_model).

Logits are compared teacher-forced on real code at every decoder position, full
vocabulary: CT2 float32 within 1e-3 of the logit scale (max |reference logit|, at
least 1), and the greedy decode equals transformers'; CT2 int8 keeps top-1
agreement >= 0.9.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import tinymodels, tinymodels_infill
from tests.infill_fixtures import t5_models  # noqa: F401

SHAPES = tuple(tinymodels_infill.T5_SHAPES)
MAX_NEW = 24


@pytest.fixture(scope="module")
def sources(t5_models: dict[str, dict[str, Path]]) -> list[list[int]]:  # noqa: F811
    """Encoder inputs as the tokenizer makes them (``<s> ... </s>``), one with a sentinel."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(t5_models[SHAPES[0]]["hf"] / "tokenizer.json"))
    texts = [*tinymodels.SNIPPETS[:3], "def add(a, b):\n    <extra_id_0>\n\nprint(add(1, 2))\n"]
    return [tok.encode(t).ids for t in texts]


@pytest.fixture(scope="module")
def targets(t5_models: dict[str, dict[str, Path]]) -> list[list[int]]:  # noqa: F811
    """Decoder sequences to force: code continuations, and a span answer for the sentinel."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(t5_models[SHAPES[0]]["hf"] / "tokenizer.json"))
    texts = [*tinymodels.SNIPPETS[2:5], "<extra_id_0>return a + b<extra_id_1>"]
    return [tok.encode(t, add_special_tokens=False).ids[:40] for t in texts]


def _translator(model_dir: Path):  # type: ignore[no-untyped-def]
    import ctranslate2

    return ctranslate2.Translator(str(model_dir), device="cpu", intra_threads=2)


def _vocab(model_dir: Path) -> list[str]:
    return json.loads((model_dir / "shared_vocabulary.json").read_text(encoding="utf-8"))


def _ct2_greedy(model_dir: Path, source: list[int]) -> list[int]:
    """CT2's greedy tokens (the end token included when reached)."""
    vocab = _vocab(model_dir)
    translator = _translator(model_dir)
    res = translator.translate_batch(
        [[vocab[i] for i in source]],
        beam_size=1,
        max_decoding_length=MAX_NEW,
        min_decoding_length=0,
        return_end_token=True,
    )[0]
    del translator
    index = {t: i for i, t in enumerate(vocab)}
    return [index[t] for t in res.hypotheses[0]]


def _ct2_forced_logits(model_dir: Path, source: list[int], target: list[int]) -> np.ndarray:
    """CT2's decoder logits ``(len(target) + 1, vocab)`` with ``target`` forced as prefix."""
    vocab = _vocab(model_dir)
    translator = _translator(model_dir)
    res = translator.translate_batch(
        [[vocab[i] for i in source]],
        target_prefix=[[vocab[i] for i in target]],
        beam_size=1,
        max_decoding_length=len(target) + 1,
        min_decoding_length=0,  # else the end token's logit is masked at step 0
        return_logits_vocab=True,
    )[0]
    del translator
    return np.stack([np.asarray(x, dtype=np.float32).reshape(-1) for x in res.logits[0]])


@pytest.mark.parametrize("shape", SHAPES)
def test_t5_float32_logits_and_greedy_equal_transformers(
    t5_models: dict[str, dict[str, Path]],  # noqa: F811
    sources: list[list[int]],
    targets: list[list[int]],
    shape: str,
) -> None:
    """Teacher-forced logits on real code (every position, full vocabulary), then greedy."""
    paths = t5_models[shape]
    worst = 0.0
    for source, target in zip(sources, targets, strict=True):
        logits = _ct2_forced_logits(paths["ct2-float32"], source, target)
        ref = tinymodels_infill.t5_reference(paths["hf"], source, [0, *target])
        assert logits.shape == ref.shape == (len(target) + 1, ref.shape[1])
        scale = max(1.0, float(np.abs(ref).max()))
        diff = float(np.abs(logits - ref).max())
        worst = max(worst, diff / scale)
        assert diff <= 1e-3 * scale, (diff, scale)
        expected = tinymodels_infill.t5_greedy(paths["hf"], source, MAX_NEW)
        assert _ct2_greedy(paths["ct2-float32"], source) == expected
    print(f"\nparity t5 {shape:14s} ct2-float32 max|dlogit|/scale = {worst:.3g}")


@pytest.mark.parametrize("shape", SHAPES)
def test_t5_int8_keeps_top1(
    t5_models: dict[str, dict[str, Path]],  # noqa: F811
    sources: list[list[int]],
    targets: list[list[int]],
    shape: str,
) -> None:
    """Teacher-forced on real code, int8's argmax agrees with the reference's."""
    paths = t5_models[shape]
    agree = []
    for source, target in zip(sources, targets, strict=True):
        got = _ct2_forced_logits(paths["ct2-int8"], source, target)
        ref = tinymodels_infill.t5_reference(paths["hf"], source, [0, *target])
        agree.append(float(np.mean(got.argmax(-1) == ref.argmax(-1))))
    mean = float(np.mean(agree))
    print(f"\nparity t5 {shape:14s} ct2-int8 top-1 agreement = {mean:.3f}")
    assert mean >= 0.9


def test_t5_manifest_and_files(t5_models: dict[str, dict[str, Path]]) -> None:  # noqa: F811
    from tokenizers import Tokenizer

    out = t5_models["codet5-base"]["ct2-float32"]
    manifest = json.loads((out / "fastpilot.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert manifest["arch"] == "t5"
    assert manifest["format"] == "ct2"
    assert manifest["fim"] == {"style": "t5-span", "sentinel": "<extra_id_0>"}
    assert manifest["seq2seq"] == {
        "decoder_start_token_id": 0,
        "encoder_prefix_ids": [tok.token_to_id("<s>")],
        "encoder_suffix_ids": [tok.token_to_id("</s>")],
    }
    sentinels = {tok.token_to_id(f"<extra_id_{i}>") for i in range(tinymodels_infill.T5_SENTINELS)}
    assert manifest["eos_token_ids"][0] == tok.token_to_id("</s>")
    assert set(manifest["eos_token_ids"][1:]) == sentinels
    assert (out / "shared_vocabulary.json").is_file()


def test_t5_gguf_is_refused_and_all_means_ct2(
    t5_models: dict[str, dict[str, Path]],  # noqa: F811
    tmp_path: Path,
) -> None:
    from conversion.convert import DEFAULT_TARGETS, Target, convert
    from fastpilot.errors import ConversionError

    hf = t5_models["codet5-base"]["hf"]
    with pytest.raises(ConversionError, match="ct2 only"):
        convert(str(hf), "t", [Target("gguf", "q4_k_m")], out=tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()
    results = convert(str(hf), "t", DEFAULT_TARGETS, out=tmp_path / "all")
    assert [r.target for r in results] == [Target("ct2", "int8")]
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["ct2-int8"]


def test_t5_tokenizer_built_from_slow_files_equals_the_fast_one(
    t5_models: dict[str, dict[str, Path]],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A checkpoint with only vocab.json + merges.txt (as CodeT5 ships) gets RoBERTa's tokenizer."""
    from tokenizers import Tokenizer

    from conversion.convert import Target, convert

    hf = t5_models["codet5-base"]["hf"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in hf.iterdir():
        if p.name != "tokenizer.json":
            (bare / p.name).symlink_to(p)
    convert(str(bare), "t", [Target("ct2", "int8")], out=tmp_path / "out")
    built = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    original = Tokenizer.from_file(str(hf / "tokenizer.json"))
    texts = [*tinymodels.SNIPPETS, "def f(x):<extra_id_0>\n    return x<extra_id_1>"]
    for text in texts:
        for specials in (False, True):
            got = built.encode(text, add_special_tokens=specials).ids
            assert got == original.encode(text, add_special_tokens=specials).ids
    manifest = json.loads((tmp_path / "out" / "fastpilot.json").read_text())
    reference = json.loads((t5_models["codet5-base"]["ct2-int8"] / "fastpilot.json").read_text())
    assert manifest["seq2seq"] == reference["seq2seq"]
    assert manifest["eos_token_ids"] == reference["eos_token_ids"]
