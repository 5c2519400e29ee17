"""Session fixtures for the CodeGen2 and T5 models (import them into a test module).

Each family is built once and cached in ``~/.cache/fastpilot/test-models/<kind>-<hash>``
(the hash covers the builders, ``conversion/`` and the library versions;
``FASTPILOT_TEST_CACHE`` works as for the shared fixtures), so a CodeGen2-only run
does not build the T5s and the other way round.

``codegen2_models`` -> dict[str, Path]
    ``"hf"`` (CodeGen2-layout checkpoint), ``"ref"`` (its transformers twin, the
    logit reference), ``"tokenizer"`` and the converted outputs ``"ct2-float32"``,
    ``"ct2-int8"``, ``"gguf-f32"``, ``"gguf-f16"``, ``"gguf-q8_0"``, ``"gguf-q4_k_m"``.
``t5_models`` -> dict[str, dict[str, Path]]
    ``t5_models[shape]`` for each of ``tinymodels_infill.T5_SHAPES``: ``"hf"``,
    ``"ct2-float32"``, ``"ct2-int8"``.

Paths are read-only (a cache shared by test runs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import tinymodels, tinymodels_infill
from tests.fingerprint import fingerprint

CODEGEN2_KEYS = ("ct2-float32", "ct2-int8", "gguf-f32", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m")
T5_KEYS = ("ct2-float32", "ct2-int8")


def _fingerprint(kind: str) -> str:
    return f"{kind}-{fingerprint('tinymodels.py', 'tinymodels_infill.py')}"


def _build_codegen2(root: Path) -> None:
    from conversion.convert import Target, convert

    base = tinymodels.build_tokenizer(root / "base-tokenizer")
    tok = tinymodels_infill.build_codegen2_tokenizer(base, root / "codegen2-tokenizer")
    hf, _ = tinymodels_infill.build_codegen2(tok, root / "codegen2-hf", root / "codegen2-ref")
    targets = [Target(*k.split("-", 1)) for k in CODEGEN2_KEYS]
    convert(str(hf), "tiny-codegen2", targets, out=root / "codegen2")


def _build_t5(root: Path) -> None:
    from conversion.convert import Target, convert

    t5_tok = tinymodels_infill.build_t5_tokenizer(root / "t5-tokenizer")
    for shape in tinymodels_infill.T5_SHAPES:
        t5_hf = tinymodels_infill.build_t5(t5_tok, root / f"{shape}-hf", shape)
        targets = [Target(*k.split("-", 1)) for k in T5_KEYS]
        convert(str(t5_hf), f"tiny-{shape}", targets, out=root / shape)


def _cached(kind: str, build: Callable[[Path], None], tmp: pytest.TempPathFactory) -> Path:
    """Build once into the cache (privately, then renamed), or reuse a finished build."""
    setting = os.environ.get("FASTPILOT_TEST_CACHE", "")
    if setting.lower() in ("off", "0", "no", "false"):
        root = tmp.mktemp(kind)
        build(root)
        return root
    cache = Path(setting) if setting else Path.home() / ".cache" / "fastpilot" / "test-models"
    final = cache / _fingerprint(kind)
    if (final / "DONE").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{kind}-", dir=cache))
    try:
        build(work)
        (work / "DONE").write_text("ok\n")
        try:
            work.rename(final)
        except OSError:  # another run finished first; use its copy
            if not (final / "DONE").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def codegen2_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = _cached("codegen2", _build_codegen2, tmp_path_factory)
    return {
        "hf": root / "codegen2-hf",
        "ref": root / "codegen2-ref",
        "tokenizer": root / "codegen2-tokenizer",
        **{k: root / "codegen2" / k for k in CODEGEN2_KEYS},
    }


@pytest.fixture(scope="session")
def t5_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = _cached("t5", _build_t5, tmp_path_factory)
    return {
        shape: {"hf": root / f"{shape}-hf", **{k: root / shape / k for k in T5_KEYS}}
        for shape in tinymodels_infill.T5_SHAPES
    }
