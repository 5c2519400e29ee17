"""Real-size layer shapes (GPT-2 small, CodeGen-350M, CodeGen-2B) with few layers.

The released checkpoints cannot be downloaded in CI, so random models with the real
per-layer shapes (head_dim 64/80, rotary_dim 32/64, 51200-row padded vocab, 1024 and
2048 contexts) stand in; only the layer count is cut. Marked ``slow``: run with
``pytest -m slow tests/test_conversion_fullsize.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conversion.convert import Target, convert
from conversion.manifest import verify
from tests import tinymodels

pytestmark = pytest.mark.slow

SHAPES = {
    # name: (model_type, config overrides)
    "gpt2-small": ("gpt2", {"n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}),
    "codegen-350M": (
        "codegen",
        {
            "n_embd": 1024,
            "n_head": 16,
            "rotary_dim": 32,
            "n_positions": 2048,
            "n_ctx": 2048,
            "vocab_size": 51200,
        },
    ),
    "codegen-2B": (
        "codegen",
        {
            "n_embd": 2560,
            "n_head": 32,
            "rotary_dim": 64,
            "n_positions": 2048,
            "n_ctx": 2048,
            "vocab_size": 51200,
        },
    ),
}


def _build(kind: str, overrides: dict, tok_dir: Path, out: Path) -> Path:
    import shutil

    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    eos = tinymodels.VOCAB_SIZE - 1
    common = {
        "n_layer": 2,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "activation_function": "gelu_new",
    }
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(**common, **overrides))
    else:
        model = CodeGenForCausalLM(CodeGenConfig(**common, **overrides, tie_word_embeddings=False))
    model.eval().save_pretrained(out)
    for p in tok_dir.iterdir():
        shutil.copy(p, out / p.name)
    return out


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fullsize_shapes(shape: str, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    kind, overrides = SHAPES[shape]
    hf = _build(kind, overrides, tiny_tokenizer_dir, tmp_path / "hf")
    out = tmp_path / "out"
    targets = [
        Target("ct2", "float32"),
        Target("ct2", "int8"),
        Target("gguf", "f16"),
        Target("gguf", "q4_k_m"),
    ]
    convert(str(hf), shape, targets, out=out)
    for t in targets:
        assert verify(out / t.dirname).vocab_size == overrides["vocab_size"]

    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(hf / "tokenizer.json")).encode(tinymodels.SNIPPETS[0]).ids
    [ref] = tinymodels.hf_logits(hf, [ids])

    import ctranslate2
    import llama_cpp

    ct2 = np.asarray(
        ctranslate2.Generator(str(out / "ct2-float32"), intra_threads=2).forward_batch([ids])
    )[0]
    llm = llama_cpp.Llama(
        str(out / "gguf-f16" / "model.gguf"), n_ctx=256, n_threads=2, logits_all=True, verbose=False
    )
    llm.eval(ids)
    gguf = np.array(llm.scores[: len(ids)])
    llm.close()
    scale = float(np.abs(ref).max())
    print(
        f"\n{shape}: max|logit| {scale:.3g}, ct2-float32 max diff {np.abs(ct2 - ref).max():.3g}, "
        f"gguf-f16 max diff {np.abs(gguf - ref).max():.3g}"
    )
    assert np.abs(ct2 - ref).max() <= 1e-3 * max(1.0, scale)
    assert np.abs(gguf - ref).max() <= 2e-2 * max(1.0, scale)
