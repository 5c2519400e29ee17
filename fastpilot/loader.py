"""Open a converted model directory (or an engine name) as a :class:`Model`.

Layout written by ``fastpilot convert``::

    models/<engine>/<format>-<quantization>/   e.g. models/codegen-350M-mono/gguf-q4_k_m/
        fastpilot.json, tokenizer.json, model.bin (CTranslate2) | model.gguf (GGUF)

The format on disk picks the backend: ``model.bin`` -> CTranslate2,
``model.gguf`` (or a bare ``.gguf`` file) -> llama.cpp.

Discovery (:func:`discover_models`; ``fastpilot serve`` without ``--model``,
``fastpilot models``, ``fastpilot complete`` and the "available engines" of an
UnknownModel error all use it): an engine is a directory directly under the
models directory that is a converted output itself or holds at least one
directly inside; a converted output is a directory with ``model.bin`` or
``model.gguf``. Names starting with ``.`` are skipped at both levels (the
converter writes into hidden temporary directories and renames them into
place). A manifest is not needed to be *found*: :func:`load` refuses a model
without one, with a message saying how to trust it, instead of the server
skipping it silently.

Given an engine
directory that holds several outputs, the first present in the preference
order for the device is served:

- CPU:  gguf-q4_k_m, gguf-q8_0, ct2-int8, ct2-int8_float32, gguf-f16,
  ct2-float32, gguf-f32, ct2-int8_float16, ct2-float16 -- smallest memory
  traffic first (decoding on CPU is bandwidth bound), float16 last because
  CPUs emulate it.
- CUDA: ct2-int8_float16, ct2-float16, ct2-int8, ct2-float32, gguf-q8_0,
  gguf-q4_k_m, gguf-f16, gguf-f32 -- CTranslate2's fused CUDA kernels first.

The manifest is read once, by :func:`fastpilot.validate.check_model` while
it checks the files, and handed to the backend with the path. Backend modules
are imported only here, when a model is actually loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastpilot.backends.base import Backend
from fastpilot.engine.model import Model
from fastpilot.engine.params import Limits
from fastpilot.errors import InvalidRequest, UnknownModel
from fastpilot.manifest import GGUF_NAME

BACKENDS = {"ctranslate2": "ct2", "llamacpp": "gguf"}
_ALIASES = {
    "ct2": "ctranslate2",
    "llama.cpp": "llamacpp",
    "llama_cpp": "llamacpp",
    "gguf": "llamacpp",
}

PREFERENCE = {
    "cpu": (
        "gguf-q4_k_m",
        "gguf-q8_0",
        "ct2-int8",
        "ct2-int8_float32",
        "gguf-f16",
        "ct2-float32",
        "gguf-f32",
        "ct2-int8_float16",
        "ct2-float16",
    ),
    "cuda": (
        "ct2-int8_float16",
        "ct2-float16",
        "ct2-int8",
        "ct2-float32",
        "gguf-q8_0",
        "gguf-q4_k_m",
        "gguf-f16",
        "gguf-f32",
    ),
}


def detect_format(path: Path) -> str | None:
    """``"ct2"``, ``"gguf"`` or None for a model directory or file."""
    if path.is_file():
        return "gguf" if path.suffix.lower() == ".gguf" else None
    if (path / "model.bin").is_file():
        return "ct2"
    if (path / GGUF_NAME).is_file():
        return "gguf"
    return None


def candidates(engine_dir: Path) -> list[Path]:
    """Converted outputs directly inside an engine directory, sorted by name."""
    if not engine_dir.is_dir():
        return []
    return sorted(
        p
        for p in engine_dir.iterdir()
        # Hidden: the converter's temporary and scratch directories, never served.
        if p.is_dir() and not p.name.startswith(".") and detect_format(p) is not None
    )


def outputs(engine_dir: Path) -> list[Path]:
    """What an engine directory serves from: itself when it is an output, else its outputs."""
    if engine_dir.is_dir() and detect_format(engine_dir) is not None:
        return [engine_dir]
    return candidates(engine_dir)


def pick(engine_dir: Path, device: str = "cpu", backend: str | None = None) -> Path | None:
    """The output of ``engine_dir`` to serve on ``device`` (see the module docstring)."""
    found = {p.name: p for p in candidates(engine_dir)}
    want = BACKENDS.get(backend) if backend else None
    order = PREFERENCE["cuda" if device.startswith("cuda") else "cpu"]
    ranked = [found[n] for n in order if n in found]
    ranked += [p for n, p in sorted(found.items()) if n not in order]
    if want:
        ranked = [p for p in ranked if detect_format(p) == want]
    return ranked[0] if ranked else None


def discover_models(models_dir: str | os.PathLike[str]) -> list[str]:
    """Engine names under ``models_dir``, sorted; the one discovery rule (module docstring)."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and outputs(p)
    )


def resolve(
    path_or_engine: str | os.PathLike[str],
    *,
    device: str = "cpu",
    backend: str | None = None,
    models_dir: str | os.PathLike[str] = "models",
) -> tuple[Path, str, str]:
    """Find what to load: ``(path, format, engine name)``; UnknownModel lists what exists."""
    given = Path(path_or_engine)
    roots = [given]
    if not given.is_absolute() and len(given.parts) == 1:
        roots.append(Path(models_dir) / given)
    for root in roots:
        if not root.exists():
            continue
        fmt = detect_format(root)
        if fmt is not None:
            # models/<engine>/<format>-<quant>/ is served as <engine>.
            if root.is_dir() and root.name.split("-", 1)[0] in ("ct2", "gguf") and root.parent.name:
                name = root.parent.name
            else:
                name = root.stem if root.is_file() else root.name
            return root, fmt, name
        chosen = pick(root, device, backend)
        if chosen is not None:
            return chosen, detect_format(chosen) or "", root.name
        if backend and candidates(root):
            have = ", ".join(p.name for p in candidates(root))
            raise UnknownModel(
                f"{root} has no output for the {backend} backend (it has: {have})", param="model"
            )
    names = discover_models(models_dir)
    listing = ", ".join(names) if names else f"none under {Path(models_dir).resolve()}"
    raise UnknownModel(
        f"no converted model at {str(path_or_engine)!r}; available engines: {listing}. "
        "Convert one with `fastpilot convert`.",
        param="model",
    )


def load(
    path_or_engine: str | os.PathLike[str],
    *,
    name: str | None = None,
    backend: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    models_dir: str | os.PathLike[str] = "models",
    default_timeout: float | None = None,
    limits: Limits | None = None,
    trust_unverified: bool | None = None,
    **backend_options: Any,
) -> Model:
    """Load a converted model and return it ready to serve.

    Args:
        path_or_engine: a converted output directory (``model.bin`` or
            ``model.gguf`` inside), a ``.gguf`` file, an engine directory, or an
            engine name looked up under ``models_dir``.
        name: the served name; defaults to the engine name.
        backend: ``"ctranslate2"`` or ``"llamacpp"`` to force one; the format
            on disk must fit it.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"``); also steers the choice
            among several outputs.
        threads: CPU threads for the backend's compute (None: the backend's default).
        trust_unverified: load a model without a ``fastpilot.json`` manifest and
            skip its sha256 checks (None: ``FASTPILOT_TRUST_UNVERIFIED_MODELS``).
            The structural checks of :mod:`fastpilot.validate` always run.
        backend_options: passed to the backend class unchanged.

    Blocks while the weights are read and hashed (seconds for large models)
    and starts the backend's worker thread. Raises UnknownModel (listing what
    exists), InvalidRequest for a backend that does not fit the format, or
    ModelFileError for a file that fails validation.
    """
    if backend is not None:
        backend = _ALIASES.get(backend, backend)
        if backend not in BACKENDS:
            raise InvalidRequest(
                f"unknown backend {backend!r}; choose one of {', '.join(sorted(BACKENDS))}",
                param="backend",
            )
    path, fmt, engine = resolve(
        path_or_engine, device=device, backend=backend, models_dir=models_dir
    )
    if backend is not None and BACKENDS[backend] != fmt:
        raise InvalidRequest(
            f"{path} is a {fmt} model; the {backend} backend cannot load it", param="backend"
        )
    # Model files are untrusted: check them before native code parses them.
    from fastpilot.validate import check_model, trust_from_env

    if trust_unverified is None:
        trust_unverified = trust_from_env()
    manifest = check_model(path, fmt, trust_unverified=trust_unverified).manifest
    impl: Backend
    if fmt == "ct2":
        from fastpilot.backends.ct2_seq2seq import CTranslate2Seq2SeqBackend, is_seq2seq
        from fastpilot.backends.ctranslate2 import CTranslate2Backend

        if is_seq2seq(path):  # an encoder-decoder (T5) directory: CTranslate2's Translator
            impl = CTranslate2Seq2SeqBackend(
                str(path), manifest, threads=threads, device=device, **backend_options
            )
        else:
            impl = CTranslate2Backend(
                str(path), manifest, threads=threads, device=device, **backend_options
            )
    else:
        from fastpilot.backends.llamacpp import LlamaCppBackend

        impl = LlamaCppBackend(
            str(path), manifest, threads=threads, device=device, **backend_options
        )
    return Model(name or engine, impl, default_timeout=default_timeout, limits=limits)
