"""Convert one checkpoint into one or more output formats, atomically.

The flow is: resolve the source (directory or hub id) -> open the checkpoint ->
pick the architecture loader -> build the canonical model once -> for each target,
write into a temp directory next to the destination, add ``fastpilot.json`` last,
rename into place. Any failure removes the temp directory (and any directory this
run created), so a destination either holds a complete model or is untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from fastpilot.errors import ConversionError, ModelFileError

from .model import DecoderModel
from .tokenizer import TokenizerData

if TYPE_CHECKING:
    from .seq2seq import Seq2SeqModel

__all__ = [
    "DEFAULT_TARGETS",
    "FORMATS",
    "Result",
    "Target",
    "convert",
    "is_converted",
    "parse_target",
]


@dataclass(frozen=True, slots=True)
class Target:
    """One output: a format and a quantization, e.g. ``Target("gguf", "q4_k_m")``."""

    format: str
    quantization: str

    @property
    def dirname(self) -> str:
        return f"{self.format}-{self.quantization}"


@dataclass(frozen=True, slots=True)
class Result:
    target: Target
    path: Path
    written: bool  # False: an up-to-date output was already there


class OutputFormat(ABC):
    """An output format; subclasses implement only :meth:`write`."""

    name: ClassVar[str]
    quantizations: ClassVar[tuple[str, ...]]

    @abstractmethod
    def write(self, job: _Job, out_dir: Path, quantization: str) -> list[str]:
        """Write the model into the empty ``out_dir``; return the weight file names."""


class Ct2Format(OutputFormat):
    name = "ct2"
    quantizations = ("float32", "float16", "int8", "int8_float16")

    def write(self, job: _Job, out_dir: Path, quantization: str) -> list[str]:
        from .ct2_writer import write_ct2

        return write_ct2(job.model, job.tokenizer, out_dir, quantization)


class GgufFormat(OutputFormat):
    name = "gguf"
    quantizations = ("f32", "f16", "q8_0", "q4_k_m")

    def write(self, job: _Job, out_dir: Path, quantization: str) -> list[str]:
        from .gguf_writer import write_gguf
        from .quantize import quantize_gguf

        dst = out_dir / "model.gguf"
        if quantization in ("f32", "f16"):
            write_gguf(job.decoder(), job.tokenizer, dst, quantization, name=job.name)
        else:
            quantize_gguf(job.float_gguf(), dst, quantization)
        return [dst.name]


FORMATS: dict[str, OutputFormat] = {f.name: f for f in (Ct2Format(), GgufFormat())}
DEFAULT_TARGETS = (Target("ct2", "int8"), Target("gguf", "q8_0"), Target("gguf", "q4_k_m"))
DEFAULT_QUANTIZATION = {"ct2": "int8", "gguf": "q4_k_m"}


def parse_target(fmt: str, quantization: str | None) -> Target:
    """Validate a (format, quantization) pair; a miss lists what is supported.

    Raises:
        ConversionError: unknown format, or a quantization that format cannot hold.
    """
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    quantization = quantization or DEFAULT_QUANTIZATION[fmt]
    if quantization not in FORMATS[fmt].quantizations:
        raise ConversionError(
            f"{fmt} cannot hold {quantization!r}; "
            f"choose from {', '.join(FORMATS[fmt].quantizations)}"
        )
    return Target(fmt, quantization)


class _Job:
    """The loaded model and tokenizer, plus a scratch dir for intermediate files."""

    # A float GGUF is the input of llama.cpp's quantizer: f32 while it stays under
    # this size (most accurate), f16 beyond (halves the scratch space for 2B+ models).
    F32_INTERMEDIATE_MAX_BYTES = 4 << 30

    def __init__(
        self,
        model: DecoderModel | Seq2SeqModel,
        tokenizer: TokenizerData,
        name: str,
        scratch: Path,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.scratch = scratch
        self._float_gguf: Path | None = None

    def decoder(self) -> DecoderModel:
        """The model as a decoder-only one (what GGUF can hold).

        Raises:
            ConversionError: the model is an encoder-decoder (T5).
        """
        if not isinstance(self.model, DecoderModel):
            raise ConversionError(
                f"llama.cpp cannot serve {self.model.hyper.arch} (encoder-decoder) models in "
                "fastpilot; convert to ct2"
            )
        return self.model

    def float_gguf(self) -> Path:
        if self._float_gguf is None:
            model = self.decoder()
            from .gguf_writer import write_gguf

            n_params = model.token_embd.size * (2 if not model.tied else 1) + sum(
                layer.qkv.weight.size
                + layer.attn_out.weight.size
                + layer.ffn_up.weight.size
                + layer.ffn_down.weight.size
                for layer in model.layers
            )
            ftype = "f32" if 4 * n_params <= self.F32_INTERMEDIATE_MAX_BYTES else "f16"
            self.scratch.mkdir(parents=True, exist_ok=True)
            path = self.scratch / f"model-{ftype}.gguf"
            write_gguf(model, self.tokenizer, path, ftype, name=self.name)
            self._float_gguf = path
        return self._float_gguf


def is_converted(path: Path) -> bool:
    """True when ``path`` holds a manifest whose listed files all exist (no hashing)."""
    from .manifest import read_manifest

    try:
        manifest = read_manifest(path)
    except ModelFileError:
        return False
    return all((path / name).is_file() for name in manifest.listed)


def _missing_parents(path: Path) -> list[Path]:
    """Ancestors of ``path`` that do not exist yet, nearest first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _remove_if_empty(dirs: Sequence[Path]) -> None:
    for d in dirs:  # nearest first, so children go before parents
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def _atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temp dir next to ``dest``; on success it replaces ``dest``.

    On any exception (including Ctrl-C) the temp dir and every parent this call
    created are removed and ``dest`` is left as it was.
    """
    created = _missing_parents(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; a model dir is ordinary data
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_if_empty(created)
        raise


def _seq2seq_targets(
    todo: list[tuple[Target, Path]], targets: list[Target], results: dict[Path, Result]
) -> list[tuple[Target, Path]]:
    """The CTranslate2 part of ``todo`` for an encoder-decoder model.

    The default set (``--format all``) means "every format this model has": its GGUF
    entries are dropped. An explicit GGUF target is refused.

    Raises:
        ConversionError: a GGUF target was asked for by name.
    """
    if any(t.format == "gguf" for t in targets) and tuple(targets) != DEFAULT_TARGETS:
        raise ConversionError(
            "T5 (encoder-decoder) models such as CodeT5 convert to ct2 only: llama.cpp "
            "cannot serve them in fastpilot; use --format ct2"
        )
    for target, dest in todo:
        if target.format == "gguf":
            del results[dest]
    return [(t, d) for t, d in todo if t.format != "gguf"]


def convert(
    source: str,
    name: str,
    targets: Sequence[Target] = DEFAULT_TARGETS,
    *,
    models_dir: Path = Path("models"),
    out: Path | None = None,
    force: bool = False,
    offline: bool = False,
) -> list[Result]:
    """Convert ``source`` into each of ``targets``.

    Args:
        source: checkpoint directory or hub id (see :func:`conversion.source.resolve_source`).
        name: engine name; outputs go to ``models_dir/name/<format>-<quantization>/``.
        out: with one target, the output directory itself; with several, the parent
            of the ``<format>-<quantization>`` directories.
        force: rewrite outputs that already exist with a valid manifest (otherwise
            they are kept and reported as not written).
        offline: for a hub id, use the local cache only.

    Returns:
        One :class:`Result` per target, in order.

    Raises:
        ConversionError: any input problem; nothing is left behind for the failed target.

    Blocks for as long as conversion takes (seconds for tiny models, tens of minutes
    and several times the model's size in RAM for 2B+ checkpoints).
    """
    from .architectures import loader_for
    from .checkpoint import load_checkpoint
    from .infill import end_token_ids, fim_template
    from .manifest import write_manifest
    from .seq2seq import Seq2SeqModel
    from .source import resolve_source
    from .t5 import T5Loader, encoder_specials  # importing it registers the T5 loader
    from .tokenizer import load_tokenizer

    if not targets:
        raise ConversionError("nothing to convert: no targets")
    for t in targets:
        parse_target(t.format, t.quantization)
    if out is not None and len(targets) == 1:
        dests = [Path(out)]
    else:
        root = Path(out) if out is not None else Path(models_dir) / name
        dests = [root / t.dirname for t in targets]
    todo = [(t, d) for t, d in zip(targets, dests, strict=True) if force or not is_converted(d)]
    results = {d: Result(t, d, False) for t, d in zip(targets, dests, strict=True)}
    if not todo:
        return list(results.values())

    resolved = resolve_source(source, offline=offline)
    checkpoint = load_checkpoint(resolved.directory)
    loader = loader_for(checkpoint)
    if isinstance(loader, T5Loader):
        todo = _seq2seq_targets(todo, list(targets), results)
        if not todo:
            return list(results.values())
    model = loader.load()
    tokenizer = load_tokenizer(resolved.directory, checkpoint.config)
    tokenizer.padded(model.hyper.vocab_size)  # fails early if tokenizer > embedding rows
    arch = model.hyper.arch

    scratch_parent = dests[0].parent
    created = _missing_parents(scratch_parent / "x")
    scratch = scratch_parent / f".scratch-{os.getpid()}"
    job = _Job(model, tokenizer, name, scratch)
    try:
        for target, dest in todo:
            with _atomic_dir(dest) as tmp:
                weights = FORMATS[target.format].write(job, tmp, target.quantization)
                (tmp / "tokenizer.json").write_text(tokenizer.json_text, encoding="utf-8")
                fields = {
                    "name": name,
                    "arch": arch,
                    "source": resolved.source,
                    "source_revision": resolved.revision,
                    "format": target.format,
                    "quantization": target.quantization,
                    "context_length": model.hyper.n_ctx,
                    "vocab_size": model.hyper.vocab_size,
                    "tokenizer": "tokenizer.json",
                    "bos_token_id": tokenizer.bos_id,
                    "eos_token_ids": end_token_ids(arch, tokenizer),
                    "fim": fim_template(arch, tokenizer),
                }
                if isinstance(model, Seq2SeqModel):
                    prefix, suffix = encoder_specials(tokenizer)
                    fields["seq2seq"] = {
                        "decoder_start_token_id": model.hyper.decoder_start_token_id,
                        "encoder_prefix_ids": prefix,
                        "encoder_suffix_ids": suffix,
                    }
                if target.format == "gguf" and isinstance(model, DecoderModel):
                    from .gguf_writer import gguf_arch

                    fields["gguf_arch"] = gguf_arch(model)
                write_manifest(tmp, fields, weights)
            results[dest] = Result(target, dest, True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not any(r.written for r in results.values()):
            _remove_if_empty(created)
    return list(results.values())
