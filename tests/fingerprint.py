"""The cache key of the tiny test models: a hash of what determines their bytes.

Shared by the session fixtures of ``tests/conftest.py`` and ``tests/infill_fixtures.py``:
the test module that builds the models, every converter module, and the versions of
the libraries that write or read them. The tiny-py training and evaluation scripts
(``conversion/train_tiny_py.py``, ``conversion/tiny_py_*.py``) live beside the converters
but never touch a test model, so editing them does not rebuild the models (the bench's
model key, ``benchmarks/models.py``, leaves them out too).
"""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBS = ("ctranslate2", "llama_cpp_python", "gguf", "tokenizers", "transformers", "torch", "numpy")


def _is_tiny_py_script(path: Path) -> bool:
    return path.name == "train_tiny_py.py" or path.name.startswith("tiny_py")


def fingerprint(*builders: str) -> str:
    """16 hex digits over ``tests/<builder>`` files, the converters and :data:`LIBS`."""
    digest = hashlib.sha256()
    sources = [ROOT / "tests" / name for name in builders]
    sources += [p for p in sorted((ROOT / "conversion").glob("*.py")) if not _is_tiny_py_script(p)]
    for path in sources:
        digest.update(path.name.encode() + path.read_bytes())
    for lib in LIBS:
        try:
            digest.update(f"{lib}={version(lib.replace('_', '-'))}".encode())
        except PackageNotFoundError:
            digest.update(lib.encode())
    return digest.hexdigest()[:16]
