"""Conversion failures: one clear line, exit status 1, no traceback, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conversion.convert import Target, convert
from fastpilot.errors import ConversionError

ROOT = Path(__file__).resolve().parent.parent


def _copy_hf(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "conversion", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _edit_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unknown_architecture_lists_supported(tiny_gpt2_hf: Path, tmp_path: Path) -> None:
    hf = _copy_hf(tiny_gpt2_hf, tmp_path / "llama")
    _edit_config(hf, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConversionError) as info:
        convert(str(hf), "x", [Target("ct2", "int8")], models_dir=tmp_path / "models")
    message = info.value.message
    assert "LlamaForCausalLM" in message
    assert "GPT2LMHeadModel" in message and "CodeGenForCausalLM" in message
    assert not (tmp_path / "models").exists()


def test_missing_directory_cli(tmp_path: Path) -> None:
    proc = _cli(
        str(tmp_path / "nope" / "model"), "--name", "x", "--models-dir", str(tmp_path / "m")
    )
    _assert_clean_failure(proc, "no such directory")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file(tiny_gpt2_hf: Path, tmp_path: Path, missing: str) -> None:
    hf = _copy_hf(tiny_gpt2_hf, tmp_path / "hf")
    (hf / missing).unlink()
    if missing == "tokenizer.json":  # the slow-tokenizer files would stand in for it
        (hf / "vocab.json").unlink()
    models = tmp_path / "models"
    proc = _cli(str(hf), "--name", "x", "--format", "ct2", "--models-dir", str(models))
    _assert_clean_failure(proc)
    assert not models.exists()


def test_config_shape_mismatch(tiny_gpt2_hf: Path, tmp_path: Path) -> None:
    hf = _copy_hf(tiny_gpt2_hf, tmp_path / "hf")
    _edit_config(hf, n_embd=128)
    models = tmp_path / "models"
    proc = _cli(
        str(hf),
        "--name",
        "x",
        "--format",
        "gguf",
        "--quantization",
        "f32",
        "--models-dir",
        str(models),
    )
    _assert_clean_failure(proc, "shape", "config.json")
    assert not models.exists()


def test_vocab_larger_than_embedding(tiny_codegen_hf: Path, tmp_path: Path) -> None:
    hf = _copy_hf(tiny_codegen_hf, tmp_path / "hf")
    _edit_config(hf, vocab_size=512)  # tokenizer has 800 tokens
    with pytest.raises(ConversionError, match="shape|tokenizer"):
        convert(str(hf), "x", [Target("ct2", "float32")], models_dir=tmp_path / "models")


def test_truncated_safetensors(tiny_codegen_hf: Path, tmp_path: Path) -> None:
    hf = _copy_hf(tiny_codegen_hf, tmp_path / "hf")
    weights = hf / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    models = tmp_path / "models"
    proc = _cli(str(hf), "--name", "x", "--models-dir", str(models))
    _assert_clean_failure(proc, "truncated", "model.safetensors")
    assert not models.exists()


def test_bad_quantization_for_format(tiny_gpt2_hf: Path, tmp_path: Path) -> None:
    proc = _cli(
        str(tiny_gpt2_hf),
        "--name",
        "x",
        "--format",
        "ct2",
        "--quantization",
        "q4_k_m",
        "--models-dir",
        str(tmp_path / "m"),
    )
    _assert_clean_failure(proc, "float32", "int8")


def test_failure_mid_write_leaves_nothing(
    tiny_gpt2_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that dies half way removes its temp dir and the dirs it created."""
    from conversion import convert as convert_module

    def boom(self, job, out_dir: Path, quantization: str) -> list[str]:
        (out_dir / "model.bin").write_bytes(b"partial")
        raise ConversionError("disk on fire")

    monkeypatch.setattr(convert_module.Ct2Format, "write", boom)
    models = tmp_path / "models"
    with pytest.raises(ConversionError, match="disk on fire"):
        convert(str(tiny_gpt2_hf), "x", [Target("ct2", "int8")], models_dir=models)
    assert not models.exists()


def test_failure_keeps_previous_output(
    tiny_gpt2_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conversion import convert as convert_module
    from conversion.manifest import verify

    out = tmp_path / "out"
    convert(str(tiny_gpt2_hf), "x", [Target("ct2", "int8")], out=out)

    def boom(self, job, out_dir: Path, quantization: str) -> list[str]:
        raise ConversionError("nope")

    monkeypatch.setattr(convert_module.Ct2Format, "write", boom)
    with pytest.raises(ConversionError):
        convert(str(tiny_gpt2_hf), "x", [Target("ct2", "int8")], out=out, force=True)
    verify(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_hub_unreachable_fails_fast(tmp_path: Path) -> None:
    env = {
        "HF_ENDPOINT": "http://127.0.0.1:9",  # discard port: connection refused at once
        "HF_HOME": str(tmp_path / "hf-home"),  # an empty cache
        "HF_HUB_OFFLINE": "0",
    }
    start = time.monotonic()
    proc = _cli(
        "Salesforce/codegen-350M-mono",
        "--name",
        "codegen",
        "--models-dir",
        str(tmp_path / "m"),
        env=env,
        timeout=30,
    )
    elapsed = time.monotonic() - start
    _assert_clean_failure(proc, "Salesforce/codegen-350M-mono", "unreachable")
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not (tmp_path / "m").exists()


def test_hub_offline_fails_fast(tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    start = time.monotonic()
    proc = _cli("gpt2", "--name", "117M", "--models-dir", str(tmp_path / "m"), env=env, timeout=30)
    assert time.monotonic() - start < 10
    _assert_clean_failure(proc, "gpt2", "HF_HUB_OFFLINE")


def test_hub_cache_is_used_offline(tiny_gpt2_hf: Path, tmp_path: Path) -> None:
    """A model already in the HF cache converts with the hub unreachable."""
    cache = tmp_path / "hf-home" / "hub" / "models--someone--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "snapshots" / commit
    shutil.copytree(tiny_gpt2_hf, snapshot)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(commit)
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home")}
    proc = _cli(
        "someone/tiny",
        "--name",
        "t",
        "--format",
        "ct2",
        "--quantization",
        "float32",
        "--models-dir",
        str(tmp_path / "m"),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "m" / "t" / "ct2-float32" / "fastpilot.json").read_text())
    assert manifest["source"] == "someone/tiny"
    assert manifest["source_revision"] == commit


def test_pickle_without_torch_says_install_extra(
    tiny_gpt2_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf = _copy_hf(tiny_gpt2_hf, tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(b"not really a pickle")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ConversionError, match=r"torch"):
        convert(str(hf), "x", [Target("ct2", "int8")], models_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_corrupt_pickle_is_one_line(tiny_gpt2_hf: Path, tmp_path: Path) -> None:
    hf = _copy_hf(tiny_gpt2_hf, tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(b"garbage, not a pickle")
    proc = _cli(str(hf), "--name", "x", "--models-dir", str(tmp_path / "m"))
    _assert_clean_failure(proc, "pytorch_model.bin", "weights-only")
