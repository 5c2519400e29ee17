"""A GPT-2-117M-shaped model with random weights, converted by fastpilot's converter.

Used by the per-backend speed scripts: same shapes, FLOPs and bytes per token as
GPT-2 small (the text is noise), built once under ``root`` and reused.
"""

from __future__ import annotations

from pathlib import Path


def build(root: Path, fmt: str, quantization: str) -> Path:
    """Build and convert the model under ``root/<fmt>-<quantization>``; reuse it when there."""
    out = root / f"{fmt}-{quantization}"
    if (out / "fastpilot.json").is_file():
        return out
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from conversion.convert import Target, convert
    from tests import tinymodels

    tok = tinymodels.build_tokenizer(root / "tok")
    eos = tinymodels.VOCAB_SIZE - 1
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos)).eval()
    hf = root / "hf"
    model.save_pretrained(hf)
    for p in tok.iterdir():
        (hf / p.name).write_bytes(p.read_bytes())
    convert(str(hf), "gpt2-117m", [Target(fmt, quantization)], out=out, force=True)
    return out
