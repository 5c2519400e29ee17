"""Check a model directory before any native library opens it: model files are untrusted.

llama.cpp and CTranslate2 parse their files in C++; a truncated, corrupted or
hostile file can crash the process or worse. So :func:`check_model` refuses a
model, with a message that names the file and the problem, unless:

1. **Structure** (always, cheap: reads headers, never the weights): a GGUF file
   has the ``GGUF`` magic, version 2 or 3, sane tensor and key counts, every
   key/value and tensor record inside the file, known tensor types, at most 4
   dimensions, and every tensor's data inside the file (a truncated file fails
   here even without a manifest). A CTranslate2 ``model.bin`` is walked the
   same way (binary version 6: every variable's size equals its shape times its
   dtype, and the file ends where the records say); a pickle or zip in its
   place (a PyTorch checkpoint renamed) is refused by name. ``config.json`` and
   the vocabulary must be JSON of the right shape.
2. **Integrity** (by default): the directory's ``fastpilot.json`` manifest
   (:class:`fastpilot.manifest.Manifest`, written by ``fastpilot convert``) lists
   the sha256 of every weight and tokenizer file; each must match. A directory
   without a manifest is refused.

``trust_unverified=True`` (``--trust-unverified-models``,
``FASTPILOT_TRUST_UNVERIFIED_MODELS=1``) accepts files without a manifest and
skips the sha256 of files that have one; the structural checks still run.

Cost: hashing reads every byte (1-3 s per GB; 438 MB/s measured on a busy
2-core box). Digests are memoized per process in :data:`DIGESTS`, keyed by
(path, size, mtime, inode), so loading
the same unchanged file again (tests, reloads) does not hash it twice; a
changed file has a new key and is hashed again.

Nothing here unpickles, imports a native library or renders a template:
fastpilot never loads pickles at serve time (conversion loads a
``pytorch_model.bin`` only with ``torch.load(weights_only=True)``), and no
chat template from model metadata is rendered anywhere (GPT-2/CodeGen chat
uses the fixed role-tagged format of :mod:`fastpilot.engine.chat`; the
llama.cpp backend uses the low-level API, never ``Llama``'s Jinja formatter).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpilot.errors import ModelFileError
from fastpilot.manifest import MANIFEST, Manifest, find_gguf, manifest_dir, sha256_file

TRUST_ENV = "FASTPILOT_TRUST_UNVERIFIED_MODELS"

# Sanity caps: far above any real model, far below what would exhaust memory.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_KEY_BYTES = 1 << 16
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4
GGUF_DEFAULT_ALIGNMENT = 32
CT2_BINARY_VERSION = 6
CT2_DTYPE_BYTES = (4, 1, 2, 4, 2, 2)  # float32, int8, int16, int32, float16, bfloat16
CT2_MAX_VARIABLES = 1 << 20
CT2_MAX_RANK = 8

# GGUF value types -> fixed byte size (None: string or array).
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class GgufSummary:
    """What the header walk found (for messages and tests)."""

    version: int
    n_tensors: int
    n_kv: int
    data_offset: int
    data_end: int  # largest tensor end, relative to the file start
    file_size: int


@dataclass(frozen=True, slots=True)
class Verified:
    """The outcome of :func:`check_model`."""

    path: Path
    format: str
    manifest: Manifest | None  # parsed once here; the loader hands it to the backend
    hashed: tuple[str, ...]  # file names whose sha256 was checked (or found memoized)


class _Reader:
    """Bounds-checked little-endian reads over a memory map; every overrun is a ModelFileError."""

    def __init__(self, buf: Any, size: int, where: Path) -> None:
        self.buf, self.size, self.where, self.pos = buf, size, where, 0

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.where}: {what} (at byte {self.pos} of {self.size})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated or corrupted: {what} runs past the end of the file")

    def unpack(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return int(value)

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def text(self, length: int, what: str, limit: int | None = None) -> str:
        if limit is not None and length > limit:
            raise self.fail(f"{what} is {length} bytes long (limit {limit})")
        self.need(length, what)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None


def _open_map(path: Path, minimum: int, what: str) -> tuple[Any, int]:
    size = path.stat().st_size
    if size < minimum:
        raise ModelFileError(f"{path}: {size} bytes is too small for a {what} (truncated?)")
    with path.open("rb") as fh:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), size


# -- GGUF ------------------------------------------------------------------------------


def _gguf_value(r: _Reader, vtype: int, depth: int, key: str) -> Any:
    if vtype in _GGUF_SCALAR:
        fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_GGUF_SCALAR[vtype]]
        if vtype in (1, 3, 5, 11):  # signed variants
            fmt = fmt.lower()
        if vtype == 6:
            r.skip(4, f"value of {key}")
            return None
        if vtype == 12:
            r.skip(8, f"value of {key}")
            return None
        return r.unpack(fmt, f"value of {key}")
    if vtype == _GGUF_STRING:
        n = r.unpack("<Q", f"string length of {key}")
        r.skip(n, f"string value of {key}")
        return None
    if vtype == _GGUF_ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise r.fail(f"{key}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        item = r.unpack("<I", f"array type of {key}")
        count = r.unpack("<Q", f"array length of {key}")
        if item in _GGUF_SCALAR:
            r.skip(count * _GGUF_SCALAR[item], f"array {key}")
            return None
        if item not in (_GGUF_STRING, _GGUF_ARRAY):
            raise r.fail(f"{key}: unknown array item type {item}")
        # Each string/array item is at least 8 bytes: reject absurd counts before looping.
        r.need(count * 8, f"array {key}")
        for _ in range(count):
            _gguf_value(r, item, depth + 1, key)
        return None
    raise r.fail(f"{key}: unknown value type {vtype}")


def _ggml_sizes() -> dict[int, tuple[int, int]]:
    """GGML tensor type id -> (elements per block, bytes per block), from the gguf package."""
    import gguf  # pure Python + numpy; a fastpilot dependency

    return {int(t): (int(b), int(s)) for t, (b, s) in gguf.GGML_QUANT_SIZES.items()}


def check_gguf(path: Path) -> GgufSummary:
    """Walk a GGUF file's header, key/values and tensor table; check tensor data bounds.

    Reads only the header region (memory-mapped), never the weights.

    Raises:
        ModelFileError: not GGUF, unsupported version, insane counts, truncation,
            unknown tensor types, or tensor data past the end of the file.
    """
    buf, size = _open_map(path, 24, "GGUF file")
    try:
        r = _Reader(buf, size, path)
        if bytes(buf[:4]) != b"GGUF":
            raise ModelFileError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        r.pos = 4
        version = r.unpack("<I", "version")
        if version not in (2, 3):
            raise ModelFileError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors = r.unpack("<Q", "tensor count")
        n_kv = r.unpack("<Q", "key/value count")
        if n_tensors > MAX_TENSORS or n_tensors * 24 > size:
            raise ModelFileError(f"{path}: implausible tensor count {n_tensors}")
        if n_kv > MAX_KV or n_kv * 12 > size:
            raise ModelFileError(f"{path}: implausible key/value count {n_kv}")
        alignment = GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = r.text(r.unpack("<Q", "key length"), "key", limit=MAX_KEY_BYTES)
            vtype = r.unpack("<I", f"type of {key}")
            value = _gguf_value(r, vtype, 0, key)
            if key == "general.alignment":
                if vtype != 4 or not value or value & (value - 1) or value > 1 << 16:
                    raise r.fail(f"general.alignment must be a power of two, got {value}")
                alignment = value
        sizes = _ggml_sizes()
        tensors = []
        for i in range(n_tensors):
            name = r.text(r.unpack("<Q", f"tensor {i} name length"), f"tensor {i} name", 1024)
            n_dims = r.unpack("<I", f"rank of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise r.fail(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS})")
            dims = [r.unpack("<Q", f"shape of {name}") for _ in range(n_dims)]
            ttype = r.unpack("<I", f"type of {name}")
            offset = r.unpack("<Q", f"offset of {name}")
            if ttype not in sizes:
                raise r.fail(f"tensor {name} has unknown type {ttype}")
            block, type_size = sizes[ttype]
            if any(d < 1 or d > 1 << 40 for d in dims) or dims[0] % block:
                raise r.fail(f"tensor {name} has an impossible shape {dims}")
            count = 1
            for d in dims:
                count *= d
            if offset % alignment:
                raise r.fail(f"tensor {name} offset {offset} is not {alignment}-aligned")
            tensors.append((name, offset, count // block * type_size))
        data_offset = -(-r.pos // alignment) * alignment
        data_end = data_offset
        for name, offset, nbytes in tensors:
            end = data_offset + offset + nbytes
            if end > size:
                raise ModelFileError(
                    f"{path}: truncated or corrupted: tensor {name} needs bytes up to {end} "
                    f"but the file has {size}"
                )
            data_end = max(data_end, end)
        return GgufSummary(version, n_tensors, n_kv, data_offset, data_end, size)
    finally:
        buf.close()


# -- CTranslate2 -----------------------------------------------------------------------


def check_ct2_binary(path: Path) -> int:
    """Walk a CTranslate2 ``model.bin`` (binary version 6); return its variable count.

    Raises:
        ModelFileError: a pickle/zip in its place, an unsupported version,
            truncation, a size that disagrees with its shape, or trailing bytes.
    """
    buf, size = _open_map(path, 12, "CTranslate2 model.bin")
    try:
        head = bytes(buf[:4])
        if head[:1] == b"\x80" or head[:2] == b"PK":
            raise ModelFileError(
                f"{path} is a pickle/zip (a PyTorch checkpoint), not a CTranslate2 model; "
                "fastpilot never loads pickles at serve time: convert it with `fastpilot convert`"
            )
        r = _Reader(buf, size, path)
        version = r.unpack("<I", "binary version")
        if version != CT2_BINARY_VERSION:
            raise ModelFileError(
                f"{path}: CTranslate2 binary version {version} is not supported "
                f"(expected {CT2_BINARY_VERSION}); reconvert the model"
            )

        def string(what: str) -> str:
            n = r.unpack("<H", f"{what} length")
            text = r.text(n, what)
            if not text.endswith("\0"):
                raise r.fail(f"{what} is not NUL-terminated")
            return text[:-1]

        string("spec name")
        r.unpack("<I", "spec revision")
        n_vars = r.unpack("<I", "variable count")
        if n_vars > CT2_MAX_VARIABLES or n_vars * 12 > size:
            raise r.fail(f"implausible variable count {n_vars}")
        for _ in range(n_vars):
            name = string("variable name")
            rank = r.unpack("<B", f"rank of {name}")
            if rank > CT2_MAX_RANK:
                raise r.fail(f"variable {name} has rank {rank}")
            count = 1
            for _ in range(rank):
                count *= r.unpack("<I", f"shape of {name}")
            dtype = r.unpack("<B", f"dtype of {name}")
            if dtype >= len(CT2_DTYPE_BYTES):
                raise r.fail(f"variable {name} has unknown dtype {dtype}")
            nbytes = r.unpack("<I", f"size of {name}")
            if nbytes != count * CT2_DTYPE_BYTES[dtype]:
                raise r.fail(f"variable {name}: {nbytes} bytes disagree with its shape")
            r.skip(nbytes, f"data of {name}")
        for _ in range(r.unpack("<I", "alias count")):
            string("alias")
            string("alias target")
        if r.pos != size:
            raise r.fail(f"{size - r.pos} unexpected bytes after the last record")
        return n_vars
    finally:
        buf.close()


def _json_file(path: Path, kind: type, what: str) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing: a CTranslate2 model needs its {what}") from None
    except (OSError, UnicodeDecodeError, ValueError) as ex:
        raise ModelFileError(f"{path}: unreadable {what} ({type(ex).__name__})") from None
    if not isinstance(data, kind):
        raise ModelFileError(f"{path}: the {what} is not a JSON {kind.__name__}")
    return data


def check_ct2_dir(directory: Path) -> None:
    """``model.bin`` walked, ``config.json`` an object, the vocabulary a list of strings."""
    check_ct2_binary(directory / "model.bin")
    _json_file(directory / "config.json", dict, "config.json")
    # A Generator has one vocabulary; a Translator (T5) a shared one or one per side.
    for stem in ("vocabulary", "shared_vocabulary", "target_vocabulary"):
        vocab = directory / f"{stem}.json"
        if vocab.is_file():
            tokens = _json_file(vocab, list, "vocabulary")
            if not all(isinstance(t, str) for t in tokens):
                raise ModelFileError(f"{vocab}: the vocabulary must be a list of strings")
            return
        if (directory / f"{stem}.txt").is_file():
            return
    raise ModelFileError(f"{directory}: no vocabulary.json or vocabulary.txt")


# -- manifest and hashes ---------------------------------------------------------------


class DigestCache:
    """sha256 per (path, size, mtime_ns, inode), thread-safe; a changed file is hashed again."""

    def __init__(self, hasher: Callable[[Path], str] | None = None) -> None:
        self._hasher = hasher
        self._seen: dict[tuple[str, int, int, int], str] = {}
        self._lock = threading.Lock()
        self.computed = 0  # hashes actually computed (tests read it)

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            if key in self._seen:
                return self._seen[key]
        digest = (self._hasher or sha256_file)(path)
        with self._lock:
            self._seen[key] = digest
            self.computed += 1
        return digest


DIGESTS = DigestCache()


def _verify_manifest(
    directory: Path, fmt: str, weights: list[str], cache: DigestCache, hash_files: bool
) -> tuple[Manifest, tuple[str, ...]]:
    manifest = Manifest.read(directory)
    if manifest.format != fmt:
        raise ModelFileError(
            f"{directory / MANIFEST} says format {manifest.format!r} "
            f"but the directory holds a {fmt} model"
        )
    unlisted = [w for w in weights if w not in manifest.weights]
    if unlisted:
        raise ModelFileError(
            f"{directory / MANIFEST} lists no sha256 for {', '.join(unlisted)}; "
            "reconvert, or pass --trust-unverified-models"
        )
    listed = manifest.listed
    for name in listed:
        # Plain names only: a manifest must not point the loader outside its directory.
        if Path(name).name != name or not (directory / name).is_file():
            raise ModelFileError(f"{directory / str(name)}: listed in {MANIFEST} but missing")
    hashed: list[str] = []
    for name, expected in listed.items():
        file = directory / name
        if hash_files:
            if cache.sha256(file) != expected:
                raise ModelFileError(
                    f"{file}: sha256 does not match {MANIFEST}; the file is corrupted, "
                    "truncated or was changed after conversion"
                )
            hashed.append(name)
    return manifest, tuple(hashed)


def trust_from_env(environ: dict[str, str] | None = None) -> bool:
    value = (os.environ if environ is None else environ).get(TRUST_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def check_model(
    path: str | os.PathLike[str],
    fmt: str,
    *,
    trust_unverified: bool = False,
    cache: DigestCache | None = None,
) -> Verified:
    """Refuse a model that is not safe to hand to native code (see the module docstring).

    Args:
        path: what the loader resolved: a converted output directory, or a ``.gguf`` file.
        fmt: ``"gguf"`` or ``"ct2"``.
        trust_unverified: accept a missing manifest and skip the sha256 checks.
        cache: digest memo (default: the process-wide :data:`DIGESTS`).

    Blocks while hashing (1-3 s per GB, once per unchanged file per process).

    Raises:
        ModelFileError: with the file and the reason.
    """
    path = Path(path)
    cache = DIGESTS if cache is None else cache
    directory = manifest_dir(path)
    if fmt == "gguf":
        gguf = find_gguf(path)
        check_gguf(gguf)
        weights = [gguf.name]
    elif fmt == "ct2":
        check_ct2_dir(directory)
        weights = ["model.bin"]
    else:
        raise ModelFileError(f"{path}: unknown model format {fmt!r}")
    if not (directory / MANIFEST).is_file():
        if trust_unverified:
            return Verified(path, fmt, None, ())
        raise ModelFileError(
            f"{directory}: no {MANIFEST} with the weights' sha256, so the files cannot be "
            "verified. Convert with `fastpilot convert` (it writes one), or pass "
            f"--trust-unverified-models ({TRUST_ENV}=1) to load it anyway"
        )
    manifest, hashed = _verify_manifest(directory, fmt, weights, cache, not trust_unverified)
    return Verified(path, fmt, manifest, hashed)
