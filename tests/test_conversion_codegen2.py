"""CodeGen2: 8-group qkv conversion parity, and its fill-in-the-middle prompt's token ids.

Parity is measured against transformers on a random CodeGen2-layout checkpoint (8
heads of 128, qkv packed in 8 groups; see ``tests/tinymodels_infill.py``), with the
tolerances of ``test_conversion_parity.py``: CT2 float32 <= 1e-3 of the logits, GGUF
f32 <= 5e-3 (llama.cpp's fp16 GELU table), f16 <= 2e-2, quantized top-1 agreement.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import tinymodels
from tests.infill_fixtures import codegen2_models  # noqa: F401
from tests.test_conversion_parity import _compare, _ct2_logits, _gguf_logits

FIM_PIECES = (
    ("def area(r):\n    return ", "\n\nprint(area(2))\n"),
    ("class Café:\n\t", "\t\treturn None  # 中文\n"),
    ("", "x = 1\n"),
)


def fim_prompt(prefix: str, suffix: str) -> str:
    """CodeGen2's infill prompt, as its model card writes it."""
    return prefix + "<mask_1>" + suffix + "<|endoftext|>" + "<sep>" + "<mask_1>"


@pytest.fixture(scope="module")
def sequences(codegen2_models: dict[str, Path]) -> list[list[int]]:  # noqa: F811
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(codegen2_models["hf"] / "tokenizer.json"))
    seqs = [tok.encode(s).ids for s in tinymodels.SNIPPETS]
    seqs += [tok.encode(fim_prompt(p, s)).ids for p, s in FIM_PIECES]
    long = tok.encode("".join(tinymodels.SNIPPETS) * 3).ids[: tinymodels.N_CTX - 8]
    return [*seqs, long]


@pytest.fixture(scope="module")
def reference(codegen2_models: dict[str, Path], sequences: list[list[int]]) -> list:  # noqa: F811
    return tinymodels.hf_logits(codegen2_models["ref"], sequences)


CASES = [  # key, max |dlogit|, min top-1 agreement, max mean KL (nats)
    ("ct2-float32", 1e-3, 1.0, 1e-6),
    ("gguf-f32", 5e-3, 1.0, 1e-5),
    ("gguf-f16", 2e-2, 0.98, 1e-4),
    ("ct2-int8", None, 0.9, 1e-2),
    ("gguf-q8_0", None, 0.9, 1e-2),
    ("gguf-q4_k_m", None, 0.4, 0.2),
]


@pytest.mark.parametrize(
    ("key", "max_diff", "min_top1", "max_kl"), CASES, ids=[c[0] for c in CASES]
)
def test_codegen2_logit_parity(
    codegen2_models: dict[str, Path],  # noqa: F811
    sequences: list[list[int]],
    reference: list,
    key: str,
    max_diff: float | None,
    min_top1: float,
    max_kl: float,
) -> None:
    logits = _ct2_logits if key.startswith("ct2") else _gguf_logits
    stats = _compare("codegen2", key, logits(codegen2_models[key], sequences), reference)
    if max_diff is not None:
        assert stats["max_abs_diff"] <= max_diff
    assert stats["top1_agreement"] >= min_top1
    assert stats["mean_kl"] <= max_kl


def test_codegen2_is_told_apart_by_head_dim(codegen2_models: dict[str, Path]) -> None:  # noqa: F811
    """The same weights read as CodeGen-1 (4 groups) give another model: the split matters."""
    from conversion.architectures import CodeGenLoader, split_codegen_qkv
    from conversion.checkpoint import load_checkpoint

    ckpt = load_checkpoint(codegen2_models["hf"])
    loader = CodeGenLoader(ckpt)
    assert loader.generation(1024, 8) == ("codegen2", 8)
    w = ckpt.weights.get("transformer.h.0.attn.qkv_proj.weight")
    as8 = np.concatenate(split_codegen_qkv(w, 8))
    as4 = np.concatenate(split_codegen_qkv(w, 4))
    assert not np.array_equal(as8, as4)
    manifest = json.loads((codegen2_models["ct2-float32"] / "fastpilot.json").read_text())
    assert manifest["arch"] == "codegen2"


def test_codegen2_head_dim_must_agree(tmp_path: Path, codegen2_models: dict[str, Path]) -> None:  # noqa: F811
    from conversion.convert import Target, convert
    from fastpilot.errors import ConversionError

    bad = tmp_path / "bad"
    bad.mkdir()
    for p in codegen2_models["hf"].iterdir():
        (bad / p.name).symlink_to(p)
    (bad / "config.json").unlink()
    cfg = json.loads((codegen2_models["hf"] / "config.json").read_text())
    cfg["head_dim"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="head_dim 64 disagrees"):
        convert(str(bad), "x", [Target("ct2", "float32")], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["ct2-float32", "gguf-f32"])
def test_codegen2_manifest_declares_infill(codegen2_models: dict[str, Path], key: str) -> None:  # noqa: F811
    from tokenizers import Tokenizer

    manifest = json.loads((codegen2_models[key] / "fastpilot.json").read_text())
    assert manifest["fim"] == {
        "style": "codegen2",
        "mask": "<mask_1>",
        "eot": "<|endoftext|>",
        "sep": "<sep>",
        "end": "<eom>",
    }
    tok = Tokenizer.from_file(str(codegen2_models[key] / "tokenizer.json"))
    eom, eot = tok.token_to_id("<eom>"), tok.token_to_id("<|endoftext|>")
    assert manifest["eos_token_ids"] == [eot, eom]


@pytest.mark.parametrize(("prefix", "suffix"), FIM_PIECES)
def test_codegen2_fim_prompt_ids_equal_hf(
    codegen2_models: dict[str, Path],  # noqa: F811
    prefix: str,
    suffix: str,
) -> None:
    """The infill prompt tokenizes as HF's tokenizer does: in tokenizer.json and in the GGUF."""
    import llama_cpp
    from tokenizers import Tokenizer

    text = fim_prompt(prefix, suffix)
    expected = tinymodels.hf_tokenize(codegen2_models["hf"], text)
    marks = [tinymodels.hf_tokenize(codegen2_models["hf"], t) for t in ("<mask_1>", "<sep>")]
    assert all(len(m) == 1 for m in marks)  # the markers are single tokens
    assert expected.count(marks[0][0]) == 2 and expected.count(marks[1][0]) == 1

    for key in ("ct2-float32", "gguf-f32"):  # both backends read the output's tokenizer.json
        tok = Tokenizer.from_file(str(codegen2_models[key] / "tokenizer.json"))
        assert tok.encode(text, add_special_tokens=False).ids == expected

    llm = llama_cpp.Llama(
        str(codegen2_models["gguf-f32"] / "model.gguf"), vocab_only=True, verbose=False
    )
    try:
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert got == expected
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        eom = tinymodels.hf_tokenize(codegen2_models["hf"], "<eom>")[0]
        assert llama_cpp.llama_vocab_is_eog(vocab, eom)  # llama.cpp stops at <eom>
    finally:
        llm.close()


def test_codegen2_fim_greedy_matches_reference(
    codegen2_models: dict[str, Path],  # noqa: F811
) -> None:
    """Greedy continuation of an infill prompt: CT2 float32 equals transformers' argmax."""
    import ctranslate2
    import torch
    from transformers import AutoModelForCausalLM

    prompt = tinymodels.hf_tokenize(codegen2_models["hf"], fim_prompt(*FIM_PIECES[0]))
    ref = AutoModelForCausalLM.from_pretrained(codegen2_models["ref"], dtype=torch.float32)
    expected: list[int] = []
    with torch.no_grad():  # argmax step by step, through any end token
        for _ in range(12):
            logits = ref(torch.tensor([prompt + expected])).logits[0, -1]
            expected.append(int(logits.argmax()))
    gen = ctranslate2.Generator(str(codegen2_models["ct2-float32"]), intra_threads=2)
    vocab = json.loads((codegen2_models["ct2-float32"] / "vocabulary.json").read_text())
    res = gen.generate_batch(
        [[vocab[i] for i in prompt]],
        max_length=12,
        sampling_topk=1,
        include_prompt_in_result=False,
        end_token=[],
    )
    assert res[0].sequences_ids[0] == expected


@pytest.mark.parametrize("key", ["ct2-float32", "gguf-f32"])
def test_codegen2_infill_through_suffix_equals_reference(
    codegen2_models: dict[str, Path],  # noqa: F811
    key: str,
) -> None:
    """Served from the converted files, ``suffix`` renders CodeGen2's prompt from the manifest.

    The engine's answer equals transformers' greedy continuation of the same prompt,
    stopped at ``<eom>`` or ``<|endoftext|>`` (never returned as text).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from fastpilot.loader import load

    prefix, suffix = FIM_PIECES[0]
    prompt = tinymodels.hf_tokenize(codegen2_models["hf"], fim_prompt(prefix, suffix))
    ends = {tinymodels.hf_tokenize(codegen2_models["hf"], t)[0] for t in ("<eom>", "<|endoftext|>")}
    ref = AutoModelForCausalLM.from_pretrained(codegen2_models["ref"], dtype=torch.float32)
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            token = int(ref(torch.tensor([prompt + expected])).logits[0, -1].argmax())
            if token in ends:
                break
            expected.append(token)
    model = load(codegen2_models[key], name="codegen2", threads=2)
    try:
        out = model.complete(prompt=prefix, suffix=suffix, max_tokens=8, temperature=0)
        assert out["choices"][0]["text"] == model.backend.detokenize(expected)
        assert out["usage"]["prompt_tokens"] == len(prompt)
    finally:
        model.close()
