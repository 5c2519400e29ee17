"""The benchmark's model files: HF checkpoints (real when cached, else random weights) and
their fastpilot conversions, all cached under ``~/.cache/fastpilot/bench`` and reused.

Random checkpoints have the exact shapes of GPT-2 117M and CodeGen-350M-mono, so a
forward pass costs the same FLOPs and reads the same bytes; only the text they write is
noise. Their tokenizer is a byte-level BPE of GPT-2's size (50,257 tokens with
``<|endoftext|>`` last) trained offline on this interpreter's stdlib, because the model
hub is not reachable here; CodeGen keeps its padded 51,200-row embedding.

Heavy work (torch, training the tokenizer, conversion) runs in subprocesses so that the
harness process itself stays small: ``python -m benchmarks.models build NAME OUT``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CACHE", "ModelFile", "ModelSpec", "SPECS", "prepare"]

CACHE = Path(
    os.environ.get("FASTPILOT_BENCH_CACHE", Path.home() / ".cache" / "fastpilot" / "bench")
)
VOCAB = 50257  # GPT-2's tokenizer size; <|endoftext|> is id 50256


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A checkpoint shape to benchmark and the hub ids of its real weights."""

    name: str  # engine name, e.g. "gpt2-117m"
    arch: str  # "gpt2" or "codegen"
    config: dict  # transformers config kwargs (random build)
    real_ids: tuple[str, ...]  # looked up in the local HF cache only
    n_ctx: int


SPECS: dict[str, ModelSpec] = {
    "gpt2-117m": ModelSpec(
        "gpt2-117m",
        "gpt2",
        dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=VOCAB),
        ("openai-community/gpt2", "gpt2"),
        1024,
    ),
    "codegen-350m": ModelSpec(
        "codegen-350m",
        "codegen",
        # Salesforce/codegen-350M-mono's config.json values.
        dict(
            n_embd=1024,
            n_layer=20,
            n_head=16,
            rotary_dim=32,
            n_positions=2048,
            n_ctx=2048,
            vocab_size=51200,
            tie_word_embeddings=False,
            bos_token_id=50256,
            eos_token_id=50256,
        ),
        ("Salesforce/codegen-350M-mono", "Salesforce/codegen-350M-multi"),
        2048,
    ),
}

# (format, quantization) pairs converted for every model; the label names result rows.
FORMATS: tuple[tuple[str, str, str], ...] = (
    ("gguf", "q4_k_m", "gguf-q4_k_m"),
    ("gguf", "q8_0", "gguf-q8_0"),
    ("ct2", "int8", "ct2-int8"),
)


@dataclass(frozen=True, slots=True)
class ModelFile:
    """One converted model: the directory fastpilot serves and the weights file in it."""

    model: str  # spec name
    label: str  # e.g. "gguf-q4_k_m"
    fmt: str  # "gguf" | "ct2"
    quant: str
    directory: Path
    weights: Path  # the .gguf file, or CT2's model.bin
    bytes: int
    hf_dir: Path
    real: bool
    extra: dict = field(default_factory=dict)


def _real_checkpoint(spec: ModelSpec) -> Path | None:
    """A complete snapshot of the real model in the local HF cache, if any (no network)."""
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError:
        return None
    try:
        info = scan_cache_dir()
    except Exception:  # noqa: BLE001 - no cache dir, unreadable cache: treat as absent
        return None
    for repo in info.repos:
        if repo.repo_type != "model" or repo.repo_id not in spec.real_ids:
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            names = {f.file_name for f in rev.files}
            has_w = bool(names & {"model.safetensors", "pytorch_model.bin"})
            has_t = "tokenizer.json" in names or {"vocab.json", "merges.txt"} <= names
            if has_w and has_t and "config.json" in names:
                return Path(rev.snapshot_path)
    return None


def _log(msg: str) -> None:
    print(f"[models] {msg}", file=sys.stderr, flush=True)


def _run(argv: list[str], log: Path, timeout: float) -> None:
    """Run a build step at low priority; raise with the log tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        proc = subprocess.run(
            ["nice", "-n", "10", *argv],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed ({proc.returncode}):\n{tail}")


# --------------------------------------------------------------------------- building


def train_tokenizer(out: Path) -> Path:
    """Train (once) a GPT-2-sized byte-level BPE on the stdlib; return its directory."""
    if (out / "tokenizer.json").is_file():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 1,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts():
        for f in files:
            try:
                yield Path(f).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a few stdlib test files are deliberately not UTF-8

    tok.train_from_iterator(texts(), trainer)
    n = tok.get_vocab_size()
    if n != VOCAB - 1:
        raise RuntimeError(
            f"trained tokenizer has {n} tokens, wanted {VOCAB - 1}: corpus too small"
        )
    tok.add_special_tokens(["<|endoftext|>"])
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(str(tmp / "tokenizer.json"))
    eot = "<|endoftext|>"
    cfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "model_max_length": 2048,
        "add_prefix_space": False,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    (tmp / "special_tokens_map.json").write_text(
        json.dumps({k: eot for k in ("bos_token", "eos_token", "unk_token")})
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build_random(spec: ModelSpec, tokenizer_dir: Path, out: Path) -> None:
    """Write a random-weight checkpoint of ``spec``'s shape (float32 safetensors) to ``out``."""
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if spec.arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(**spec.config))
    else:
        model = CodeGenForCausalLM(CodeGenConfig(**spec.config))
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp / f.name)
    (tmp / "RANDOM_WEIGHTS").write_text("random init (seed 0); shapes of " + spec.name + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _converter_argv(source: Path, name: str, fmt: str, quant: str, out: Path) -> list[str]:
    """The fastpilot converter command: the ``fastpilot convert`` CLI when it has it."""
    exe = Path(sys.executable).parent / "fastpilot"
    args = [
        str(source),
        "--name",
        name,
        "--format",
        fmt,
        "--quantization",
        quant,
        "--out",
        str(out),
    ]
    if exe.is_file():
        probe = subprocess.run(
            [str(exe), "convert", "--help"], capture_output=True, timeout=120, check=False
        )
        if probe.returncode == 0:
            return [str(exe), "convert", *args]
    return [sys.executable, "-m", "conversion", *args]


def _converter_key() -> str:
    """Hash of the converter's source: a cached conversion older than the code is redone."""
    import hashlib

    root = Path(__file__).resolve().parent.parent / "conversion"
    h = hashlib.sha256()
    for f in sorted(root.glob("*.py")):
        if "tiny_py" not in f.name:  # tiny-py's trainer and its helpers convert nothing
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _weights_file(directory: Path, fmt: str, quant: str) -> Path:
    if fmt == "ct2":
        return directory / "model.bin"
    ggufs = sorted(directory.glob("*.gguf"))
    for g in ggufs:  # prefer the file named for the quantization if several exist
        if quant.lower() in g.name.lower():
            return g
    if len(ggufs) == 1:
        return ggufs[0]
    raise RuntimeError(
        f"{directory}: cannot tell which .gguf is {quant}: {[g.name for g in ggufs]}"
    )


def prepare(
    names: list[str], formats: list[str], logs: Path, *, rebuild: bool = False
) -> list[ModelFile]:
    """Make sure every (model, format) file exists in the cache; return them.

    Builds the tokenizer, the random checkpoints and the conversions that are missing,
    each in a niced subprocess. A conversion that fails is reported on stderr and left
    out of the result, so the rest of the run goes on.
    """
    files: list[ModelFile] = []
    for name in names:
        spec = SPECS[name]
        real = _real_checkpoint(spec)
        hf_dir = real or CACHE / "hf" / name
        if real is None and (rebuild or not (hf_dir / "config.json").is_file()):
            t0 = time.monotonic()
            _log(f"building random {name} checkpoint in {hf_dir}")
            _run(
                [sys.executable, "-m", "benchmarks.models", "build", name, str(hf_dir)],
                logs / f"build-{name}.log",
                1800,
            )
            _log(f"built {name} in {time.monotonic() - t0:.0f}s")
        for fmt, quant, label in FORMATS:
            if label not in formats:
                continue
            out = CACHE / "models" / f"{name}{'-real' if real else ''}-{label}"
            key = _converter_key()
            kf = out / ".bench-key"
            stale = not kf.is_file() or kf.read_text() != key
            if rebuild or stale or not (out / "fastpilot.json").is_file():
                t0 = time.monotonic()
                _log(f"converting {name} -> {label}")
                shutil.rmtree(out, ignore_errors=True)
                try:
                    _run(
                        _converter_argv(hf_dir, name, fmt, quant, out),
                        logs / f"convert-{name}-{label}.log",
                        1800,
                    )
                except (RuntimeError, subprocess.TimeoutExpired) as ex:
                    _log(f"conversion {name} {label} failed, skipped: {ex}")
                    continue
                (out / ".bench-key").write_text(key)
                _log(f"converted {name} -> {label} in {time.monotonic() - t0:.0f}s")
            w = _weights_file(out, fmt, quant)
            files.append(
                ModelFile(
                    name, label, fmt, quant, out, w, w.stat().st_size, hf_dir, real is not None
                )
            )
    return files


def _main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "build":
        spec, out = SPECS[argv[1]], Path(argv[2])
        tok = train_tokenizer(CACHE / "tokenizer-stdlib-bpe")
        build_random(spec, tok, out)
        return
    raise SystemExit("usage: python -m benchmarks.models build NAME OUT")


if __name__ == "__main__":
    _main(sys.argv[1:])
