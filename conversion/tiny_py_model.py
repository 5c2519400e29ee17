"""A small GPT-2 in plain torch whose state dict is a Hugging Face GPT-2 checkpoint.

Why not ``transformers.GPT2LMHeadModel`` for training: the GPU machine's transformers
differs from ours, importing it costs seconds, and this module is small enough to
keep the hot path (SDPA flash attention, bf16 autocast, optional ``torch.compile``)
under our control. Parameter names, shapes (Conv1D layout: ``c_attn.weight`` is
``[n_embd, 3*n_embd]``), ``gelu_new`` and LayerNorm eps 1e-5 match GPT-2, so the
saved shards load with ``GPT2LMHeadModel.from_pretrained`` and every converter here;
``tests/test_tiny_py_v2.py`` checks the logits agree.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class GPTShape:
    """Model size; ``n_inner`` is ``4 * n_embd`` as in GPT-2."""

    vocab_size: int = 8192
    n_positions: int = 1024
    n_embd: int = 384
    n_layer: int = 8
    n_head: int = 6


class Conv1D(nn.Module):
    """GPT-2's transposed linear layer: ``y = x @ weight + bias``, weight ``[in, out]``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(
            *x.shape[:-1], -1
        )


class Attention(nn.Module):
    def __init__(self, s: GPTShape) -> None:
        super().__init__()
        self.n_head = s.n_head
        self.c_attn = Conv1D(s.n_embd, 3 * s.n_embd)
        self.c_proj = Conv1D(s.n_embd, s.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        # SDPA picks flash attention on CUDA in bf16; the math kernel on the CPU.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, s: GPTShape) -> None:
        super().__init__()
        self.c_fc = Conv1D(s.n_embd, 4 * s.n_embd)
        self.c_proj = Conv1D(4 * s.n_embd, s.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # gelu_new


class Block(nn.Module):
    def __init__(self, s: GPTShape) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(s.n_embd, eps=1e-5)
        self.attn = Attention(s)
        self.ln_2 = nn.LayerNorm(s.n_embd, eps=1e-5)
        self.mlp = MLP(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 LM with tied input/output embeddings; ``forward`` returns logits."""

    def __init__(self, s: GPTShape) -> None:
        super().__init__()
        self.shape = s
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(s.vocab_size, s.n_embd),
                "wpe": nn.Embedding(s.n_positions, s.n_embd),
                "h": nn.ModuleList(Block(s) for _ in range(s.n_layer)),
                "ln_f": nn.LayerNorm(s.n_embd, eps=1e-5),
            }
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_f" in name:
                continue
            std = (
                0.02 / math.sqrt(2 * self.shape.n_layer) if name.endswith("c_proj.weight") else 0.02
            )
            nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        tr = self.transformer
        wte: nn.Embedding = tr["wte"]  # type: ignore[assignment]
        blocks: nn.ModuleList = tr["h"]  # type: ignore[assignment]
        pos = torch.arange(idx.size(1), device=idx.device)
        x = wte(idx) + tr["wpe"](pos)
        for block in blocks:
            x = block(x)
        x = tr["ln_f"](x)
        return x @ wte.weight.t()


def hf_config(s: GPTShape) -> dict[str, Any]:
    """The ``config.json`` of a ``GPT2LMHeadModel`` with this shape (fp16 weights, tied)."""
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.0,
        "bos_token_id": 0,
        "dtype": "float16",
        "embd_pdrop": 0.0,
        "eos_token_id": 0,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_embd": s.n_embd,
        "n_head": s.n_head,
        "n_inner": 4 * s.n_embd,
        "n_layer": s.n_layer,
        "n_positions": s.n_positions,
        "resid_pdrop": 0.0,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": s.vocab_size,
    }


def shape_dict(s: GPTShape) -> dict[str, int]:
    return asdict(s)


def save_sharded(
    model: GPT, out: Path, max_shard_bytes: int, metadata: dict[str, str]
) -> list[str]:
    """Write fp16 weights as HF shards ``model-0000k-of-0000n.safetensors`` + the index.

    Each file is written under a ``tmp.`` name and renamed, so a reader never sees a
    half-written file; the index goes last. ``metadata`` (e.g. the step) is stored in
    every shard and in the index so a reader can tell shards of different saves apart
    when a run was killed mid-save. Returns the shard names.
    """
    from safetensors.torch import save_file

    state = {
        k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards, strict=True):
        tmp = out / f"tmp.{fname}"
        save_file(shard, str(tmp), metadata={"format": "pt", **metadata})
        os.replace(tmp, out / fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    tmp = out / f"tmp.{INDEX_NAME}"
    tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / INDEX_NAME)
    return names


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, block: int, max_tokens: int, n_bytes_per_tok: float):
    """Non-overlapping windows over the held-out stream; returns metrics dict."""
    model.eval()
    ids = ids[: max_tokens + 1]
    nll, correct, count = 0.0, 0, 0
    for start in range(0, len(ids) - 1, block):
        x = ids[start : start + block + 1]
        if len(x) < 2:
            break
        inp, tgt = x[:-1].unsqueeze(0), x[1:].unsqueeze(0)
        logits = model(inp).logits.float()
        nll += torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), tgt.view(-1), reduction="sum"
        ).item()
        correct += (logits.argmax(-1) == tgt).sum().item()
        count += tgt.numel()
    model.train()
    loss = nll / count
    return {
        "eval_tokens": count,
        "loss": loss,
        "perplexity": math.exp(loss),
        "next_token_accuracy": correct / count,
        "bits_per_byte": loss / math.log(2) / n_bytes_per_tok,
    }
