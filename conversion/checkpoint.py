"""Read a Hugging Face checkpoint directory: config.json and its weights, without torch.

``*.safetensors`` files (single or sharded with ``model.safetensors.index.json``) are
read with ``safetensors`` in numpy mode; bfloat16 tensors, which numpy cannot hold,
are widened to float32 from a memory map. A pickle checkpoint (``pytorch_model.bin``)
is read only when torch is importable, and then with ``weights_only=True``.

Every problem a user can cause (a missing file, a truncated file, a tensor that is
absent) is raised as :class:`fastpilot.errors.ConversionError` with one line that
names the file.
"""

from __future__ import annotations

import json
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastpilot.errors import ConversionError

__all__ = ["Checkpoint", "WeightStore", "load_checkpoint", "read_config"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# safetensors dtype tag -> numpy dtype (BF16 is handled separately: numpy has none).
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def read_config(directory: Path) -> dict[str, Any]:
    """Return config.json of a checkpoint directory as a dict.

    Raises:
        ConversionError: the file is missing or is not a JSON object.
    """
    path = directory / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory}: no config.json; is this a Hugging Face checkpoint?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as ex:
        raise ConversionError(f"{path}: cannot read ({ex})") from ex
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return config


class WeightStore(ABC):
    """Named tensors of a checkpoint, loaded one at a time on request.

    Tensors are read lazily so that a caller holds at most what it asked for; a 6B
    checkpoint is never materialised twice by the store itself.
    """

    @property
    @abstractmethod
    def names(self) -> frozenset[str]:
        """All tensor names in the checkpoint."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Return the shape of ``name`` without reading its data."""

    @abstractmethod
    def _read(self, name: str) -> np.ndarray:
        """Read ``name`` (known to exist) as a numpy array."""

    def get(self, name: str) -> np.ndarray:
        """Return tensor ``name`` as float32 or float16 (integer tensors unchanged).

        bfloat16 and float64 are converted to float32; float16 stays float16 so that
        a half-precision checkpoint needs half the memory.

        Raises:
            ConversionError: the checkpoint has no tensor of that name.
        """
        if name not in self.names:
            raise ConversionError(f"checkpoint has no tensor {name!r}")
        array = self._read(name)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        return array


@dataclass(frozen=True, slots=True)
class _StEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offset into the file (header included)
    end: int


def _read_safetensors_header(path: Path) -> dict[str, _StEntry]:
    """Parse and check one safetensors header; catch truncation before any read.

    Layout (safetensors spec): u64 little-endian header length N, N bytes of JSON
    ``{name: {dtype, shape, data_offsets: [begin, end]}}``, then the data block.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ConversionError(f"{path}: truncated safetensors file (header cut short)")
            header = json.loads(f.read(n))
    except OSError as ex:
        raise ConversionError(f"{path}: cannot read ({ex})") from ex
    except (json.JSONDecodeError, UnicodeDecodeError) as ex:
        raise ConversionError(f"{path}: corrupt safetensors header ({ex})") from ex
    entries: dict[str, _StEntry] = {}
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            entry = _StEntry(
                path,
                str(info["dtype"]),
                tuple(int(d) for d in info["shape"]),
                data_start + begin,
                data_start + end,
            )
        except (KeyError, TypeError, ValueError) as ex:
            raise ConversionError(f"{path}: corrupt safetensors entry {name!r}") from ex
        if entry.end > size:
            raise ConversionError(
                f"{path}: truncated safetensors file ({size} bytes, tensor {name!r} "
                f"needs {entry.end}); download it again"
            )
        entries[name] = entry
    return entries


class SafetensorsStore(WeightStore):
    """Tensors from one or more ``*.safetensors`` files."""

    def __init__(self, files: Iterable[Path]) -> None:
        self._entries: dict[str, _StEntry] = {}
        for path in files:
            self._entries.update(_read_safetensors_header(path))
        self._names = frozenset(self._entries)

    @property
    def names(self) -> frozenset[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def _read(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        if entry.dtype == "BF16":
            # bf16 is the top half of an IEEE float32: widen (n,) uint16 -> (n,) uint32 << 16.
            raw = np.fromfile(
                entry.file, dtype="<u2", count=(entry.end - entry.begin) // 2, offset=entry.begin
            )
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry.shape)
        if entry.dtype not in _ST_DTYPES:
            raise ConversionError(
                f"{entry.file}: tensor {name!r} has unsupported dtype {entry.dtype}"
            )
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(entry.file), framework="numpy") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as ex:
            raise ConversionError(f"{entry.file}: cannot read tensor {name!r} ({ex})") from ex


class PickleStore(WeightStore):
    """Tensors from ``pytorch_model.bin`` shards; needs the optional torch extra."""

    def __init__(self, files: Iterable[Path]) -> None:
        try:
            import torch
        except ImportError as ex:
            raise ConversionError(
                "this checkpoint only has pytorch_model.bin (a pickle); install the torch "
                "extra (pip install 'fastpilot[torch]') or use a safetensors checkpoint"
            ) from ex
        self._tensors: dict[str, Any] = {}
        for path in files:
            state = self._load(torch, path)
            self._tensors.update(state)
        self._names = frozenset(self._tensors)

    @staticmethod
    def _load(torch: Any, path: Path) -> dict[str, Any]:
        """torch.load with weights_only=True; memory-mapped when the file allows it."""
        try:
            # mmap needs the zip format (torch >= 1.6); old pickles fall back to a full read.
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as ex:
                if "zip" not in str(ex).lower() and "mmap" not in str(ex).lower():
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as ex:  # torch raises many types for corrupt/unsafe pickles
            raise ConversionError(
                f"{path}: not loadable as a weights-only PyTorch checkpoint "
                f"({type(ex).__name__}); it is corrupt or holds more than tensors"
            ) from ex

    @property
    def names(self) -> frozenset[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def _read(self, name: str) -> np.ndarray:
        import torch

        tensor = self._tensors[name]
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.numpy()


def _index_files(directory: Path, index_name: str) -> list[Path]:
    index_path = directory / index_name
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as ex:
        raise ConversionError(f"{index_path}: cannot read the shard index ({ex})") from ex
    files = sorted({directory / name for name in weight_map.values()})
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise ConversionError(
            f"{directory}: shard(s) listed in {index_name} are missing: " + ", ".join(missing)
        )
    return files


def open_weights(directory: Path) -> WeightStore:
    """Open the weights of a checkpoint directory, preferring safetensors over pickle.

    Raises:
        ConversionError: no weight file, a missing shard, a truncated file, or a pickle
            checkpoint without torch installed.
    """
    if (directory / SAFETENSORS_INDEX).is_file():
        return SafetensorsStore(_index_files(directory, SAFETENSORS_INDEX))
    single = sorted(directory.glob("*.safetensors"))
    if single:
        return SafetensorsStore(single)
    if (directory / PICKLE_INDEX).is_file():
        return PickleStore(_index_files(directory, PICKLE_INDEX))
    if (directory / "pytorch_model.bin").is_file():
        return PickleStore([directory / "pytorch_model.bin"])
    raise ConversionError(
        f"{directory}: no weights found (expected model.safetensors, sharded safetensors "
        "with model.safetensors.index.json, or pytorch_model.bin)"
    )


@dataclass(frozen=True)
class Checkpoint:
    """A local Hugging Face checkpoint: its directory, parsed config and weights."""

    directory: Path
    config: dict[str, Any]
    weights: WeightStore


def load_checkpoint(directory: Path) -> Checkpoint:
    """Open ``directory`` as a checkpoint; reads headers only, not tensor data."""
    if not directory.is_dir():
        raise ConversionError(f"{directory}: not a directory")
    config = read_config(directory)
    return Checkpoint(directory, config, open_weights(directory))
