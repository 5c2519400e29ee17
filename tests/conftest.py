"""Shared pytest fixtures: tiny models built offline and converted by the real converters.

Fixtures (all session-scoped; nothing is downloaded):

``tiny_tokenizer_dir`` -> Path
    HF tokenizer dir (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json): byte-level BPE, 800 tokens, ``<|endoftext|>`` = id 799
    is bos/eos/unk (see ``tests/tinymodels.py``).
``tiny_gpt2_hf`` / ``tiny_codegen_hf`` -> Path
    HF checkpoint dirs (config.json, model.safetensors, the tokenizer files) of a
    random 2-layer GPT-2 (n_embd 256, 4 heads, n_ctx 128, vocab 800) and CodeGen
    (n_embd 256, 8 heads, rotary_dim 16, n_ctx 128, vocab padded to 896).
``tiny_models`` -> dict[str, dict[str, Path]]
    ``tiny_models[arch][key]`` for arch in ``"gpt2"``, ``"codegen"`` and key in
    ``"ct2-float32"``, ``"ct2-int8"``, ``"gguf-f32"``, ``"gguf-f16"``, ``"gguf-q8_0"``,
    ``"gguf-q4_k_m"``: converted output directories, each with ``fastpilot.json`` and
    ``tokenizer.json``; GGUF dirs hold ``model.gguf``. Also ``tiny_models[arch]["hf"]``.
``tiny_gpt2_models`` / ``tiny_codegen_models`` -> dict[str, Path]
    Shortcuts for ``tiny_models["gpt2"]`` / ``tiny_models["codegen"]``.

``llamacpp_device`` -> str
    ``--device cpu|cuda`` (default: ``$FASTPILOT_TEST_DEVICE`` or ``cpu``): the device
    every ``LlamaCppBackend`` built in the session gets unless the test names one;
    ``cuda`` offloads every layer (the GPU run of ``benchmarks/gpu_cuda.sh``). Servers
    started as subprocesses are not affected.

And ``browser`` (module-scoped): a headless chromium for the playground page
tests, skipped where chromium or playwright is missing (``tests/playground.py``).

Treat every path as read-only: they may live in a persistent cache shared by test
runs, ``~/.cache/fastpilot/test-models/<hash>`` where the hash covers
``tests/tinymodels.py``, the ``conversion/`` sources and the library versions, so any
change to the builders or the converters rebuilds them. Set
``FASTPILOT_TEST_CACHE=off`` to build into the session's tmp dir instead, or to a
directory to cache there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import tinymodels
from tests.fingerprint import fingerprint
from tests.playground import launch_browser

TINY_KEYS = ("ct2-float32", "ct2-int8", "gguf-f32", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m")
ARCHS = ("gpt2", "codegen")


DEVICES = ("cpu", "cuda")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        choices=DEVICES,
        default=os.environ.get("FASTPILOT_TEST_DEVICE", "cpu"),
        help="device of the in-process llama.cpp backends (cuda: full offload)",
    )


@pytest.fixture(scope="session", autouse=True)
def llamacpp_device(request: pytest.FixtureRequest) -> Iterator[str]:
    """The ``--device`` every in-process ``LlamaCppBackend`` defaults to in this session."""
    device = str(request.config.getoption("--device"))
    if device == "cpu":  # the backend's own default: nothing to change (nor to import)
        yield device
        return
    from fastpilot.backends.llamacpp import LlamaCppBackend

    init = LlamaCppBackend.__init__

    def on_device(self: Any, *args: Any, **kw: Any) -> None:
        kw.setdefault("device", device)
        init(self, *args, **kw)

    patch = pytest.MonkeyPatch()
    patch.setattr(LlamaCppBackend, "__init__", on_device)
    yield device
    patch.undo()


@pytest.fixture
def logprob_atol(llamacpp_device: str) -> float:
    """How far a logprob may move when only the batch around its row changes (one row vs
    several, drafts verified alongside): llama.cpp's CPU kernels keep it under 1e-3; on
    CUDA the matmul kernels are picked by batch shape, and the H200 run measured up to
    3.0e-3 on the tiny models (greedy tokens still equal)."""
    return 1e-3 if llamacpp_device == "cpu" else 5e-3


def _fingerprint() -> str:
    """Cache key of the shared tiny models (:func:`tests.fingerprint.fingerprint`)."""
    return fingerprint("tinymodels.py")


def build_tiny_models(root: Path) -> dict[str, dict[str, Path]]:
    """Build the tokenizer, both HF checkpoints and every converted output under ``root``."""
    from conversion.convert import Target, convert

    tok = tinymodels.build_tokenizer(root / "tokenizer")
    out: dict[str, dict[str, Path]] = {}
    for arch, build in (("gpt2", tinymodels.build_gpt2), ("codegen", tinymodels.build_codegen)):
        hf = build(tok, root / f"{arch}-hf")
        targets = [Target(*key.split("-", 1)) for key in TINY_KEYS]
        convert(str(hf), f"tiny-{arch}", targets, out=root / arch)
        out[arch] = {"hf": hf, **{key: root / arch / key for key in TINY_KEYS}}
    return out


def _layout(root: Path) -> dict[str, dict[str, Path]]:
    return {a: {"hf": root / f"{a}-hf", **{k: root / a / k for k in TINY_KEYS}} for a in ARCHS}


def _complete(root: Path) -> bool:
    return (root / "DONE").is_file()


KEEP_CACHED = 3  # fingerprints always kept; each is ~60 MB
KEEP_RECENT_S = 24 * 3600  # and any build used this recently (another run may hold it)


def _prune(cache: Path, keep: Path) -> None:
    """Drop builds beyond the 3 most recently used that no run touched in a day."""
    import time

    builds = sorted(
        (d for d in cache.iterdir() if _complete(d) and d != keep),
        key=lambda d: (d / "DONE").stat().st_mtime,
        reverse=True,
    )
    for stale in builds[KEEP_CACHED - 1 :]:
        if time.time() - (stale / "DONE").stat().st_mtime > KEEP_RECENT_S:
            shutil.rmtree(stale, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding every tiny model (cached across runs unless disabled)."""
    setting = os.environ.get("FASTPILOT_TEST_CACHE", "")
    if setting.lower() in ("off", "0", "no", "false"):
        root = tmp_path_factory.mktemp("tiny-models")
        build_tiny_models(root)
        return root
    cache = Path(setting) if setting else Path.home() / ".cache" / "fastpilot" / "test-models"
    final = cache / _fingerprint()
    if _complete(final):
        (final / "DONE").touch()  # most recently used: survives pruning
        return final
    cache.mkdir(parents=True, exist_ok=True)
    # Build privately, then rename: concurrent test runs never see a half-built cache.
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        build_tiny_models(tmp)
        (tmp / "DONE").write_text("ok\n")
        try:
            tmp.rename(final)
        except OSError:  # another run finished first; use its copy
            if not _complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(cache, final)
    return final


@pytest.fixture(scope="session")
def tiny_models(tiny_models_root: Path) -> dict[str, dict[str, Path]]:
    """``{arch: {"hf" | "ct2-float32" | ... | "gguf-q4_k_m": Path}}``; see the module docstring."""
    return _layout(tiny_models_root)


@pytest.fixture(scope="session")
def tiny_gpt2_models(tiny_models: dict[str, dict[str, Path]]) -> dict[str, Path]:
    return tiny_models["gpt2"]


@pytest.fixture(scope="session")
def tiny_codegen_models(tiny_models: dict[str, dict[str, Path]]) -> dict[str, Path]:
    return tiny_models["codegen"]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_models_root: Path) -> Path:
    return tiny_models_root / "tokenizer"


@pytest.fixture(scope="session")
def tiny_gpt2_hf(tiny_models: dict[str, dict[str, Path]]) -> Path:
    return tiny_models["gpt2"]["hf"]


@pytest.fixture(scope="session")
def tiny_codegen_hf(tiny_models: dict[str, dict[str, Path]]) -> Path:
    return tiny_models["codegen"]["hf"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless chromium for the playground tests (skipped without it; tests/playground.py)."""
    with launch_browser() as b:
        yield b
