"""tiny-py v2 corpus: stdlib + site-packages ``.py`` files, deduplicated, held out, tokenized.

Used by :mod:`conversion.tiny_py_train` on whatever machine trains (a GPU box with
CPython 3.12 and a large site-packages) and by :mod:`conversion.tiny_py_finalize`
here. Imports stay to the stdlib, numpy and ``tokenizers`` so the module runs on a
machine where nothing can be installed.

Two guards keep the evaluation honest. The evaluation set is the old card's 22
held-out CPython 3.11.7 files, so (1) every file whose path relative to its root is
held out by :func:`is_heldout` is dropped from training (a 3.12 stdlib has the same
relative paths), and (2) every file whose basename equals a held-out file's and whose
set of stripped non-empty lines overlaps it with Jaccard > :data:`LEAK_JACCARD` is
dropped too (vendored copies such as ``setuptools/_distutils/_msvccompiler.py`` live
under other paths). The held-out files' line hashes are committed in
``conversion/tiny_py/heldout_lines.json``; :func:`write_heldout_lines` regenerates it
from this machine's stdlib.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EOT_ID = 0
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data"}
MAX_FILE_BYTES = 300_000
HOLDOUT_PERCENT = 3
LEAK_JACCARD = 0.5
HELDOUT_LINES = Path(__file__).resolve().parent / "tiny_py" / "heldout_lines.json"


def is_heldout(relpath: str) -> bool:
    """The old trainer's hold-out rule, unchanged, so held-out sets stay comparable."""
    h = int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16)
    return h % 100 < HOLDOUT_PERCENT


def line_hashes(text: str) -> set[str]:
    """Hashes (8 hex digits) of the stripped non-empty lines: the leak filter's unit."""
    return {
        hashlib.sha1(s.encode()).hexdigest()[:8]
        for s in (ln.strip() for ln in text.splitlines())
        if s
    }


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One candidate document: its root label, path relative to that root and text."""

    root: str
    relpath: str
    text: str


@dataclass(slots=True)
class CorpusStats:
    """Counts logged and stored in training_state.json (why files were dropped)."""

    seen: int = 0
    duplicates: int = 0
    heldout: int = 0
    leaks: list[str] = field(default_factory=list)
    over_cap: int = 0
    train_files: int = 0
    train_bytes: int = 0
    heldout_bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "seen": self.seen,
            "duplicates": self.duplicates,
            "heldout": self.heldout,
            "leaks_dropped": len(self.leaks),
            "leak_examples": self.leaks[:20],
            "over_cap": self.over_cap,
            "train_files": self.train_files,
            "train_bytes": self.train_bytes,
            "heldout_bytes": self.heldout_bytes,
            "seconds": round(self.seconds, 2),
        }


def walk_py(root: str, label: str) -> Iterable[SourceFile]:
    """``.py`` files under ``root`` with the old trainer's skip rules, in sorted order.

    Skips directories named in :data:`SKIP_DIRS`, ``test_*.py``, files over
    :data:`MAX_FILE_BYTES`, non-UTF-8 and blank files.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if set(rel_dir.split(os.sep)) & SKIP_DIRS:
            dirnames[:] = []
            continue
        dirnames.sort()
        for fn in sorted(filenames):
            if not fn.endswith(".py") or fn.startswith("test_"):
                continue
            path = os.path.join(dirpath, fn)
            try:
                if os.path.getsize(path) > MAX_FILE_BYTES:
                    continue
                text = Path(path).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                yield SourceFile(label, os.path.relpath(path, root).replace(os.sep, "/"), text)


def default_roots() -> list[tuple[str, str]]:
    """``(label, dir)`` for this interpreter's stdlib and its site-packages (deduplicated)."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", paths["stdlib"])]
    seen = {os.path.realpath(paths["stdlib"])}
    for key in ("purelib", "platlib"):
        real = os.path.realpath(paths[key])
        if real not in seen and os.path.isdir(real):
            seen.add(real)
            roots.append(("site", paths[key]))
    return roots


def load_heldout_lines(path: Path = HELDOUT_LINES) -> dict[str, list[set[str]]]:
    """basename -> line-hash sets of the evaluation files with that basename."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, list[set[str]]] = {}
    for rel, hashes in raw["files"].items():
        out.setdefault(rel.rsplit("/", 1)[-1], []).append(set(hashes))
    return out


def write_heldout_lines(files: list[SourceFile], path: Path = HELDOUT_LINES) -> None:
    """Store the evaluation files' line hashes (run once on the evaluating machine)."""
    data = {
        "about": "line_hashes() of the tiny-py evaluation files (CPython stdlib held out by "
        "is_heldout); used to drop near-copies from training",
        "files": {f.relpath: sorted(line_hashes(f.text)) for f in files},
    }
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")


def is_leak(f: SourceFile, heldout: dict[str, list[set[str]]]) -> bool:
    """True when ``f`` shares a held-out file's basename and most of its lines."""
    sets = heldout.get(f.relpath.rsplit("/", 1)[-1])
    if not sets:
        return False
    mine = line_hashes(f.text)
    return any(jaccard(mine, s) > LEAK_JACCARD for s in sets)


def _order_key(f: SourceFile) -> tuple[int, str]:
    # The stdlib always comes first; site-packages files follow in a hash order so a byte
    # cap samples every package instead of the alphabetically first few.
    if f.root == "stdlib":
        return (0, f.relpath)
    return (1, hashlib.sha256(f.relpath.encode()).hexdigest())


def collect(
    roots: list[tuple[str, str]],
    heldout_lines: dict[str, list[set[str]]],
    max_bytes: int,
    log: Callable[[str], None] = print,
) -> tuple[list[SourceFile], list[SourceFile], CorpusStats]:
    """Return ``(train, heldout, stats)``.

    Files are deduplicated by content hash (first occurrence in stdlib-then-hash order
    wins), held out by :func:`is_heldout` on their root-relative path, dropped as leaks
    by :func:`is_leak`, and training files are taken until ``max_bytes`` of UTF-8 text.
    """
    t0 = time.time()
    stats = CorpusStats()
    files: list[SourceFile] = []
    for label, root in roots:
        files.extend(walk_py(root, label))
    files.sort(key=_order_key)
    seen: set[bytes] = set()
    train: list[SourceFile] = []
    held: list[SourceFile] = []
    for f in files:
        stats.seen += 1
        digest = hashlib.sha1(f.text.encode()).digest()
        if digest in seen:
            stats.duplicates += 1
            continue
        seen.add(digest)
        if is_heldout(f.relpath):
            stats.heldout += 1
            held.append(f)
            stats.heldout_bytes += len(f.text.encode())
            continue
        if is_leak(f, heldout_lines):
            stats.leaks.append(f"{f.root}:{f.relpath}")
            continue
        size = len(f.text.encode())
        if stats.train_bytes + size > max_bytes:
            stats.over_cap += 1
            continue
        stats.train_bytes += size
        train.append(f)
    stats.train_files = len(train)
    stats.seconds = time.time() - t0
    log(f"corpus: {json.dumps(stats.as_dict())}")
    return train, held, stats


def tokenize(
    texts: list[str],
    tokenizer_json: Path,
    chunk: int = 1024,
    stop_at: float | None = None,
    log: Callable[[str], None] = print,
) -> tuple[np.ndarray, int]:
    """One uint16 stream: id 0, then each document followed by id 0 (``tokenizers`` in parallel).

    Returns ``(ids, n_documents_used)``. When ``time.time()`` passes ``stop_at`` between
    chunks the remaining documents are left out (the stdlib comes first, so a slow
    machine loses site-packages files, never the stdlib) and training starts on time.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    if tok.get_vocab_size() > 65535:
        raise ValueError("vocabulary does not fit uint16")
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    parts = [np.zeros(1, dtype=np.uint16)]
    sep = np.zeros(1, dtype=np.uint16)
    used = 0
    for i in range(0, len(texts), chunk):
        if stop_at is not None and time.time() > stop_at:
            log(f"tokenize: time limit reached, {len(texts) - used} documents left out")
            break
        batch = texts[i : i + chunk]
        for enc in encode(batch, add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=np.uint16))
            parts.append(sep)
        used += len(batch)
    return np.concatenate(parts), used
