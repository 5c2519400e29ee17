"""The ``fastpilot.json`` manifest of a converted model directory.

Written by the converter as the last file of an output, read by the serving side to
learn what a directory holds without loading it. Fields::

    arch            "gpt2" | "codegen"           (the source architecture)
    source          hub id or absolute checkpoint path it was converted from
    source_revision hub commit, or null
    format          "ct2" | "gguf"
    quantization    float32 | float16 | int8 | int8_float16 | f32 | f16 | q8_0 | q4_k_m
    context_length  trained context window in tokens
    vocab_size      rows of the output layer (may exceed the tokenizer's size)
    tokenizer       file name of the tokenizers-library tokenizer.json in the directory
    eos_token_ids   ids that end a completion
    bos_token_id    id of the begin-of-text token
    fim             fill-in-the-middle template, or null (GPT-2 / CodeGen-1 have none)
    weights         {file name: sha256} of the weight files
    files           {file name: sha256} of the other files (tokenizer, configs)
    created         ISO-8601 UTC time
    fastpilot_version

This module is importable without numpy, torch or the native libraries.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastpilot.errors import ModelFileError

__all__ = [
    "MANIFEST",
    "fastpilot_version",
    "read_manifest",
    "sha256_file",
    "verify",
    "write_manifest",
]

MANIFEST = "fastpilot.json"
_REQUIRED = (
    "arch",
    "format",
    "quantization",
    "context_length",
    "vocab_size",
    "tokenizer",
    "eos_token_ids",
    "weights",
)


def fastpilot_version() -> str:
    """The installed fastpilot version, or ``0+unknown`` when running from a bare tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastpilot")
    except PackageNotFoundError:
        return "0+unknown"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (a 4 GB model takes ~10 s)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, fields: dict[str, Any], weights: list[str]) -> dict[str, Any]:
    """Hash every file in ``directory`` and write ``fastpilot.json``; return the manifest.

    ``weights`` names the weight files; every other file lands under ``files``.
    """
    hashes = {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        **fields,
        "weights": {name: hashes.pop(name) for name in weights},
        "files": hashes,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fastpilot_version": fastpilot_version(),
    }
    (directory / MANIFEST).write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``directory/fastpilot.json`` (no hashing; cheap).

    Raises:
        ModelFileError: the manifest is missing, unreadable, or lacks required fields.
    """
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as ex:
        raise ModelFileError(
            f"{directory}: no {MANIFEST}; convert the model with `fastpilot convert`"
        ) from ex
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as ex:
        raise ModelFileError(f"{path}: unreadable manifest ({ex})") from ex
    if not isinstance(manifest, dict):
        raise ModelFileError(f"{path}: manifest is not a JSON object")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ModelFileError(f"{path}: manifest lacks {', '.join(missing)}")
    return manifest


def verify(directory: str | Path) -> dict[str, Any]:
    """Check every file listed in the manifest against its sha256; return the manifest.

    Reads every byte of the model (seconds per GB); call it once at load time or in
    ``fastpilot models --verify``, not per request.

    Raises:
        ModelFileError: manifest problems, a listed file missing, or a hash mismatch.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    listed = {**manifest.get("files", {}), **manifest["weights"]}
    for name, expected in listed.items():
        if not isinstance(name, str) or Path(name).name != name:
            raise ModelFileError(f"{directory / MANIFEST}: {name!r} is not a plain file name")
        path = directory / name
        if not path.is_file():
            raise ModelFileError(f"{path}: listed in {MANIFEST} but missing")
        if sha256_file(path) != expected:
            raise ModelFileError(f"{path}: sha256 mismatch; the file is corrupted or was changed")
    return manifest
