"""The ``fastpilot.json`` manifest of a converted model, and where a model's files are.

The converter writes the manifest as the last file of an output directory
(:mod:`conversion.manifest`); the serving side reads it once, in the loader
(through :func:`fastpilot.validate.check_model`), and hands the parsed
:class:`Manifest` to the backend. Both sides use this one type, so its fields
are defined once. Fields of the JSON object::

    arch            source architecture ("gpt2", "codegen", ... as the converter names it)
    format          "ct2" | "gguf"
    quantization    float32 | float16 | int8 | int8_float16 | f32 | f16 | q8_0 | q4_k_m
    context_length  trained context window in tokens
    vocab_size      rows of the output layer (may exceed the tokenizer's size)
    tokenizer       file name of the tokenizers-library tokenizer.json in the directory
    eos_token_ids   ids that end a completion
    weights         {file name: sha256} of the weight files
    -- optional --
    files           {file name: sha256} of the other files (tokenizer, configs)
    bos_token_id    id of the begin-of-text token
    fim             fill-in-the-middle description (an object, carried unchanged), or null
    name, source, source_revision, created, fastpilot_version   provenance

Keys this module does not know (``gguf_arch``, whatever a newer converter adds)
are kept in :attr:`Manifest.raw` and read with :meth:`Manifest.get`, so an
older server still loads a newer model's manifest.

This module imports nothing heavy (no numpy, no native library) and nothing from
``conversion/``: serving never imports the converter.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fastpilot.errors import ModelFileError

__all__ = ["MANIFEST", "Manifest", "find_gguf", "manifest_dir", "sha256_file"]

MANIFEST = "fastpilot.json"
GGUF_NAME = "model.gguf"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (a 4 GB model takes ~10 s)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_dir(path: str | os.PathLike[str]) -> Path:
    """The directory whose ``fastpilot.json`` describes ``path`` (a model directory or a file)."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def find_gguf(path: str | os.PathLike[str]) -> Path:
    """The GGUF file to load for ``path``: the file itself, or a directory's weights.

    A directory must hold ``model.gguf`` or exactly one ``*.gguf`` file (what
    ``fastpilot convert`` writes, or a single downloaded file).

    Raises:
        ModelFileError: nothing to load, or several ``.gguf`` files and no ``model.gguf``.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ModelFileError(f"no such model file or directory: {p}")
    gguf = p / GGUF_NAME
    if gguf.is_file():
        return gguf
    found = sorted(f for f in p.glob("*.gguf") if f.is_file())
    if len(found) != 1:
        raise ModelFileError(f"{p}: no {GGUF_NAME} ({len(found)} other .gguf files)")
    return found[0]


def _digests(where: Path, key: str, value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ModelFileError(f"{where}: {key} must be an object of file name -> sha256")
    return MappingProxyType(dict(value))


def _int(where: Path, key: str, value: Any, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelFileError(f"{where}: {key} must be an integer, not {value!r}")
    return value


def _str(where: Path, key: str, value: Any, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ModelFileError(f"{where}: {key} must be a string, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed, type-checked ``fastpilot.json`` (see the module docstring for the fields).

    Build one with :meth:`read` / :meth:`find` (from a directory) or
    :meth:`from_json` (from the decoded object). :attr:`raw` is the whole JSON
    object, unknown keys included; :meth:`to_json` gives it back for writing.
    """

    arch: str
    format: str
    quantization: str
    context_length: int
    vocab_size: int
    tokenizer: str
    eos_token_ids: tuple[int, ...]
    weights: Mapping[str, str]
    files: Mapping[str, str]
    bos_token_id: int | None
    fim: Mapping[str, Any] | None
    raw: Mapping[str, Any]

    REQUIRED = (
        "arch",
        "format",
        "quantization",
        "context_length",
        "vocab_size",
        "tokenizer",
        "eos_token_ids",
        "weights",
    )

    @classmethod
    def from_json(cls, data: Any, where: str | os.PathLike[str] = MANIFEST) -> Manifest:
        """Check the decoded JSON object and build the manifest.

        ``where`` names the file in error messages.

        Raises:
            ModelFileError: not an object, a required field missing, or a field of
                the wrong type (the message names the file and the field).
        """
        at = Path(where)
        if not isinstance(data, dict):
            raise ModelFileError(f"{at}: manifest is not a JSON object")
        missing = [k for k in cls.REQUIRED if k not in data]
        if missing:
            raise ModelFileError(f"{at}: manifest lacks {', '.join(missing)}")
        eos = data["eos_token_ids"]
        if not isinstance(eos, list):
            raise ModelFileError(f"{at}: eos_token_ids must be a list of integers")
        fim = data.get("fim")
        if fim is not None and not isinstance(fim, dict):
            raise ModelFileError(f"{at}: fim must be an object or null, not {fim!r}")
        return cls(
            arch=_str(at, "arch", data["arch"]),
            format=_str(at, "format", data["format"]),
            quantization=_str(at, "quantization", data["quantization"]),
            context_length=_int(at, "context_length", data["context_length"]),
            vocab_size=_int(at, "vocab_size", data["vocab_size"]),
            tokenizer=_str(at, "tokenizer", data["tokenizer"]),
            eos_token_ids=tuple(_int(at, "eos_token_ids", i) for i in eos),
            weights=_digests(at, "weights", data["weights"]),
            files=_digests(at, "files", data.get("files") or {}),
            bos_token_id=_int(at, "bos_token_id", data.get("bos_token_id"), optional=True),
            fim=MappingProxyType(dict(fim)) if fim is not None else None,
            raw=MappingProxyType(dict(data)),
        )

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> Manifest:
        """Read and check ``directory/fastpilot.json`` (no hashing; cheap).

        Raises:
            ModelFileError: the manifest is missing, unreadable, or malformed.
        """
        path = Path(directory) / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as ex:
            raise ModelFileError(
                f"{directory}: no {MANIFEST}; convert the model with `fastpilot convert`"
            ) from ex
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as ex:
            raise ModelFileError(f"{path}: unreadable manifest ({ex})") from ex
        return cls.from_json(data, path)

    @classmethod
    def find(cls, path: str | os.PathLike[str]) -> Manifest | None:
        """The manifest describing ``path`` (a model directory or a file in one), or None.

        None only when there is no ``fastpilot.json``; a malformed one raises
        :class:`ModelFileError` as :meth:`read` does.
        """
        directory = manifest_dir(path)
        if not (directory / MANIFEST).is_file():
            return None
        return cls.read(directory)

    @property
    def listed(self) -> dict[str, str]:
        """Every file the manifest vouches for, ``{name: sha256}`` (other files, then weights)."""
        return {**self.files, **self.weights}

    def get(self, key: str, default: Any = None) -> Any:
        """Any field of the JSON object by name, including ones this class does not model."""
        return self.raw.get(key, default)

    def to_json(self) -> dict[str, Any]:
        """The JSON object, as read or as it will be written (a fresh, mutable copy)."""
        return dict(self.raw)
