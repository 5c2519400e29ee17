"""Checkpoint reading, tokenization parity, manifests, the CLI and `make convert`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conversion.checkpoint import open_weights
from conversion.convert import Target, convert
from conversion.manifest import read_manifest, verify
from fastpilot.errors import ModelFileError
from tests import tinymodels

ROOT = Path(__file__).resolve().parent.parent
ALL_KEYS = ("ct2-float32", "ct2-int8", "gguf-f32", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m")

# Beyond the snippets: stress the pre-tokenizer (digits, contractions, spaces, CJK, emoji
# sequences with joiners, a lone combining mark, mixed line endings).
EXTRA_TEXTS = (
    "    \t\t  \n\n\n        x = 1",
    "I've been 'told' he's there; 12345 678.9 0x1F",
    "naïve café résumé — “quotes” ½ ∑ λx: x² 🧑‍💻 🇫🇷 e\u0301",
    "def 函数(参数):\r\n\treturn 参数 * 2  # 中文注释",
    " " * 40 + "return",
)


# -- tokenization -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_gpt2_hf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt2_hf)


@pytest.mark.parametrize("arch", ["gpt2", "codegen"])
def test_ct2_tokenizer_matches_hf(tiny_models, hf_tokenizer, arch: str) -> None:
    from tokenizers import Tokenizer

    for key in ("ct2-float32", "ct2-int8"):
        model_dir = tiny_models[arch][key]
        manifest = read_manifest(model_dir)
        tok = Tokenizer.from_file(str(model_dir / manifest.tokenizer))
        for text in (*tinymodels.SNIPPETS, *EXTRA_TEXTS):
            expected = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tok.encode(text, add_special_tokens=False).ids == expected, (key, text)
            assert tok.decode(expected) == text


@pytest.mark.parametrize("arch", ["gpt2", "codegen"])
def test_gguf_tokenizer_matches_hf(tiny_models, hf_tokenizer, arch: str) -> None:
    import llama_cpp

    for key in ("gguf-f32", "gguf-q4_k_m"):
        llm = llama_cpp.Llama(
            str(tiny_models[arch][key] / "model.gguf"), vocab_only=True, verbose=False
        )
        for text in (*tinymodels.SNIPPETS, *EXTRA_TEXTS):
            expected = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            assert got == expected, (key, text)
            assert llm.detokenize(got).decode("utf-8") == text
        assert llm.token_eos() == tinymodels.VOCAB_SIZE - 1
        llm.close()


def test_gguf_vocab_padded_to_embedding(tiny_models) -> None:
    """CodeGen's padded rows get unused entries so n_vocab matches the output layer."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(tiny_models["codegen"]["gguf-f32"] / "model.gguf"), vocab_only=True, verbose=False
    )
    assert llm.n_vocab() == tinymodels.CODEGEN_PADDED_VOCAB
    llm.close()


def test_tokenizer_json_built_from_slow_files(
    tiny_gpt2_hf: Path, tmp_path: Path, hf_tokenizer
) -> None:
    """A checkpoint with only vocab.json + merges.txt gets an equivalent tokenizer.json."""
    from tokenizers import Tokenizer

    hf = shutil.copytree(tiny_gpt2_hf, tmp_path / "hf")
    (hf / "tokenizer.json").unlink()
    out = tmp_path / "out"
    convert(str(hf), "x", [Target("ct2", "int8")], out=out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in (*tinymodels.SNIPPETS, *EXTRA_TEXTS):
        assert tok.encode(text).ids == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


# -- manifests ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "codegen"])
def test_manifests(tiny_models, arch: str) -> None:
    for key in ALL_KEYS:
        model_dir = tiny_models[arch][key]
        manifest = verify(model_dir)
        fmt, quant = key.split("-", 1)
        assert manifest.format == fmt and manifest.quantization == quant
        assert manifest.arch == arch
        assert manifest.context_length == tinymodels.N_CTX
        expected_vocab = (
            tinymodels.CODEGEN_PADDED_VOCAB if arch == "codegen" else tinymodels.VOCAB_SIZE
        )
        assert manifest.vocab_size == expected_vocab
        assert manifest.eos_token_ids == (tinymodels.VOCAB_SIZE - 1,)
        assert manifest.fim is None
        assert manifest.tokenizer == "tokenizer.json"
        assert (model_dir / "tokenizer.json").is_file()
        weight_file = "model.bin" if fmt == "ct2" else "model.gguf"
        assert list(manifest.weights) == [weight_file]
        assert manifest.get("created") and manifest.get("fastpilot_version")
        if fmt == "gguf":
            assert manifest.get("gguf_arch") == ("gpt2" if arch == "gpt2" else "phi2")


def test_verify_detects_tampering(tiny_models, tmp_path: Path) -> None:
    model_dir = shutil.copytree(tiny_models["gpt2"]["gguf-q8_0"], tmp_path / "m")
    with (model_dir / "model.gguf").open("r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\0" * 10)
    read_manifest(model_dir)  # cheap read still fine
    with pytest.raises(ModelFileError, match="sha256"):
        verify(model_dir)
    (model_dir / "model.gguf").unlink()
    with pytest.raises(ModelFileError, match="missing"):
        verify(model_dir)
    with pytest.raises(ModelFileError, match="no fastpilot.json"):
        read_manifest(tmp_path)


def test_existing_output_is_kept_unless_forced(tiny_gpt2_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    [first] = convert(str(tiny_gpt2_hf), "x", [Target("gguf", "f16")], out=out)
    assert first.written
    created = read_manifest(out).weights
    [again] = convert(str(tiny_gpt2_hf), "x", [Target("gguf", "f16")], out=out)
    assert not again.written
    [forced] = convert(str(tiny_gpt2_hf), "x", [Target("gguf", "f16")], out=out, force=True)
    assert forced.written and read_manifest(out).weights == created  # deterministic bytes


# -- checkpoint formats -------------------------------------------------------------


def _reference_state(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sharded_half_precision_safetensors(
    tiny_codegen_hf: Path, tmp_path: Path, dtype: str
) -> None:
    """Sharded (index json) fp16/bf16 checkpoints are read with numpy, bf16 widened to f32."""
    import torch
    from safetensors.torch import save_file

    state = {k: torch.from_numpy(v.copy()) for k, v in _reference_state(tiny_codegen_hf).items()}
    hf = tmp_path / "hf"
    shutil.copytree(tiny_codegen_hf, hf, ignore=shutil.ignore_patterns("model.safetensors"))
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    torch_dtype = getattr(torch, dtype)
    for file, keys in shards.items():
        save_file({k: state[k].to(torch_dtype).contiguous() for k in keys}, str(hf / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))

    store = open_weights(hf)
    assert store.names == frozenset(names)
    for name in names:
        got = store.get(name)
        expected = state[name].to(torch_dtype).float().numpy()
        assert got.dtype == (np.float16 if dtype == "float16" else np.float32)
        np.testing.assert_array_equal(got.astype(np.float32), expected)
    out = tmp_path / "out"
    convert(str(hf), "x", [Target("ct2", "float32"), Target("gguf", "q8_0")], out=out)
    verify(out / "ct2-float32")
    verify(out / "gguf-q8_0")


def test_missing_shard(tiny_codegen_hf: Path, tmp_path: Path) -> None:
    from fastpilot.errors import ConversionError

    hf = shutil.copytree(tiny_codegen_hf, tmp_path / "hf")
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors"):
        open_weights(hf)


def test_pickle_checkpoint_with_torch(tiny_gpt2_hf: Path, tmp_path: Path) -> None:
    import torch

    state = {k: torch.from_numpy(v.copy()) for k, v in _reference_state(tiny_gpt2_hf).items()}
    hf = shutil.copytree(
        tiny_gpt2_hf, tmp_path / "hf", ignore=shutil.ignore_patterns("*.safetensors")
    )
    torch.save(state, hf / "pytorch_model.bin")
    out = tmp_path / "out"
    convert(str(hf), "x", [Target("ct2", "float32")], out=out)
    ref = tmp_path / "ref"
    convert(str(tiny_gpt2_hf), "x", [Target("ct2", "float32")], out=ref)
    assert read_manifest(out).weights == read_manifest(ref).weights


# -- entry points -------------------------------------------------------------------


def test_imports_stay_light() -> None:
    code = (
        "import sys, conversion, conversion.cli, conversion.convert, conversion.manifest, "
        "conversion.convert_all\n"
        "heavy = {'torch', 'transformers', 'ctranslate2', 'llama_cpp', 'gguf'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_cli_format_all(tiny_gpt2_hf: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "conversion",
            str(tiny_gpt2_hf),
            "--name",
            "tiny",
            "--format",
            "all",
            "--models-dir",
            str(models),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (models / "tiny").iterdir()) == [
        "ct2-int8",
        "gguf-q4_k_m",
        "gguf-q8_0",
    ]
    assert proc.stdout.count("wrote") == 3
    assert (models / "tiny" / "gguf-q8_0" / "model.gguf").is_file()


def test_cli_parser_shape() -> None:
    """fastpilot/cli.py forwards `fastpilot convert ...` to main(argv), which parses with this."""
    from conversion.cli import build_parser, main

    args = build_parser().parse_args(
        [
            "gpt2",
            "--name",
            "117M",
            "--format",
            "gguf",
            "--quantization",
            "q8_0",
            "--out",
            "x",
        ]
    )
    assert args.source == "gpt2" and args.name == "117M"
    assert args.format == "gguf" and args.quantization == "q8_0"
    assert args.out == Path("x")
    with pytest.raises(SystemExit):
        main(["--help"])


def test_convert_all(tiny_gpt2_hf: Path, tmp_path: Path) -> None:
    catalog = tmp_path / "models.toml"
    catalog.write_text(
        f'[models.tiny-py]\nsource = "{tiny_gpt2_hf}"\ntargets = ["ct2-int8"]\n'
        '[models.missing]\nsource = "./no/such/checkpoint"\n'
        '[models.hubby]\nsource = "Salesforce/codegen-350M-mono"\n'
        '[models.hubby2]\nsource = "gpt2-medium"\n'
    )
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    cmd = [
        sys.executable,
        "-m",
        "conversion.convert_all",
        "--catalog",
        str(catalog),
        "--models-dir",
        str(tmp_path / "models"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "tiny-py: ct2-int8: wrote" in out
    assert "missing: skipped" in out
    assert "hubby: skipped" in out and "hubby2: skipped" in out
    verify(tmp_path / "models" / "tiny-py" / "ct2-int8")
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert "tiny-py: ct2-int8: up to date" in again.stdout


def test_repo_catalog_parses() -> None:
    from conversion.convert_all import load_catalog

    entries = {e.name: e for e in load_catalog()}
    assert entries["117M"].source == "gpt2"
    assert entries["345M"].source == "gpt2-medium"
    assert entries["codegen"].source == "Salesforce/codegen-350M-mono"
    assert entries["codegen-2B"].source == "Salesforce/codegen-2B-mono"
    assert entries["tiny-py"].source == "conversion/tiny_py/checkpoint"


def test_codegen_whitespace_added_tokens_in_gguf(tiny_codegen_hf: Path, tmp_path: Path) -> None:
    """CodeGen's tokenizer adds whitespace-run tokens (ids above GPT-2's 50257);
    llama.cpp must match them as user-defined tokens exactly as HF does."""
    import llama_cpp
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer

    hf = shutil.copytree(tiny_codegen_hf, tmp_path / "hf")
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    runs = [" " * n for n in range(32, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
    tok.add_tokens([AddedToken(r, normalized=False) for r in runs])
    tok.save(str(hf / "tokenizer.json"))
    (hf / "vocab.json").unlink()  # keep transformers on tokenizer.json
    (hf / "merges.txt").unlink()
    out = tmp_path / "out"
    convert(str(hf), "x", [Target("gguf", "f32")], out=out)
    reference = AutoTokenizer.from_pretrained(hf)
    llm = llama_cpp.Llama(str(out / "model.gguf"), vocab_only=True, verbose=False)
    for text in (*tinymodels.SNIPPETS, *EXTRA_TEXTS, " " * 45 + "x", "\t" * 12 + "y\n  \t  z"):
        expected = reference(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, repr(text)
    assert any(i >= tinymodels.VOCAB_SIZE for i in reference(" " * 45)["input_ids"])
    llm.close()


def test_gpt2_unprefixed_names_and_mask_buffers(tiny_gpt2_hf: Path, tmp_path: Path) -> None:
    """The original `gpt2` hub files name tensors `h.0...`/`wte.weight` and carry
    `attn.bias` mask buffers; both layouts must give the same model."""
    from safetensors.numpy import save_file

    state = _reference_state(tiny_gpt2_hf)
    renamed = {k.removeprefix("transformer."): v for k, v in state.items()}
    for i in range(2):
        renamed[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), dtype=np.float32))
        renamed[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    hf = shutil.copytree(tiny_gpt2_hf, tmp_path / "hf")
    save_file(renamed, str(hf / "model.safetensors"))
    out, ref = tmp_path / "out", tmp_path / "ref"
    convert(str(hf), "x", [Target("gguf", "f32")], out=out)
    convert(str(tiny_gpt2_hf), "x", [Target("gguf", "f32")], out=ref)
    assert read_manifest(out).weights == read_manifest(ref).weights
