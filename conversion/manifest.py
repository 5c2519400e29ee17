"""Writing the ``fastpilot.json`` manifest of a converted model, and verifying one.

The converter writes the manifest as the last file of an output; the serving side
reads it to learn what a directory holds without loading it. The manifest's type,
its fields and its file name are defined once, in :mod:`fastpilot.manifest`
(:class:`~fastpilot.manifest.Manifest`); this module adds what only conversion and
``fastpilot models --verify`` need: hashing a fresh output and checking every
listed file against its sha256.

This module is importable without numpy, torch or the native libraries.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastpilot.errors import ModelFileError
from fastpilot.manifest import MANIFEST, Manifest, sha256_file

__all__ = [
    "MANIFEST",
    "Manifest",
    "fastpilot_version",
    "read_manifest",
    "sha256_file",
    "verify",
    "write_manifest",
]


def fastpilot_version() -> str:
    """The installed fastpilot version, or ``0+unknown`` when running from a bare tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastpilot")
    except PackageNotFoundError:
        return "0+unknown"


def write_manifest(directory: Path, fields: dict[str, Any], weights: list[str]) -> Manifest:
    """Hash every file in ``directory`` and write ``fastpilot.json``; return the manifest.

    ``weights`` names the weight files; every other file lands under ``files``.
    ``fields`` are written as given (keys :class:`Manifest` does not model included).

    Raises:
        ModelFileError: the fields would make a manifest the server cannot read
            (checked before anything is written).
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
    parsed = Manifest.from_json(manifest, directory / MANIFEST)
    (directory / MANIFEST).write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return parsed


def read_manifest(directory: str | Path) -> Manifest:
    """Read and check ``directory/fastpilot.json`` (no hashing; cheap).

    Raises:
        ModelFileError: the manifest is missing, unreadable, or malformed.
    """
    return Manifest.read(directory)


def verify(directory: str | Path) -> Manifest:
    """Check every file listed in the manifest against its sha256; return the manifest.

    Reads every byte of the model (seconds per GB); call it once at load time or in
    ``fastpilot models --verify``, not per request.

    Raises:
        ModelFileError: manifest problems, a listed file missing, or a hash mismatch.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, expected in manifest.listed.items():
        if Path(name).name != name:
            raise ModelFileError(f"{directory / MANIFEST}: {name!r} is not a plain file name")
        path = directory / name
        if not path.is_file():
            raise ModelFileError(f"{path}: listed in {MANIFEST} but missing")
        if sha256_file(path) != expected:
            raise ModelFileError(f"{path}: sha256 mismatch; the file is corrupted or was changed")
    return manifest
