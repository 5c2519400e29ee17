"""Loader resolution (which directory, which backend) and the model registry."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fastpilot import loader
from fastpilot.engine.model import Model
from fastpilot.errors import InvalidRequest, ModelLoading, UnknownModel
from fastpilot.models import Registry
from tests.fakes import FakeBackend


def make_output(root: Path, engine: str, dirname: str) -> Path:
    d = root / engine / dirname
    d.mkdir(parents=True)
    (d / ("model.bin" if dirname.startswith("ct2") else "model.gguf")).write_bytes(b"x")
    return d


def test_import_fastpilot_is_light() -> None:
    import subprocess

    code = (
        "import sys, fastpilot; fastpilot.__all__; "
        "heavy = [m for m in ('numpy', 'torch', 'ctranslate2', 'llama_cpp', 'falcon', "
        "'transformers') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import fastpilot

    assert fastpilot.Model is Model and callable(fastpilot.load)
    assert set(fastpilot.__all__) == {"load", "Model", "__version__"}


def test_preference_order_cpu_and_cuda(tmp_path: Path) -> None:
    for name in ("ct2-int8", "ct2-int8_float16", "gguf-q8_0", "gguf-q4_k_m", "ct2-float32"):
        make_output(tmp_path, "codegen", name)
    eng = tmp_path / "codegen"
    assert loader.pick(eng, "cpu").name == "gguf-q4_k_m"
    assert loader.pick(eng, "cuda").name == "ct2-int8_float16"
    assert loader.pick(eng, "cpu", backend="ctranslate2").name == "ct2-int8"
    assert loader.pick(eng, "cuda", backend="llamacpp").name == "gguf-q8_0"


def test_resolve_by_engine_name_and_path(tmp_path: Path) -> None:
    out = make_output(tmp_path, "gpt2", "ct2-int8")
    path, fmt, name = loader.resolve("gpt2", models_dir=tmp_path)
    assert (path, fmt, name) == (out, "ct2", "gpt2")
    assert loader.resolve(out) == (out, "ct2", "gpt2")  # an output dir is served as its engine
    gguf = tmp_path / "solo.gguf"
    gguf.write_bytes(b"x")
    assert loader.resolve(gguf) == (gguf, "gguf", "solo")


def test_unknown_model_lists_what_exists(tmp_path: Path) -> None:
    make_output(tmp_path, "gpt2", "ct2-int8")
    make_output(tmp_path, "codegen", "gguf-q8_0")
    with pytest.raises(UnknownModel) as err:
        loader.load("nope", models_dir=tmp_path)
    assert "codegen" in err.value.message and "gpt2" in err.value.message
    assert err.value.status == 404


def test_forced_backend_must_fit_the_format(tmp_path: Path) -> None:
    out = make_output(tmp_path, "gpt2", "ct2-int8")
    with pytest.raises(InvalidRequest) as err:
        loader.load(out, backend="llamacpp")
    assert err.value.param == "backend"
    with pytest.raises(UnknownModel):
        loader.load("gpt2", backend="llamacpp", models_dir=tmp_path)
    with pytest.raises(InvalidRequest):
        loader.load(out, backend="onnx")


def test_registry_names_aliases_default_and_strict() -> None:
    b1, b2 = FakeBackend(), FakeBackend()
    try:
        reg = Registry()
        reg.loading = True
        with pytest.raises(ModelLoading):
            reg.get("x")
        m1, m2 = Model("codegen", b1), Model("gpt2", b2)
        reg.add("codegen", m1, aliases=("copilot-codex",))
        reg.add("gpt2", m2)
        reg.loading = False
        assert reg.get("copilot-codex") is m1 and reg.get("gpt2") is m2
        assert reg.get(None) is m1 and reg.default is m1
        assert reg.get("gpt-4o-copilot") is m1  # Copilot invents names: the default answers
        with pytest.raises(UnknownModel) as err:
            reg.get("gpt-4o-copilot", strict=True)
        assert "codegen" in err.value.message and "gpt2" in err.value.message
        assert reg.names() == ["codegen", "gpt2"]
        assert reg.names(aliases=True) == ["codegen", "copilot-codex", "gpt2"]
        assert list(reg) == [m1, m2] and len(reg) == 2 and "copilot-codex" in reg
        with pytest.raises(ValueError):
            reg.add("other", m2, aliases=("gpt2",))
        reg.close_all()
        assert len(reg) == 0
    finally:
        b1.close()
        b2.close()
