"""tiny-py v2 trainer: stdlib + site-packages corpus, GPT-2 8x384 with context 1024, CUDA.

Entered through ``python -m conversion.train_tiny_py --device cuda|cpu ...`` (a plain
``python -m conversion.train_tiny_py`` without ``--device`` still runs the v1 CPU
trainer). Imports only the stdlib, numpy, torch, tokenizers and safetensors, so it
runs on a machine where transformers differs or nothing can be installed.

Time is the budget. Every limit is wall-clock from the *process start*:
``--prep-deadline-s`` stops tokenizing more files (the stdlib goes first),
``--deadline-s`` stops training and saves regardless of the schedule, and the
warmup + cosine schedule is stretched over whatever lies between the first step and
``min(start of training + --minutes, deadline - --save-margin-s)``, so it ends at
its floor learning rate when the deadline comes. Checkpoints (fp16 HF shards of at
most ``--max-shard-mb``, their index, ``training_state.json``) are rewritten in
``--out`` every ``--ckpt-every-s`` seconds, so a killed run still returns a model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import tiny_py_corpus as corpus
from .tiny_py_model import GPT, GPTShape, hf_config, save_sharded, shape_dict

TOKENIZER = Path(__file__).resolve().parent / "tiny_py" / "checkpoint" / "tokenizer.json"


def process_start() -> float:
    """Epoch seconds when this process started (Linux ``/proc``); now elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(
            int(ln.split()[1])
            for ln in Path("/proc/stat").read_text().splitlines()
            if ln.startswith("btime")
        )
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


T_PROCESS = process_start()


class Logger:
    """Concise lines to stdout (flushed) and to ``OUT/train_log.txt``."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "train_log.txt", "a", encoding="utf-8")  # noqa: SIM115

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - T_PROCESS:6.1f}s] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m conversion.train_tiny_py --device ...")
    ap.add_argument("--device", choices=("cpu", "cuda"), required=True)
    ap.add_argument("--out", type=Path, required=True, help="checkpoint + log directory")
    ap.add_argument("--minutes", type=float, default=7.5, help="schedule length (upper bound)")
    ap.add_argument("--deadline-s", type=float, default=525.0, help="hard stop since process start")
    ap.add_argument("--save-margin-s", type=float, default=12.0, help="kept for the final save")
    ap.add_argument("--prep-deadline-s", type=float, default=80.0, help="stop tokenizing then")
    ap.add_argument("--max-corpus-mb", type=float, default=400.0, help="training text cap")
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--n-positions", type=int, default=1024)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--ckpt-every-s", type=float, default=90.0)
    ap.add_argument("--log-every-s", type=float, default=15.0)
    ap.add_argument("--val-tokens", type=int, default=262_144, help="remote held-out loss")
    ap.add_argument("--max-shard-mb", type=float, default=15.0)
    ap.add_argument("--compile", action="store_true", help="torch.compile (eager on failure)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after N steps (tests)")
    ap.add_argument("--seed", type=int, default=1234)
    return ap


def lr_at(step: int, frac: float, a: argparse.Namespace) -> float:
    """Linear warmup over steps, then cosine to ``min_lr_ratio`` over the time fraction."""
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    frac = min(max(frac, 0.0), 1.0)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def prepare_data(
    a: argparse.Namespace, log: Logger
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    t = time.time()
    roots = corpus.default_roots()
    log(f"roots: {roots}")
    train, held, stats = corpus.collect(
        roots, corpus.load_heldout_lines(), int(a.max_corpus_mb * 1e6), log=log
    )
    log(f"collected in {time.time() - t:.1f}s")
    t = time.time()
    train_ids, used = corpus.tokenize(
        [f.text for f in train], TOKENIZER, stop_at=T_PROCESS + a.prep_deadline_s, log=log
    )
    # Remote held-out loss: only a health signal (the card's numbers come from finalize),
    # so a few hundred kB of held-out text is enough.
    val_texts, val_bytes = [], 0
    for f in held:
        if val_bytes > 4 * a.val_tokens:
            break
        val_texts.append(f.text)
        val_bytes += len(f.text.encode())
    val_ids = corpus.tokenize(val_texts, TOKENIZER)[0][: a.val_tokens + 1]
    dt = time.time() - t
    used_bytes = sum(len(f.text.encode()) for f in train[:used])
    log(
        f"tokenized {used}/{len(train)} files, {used_bytes / 1e6:.1f} MB -> {len(train_ids):,} "
        f"tokens ({used_bytes / max(len(train_ids), 1):.2f} B/tok) in {dt:.1f}s "
        f"({used_bytes / 1e6 / max(dt, 1e-9):.1f} MB/s); val {len(val_ids):,} tokens"
    )
    info = {
        **stats.as_dict(),
        "tokenized_files": used,
        "tokenized_bytes": used_bytes,
        "train_tokens": int(len(train_ids)),
        "tokenize_seconds": round(dt, 1),
        "roots": [label for label, _ in roots],
        "stdlib_files": sum(1 for f in train[:used] if f.root == "stdlib"),
    }
    return train_ids, val_ids, info


@torch.no_grad()
def val_loss(model: GPT, val: torch.Tensor, block: int, device: str, amp: bool) -> float | None:
    n = (len(val) - 1) // block
    if n < 1:
        return None
    model.eval()
    x = val[: n * block + 1]
    total = 0.0
    for i in range(0, n, 32):
        rows = torch.stack([x[j * block : (j + 1) * block + 1] for j in range(i, min(n, i + 32))])
        rows = rows.to(device).long()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            logits = model(rows[:, :-1])
        total += F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1), reduction="sum"
        ).item()
    model.train()
    return total / (n * block)


def train(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    log = Logger(a.out)
    log(
        f"python {platform.python_version()} torch {torch.__version__} device {a.device} "
        f"cuda={torch.cuda.is_available()} args {json.dumps(vars(a), default=str)}"
    )
    deadline = T_PROCESS + a.deadline_s
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cuda = a.device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log(f"gpu: {torch.cuda.get_device_name(0)}")
    train_ids, val_ids, data_info = prepare_data(a, log)
    data = torch.from_numpy(train_ids.astype(np.int32)).to(a.device)
    val = torch.from_numpy(val_ids.astype(np.int32))

    shape = GPTShape(8192, a.n_positions, a.n_embd, a.n_layer, a.n_head)
    model = GPT(shape).to(a.device)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model {a.n_layer}L/{a.n_embd}d/{a.n_head}h ctx {a.n_positions}: "
        f"{n_params / 1e6:.2f}M params"
    )
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": a.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=a.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=cuda,
    )
    fwd: Any = model
    if a.compile:
        try:
            fwd = torch.compile(model)
        except Exception as ex:  # noqa: BLE001 - any failure means: train eager
            log(f"torch.compile unavailable ({ex!r}); eager")
    gen = torch.Generator(device=a.device).manual_seed(a.seed)
    offsets = torch.arange(a.block + 1, device=a.device)
    n_windows = len(data) - a.block - 1

    state: dict[str, Any] = {
        "format": "tiny-py-v2",
        "python_version": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "shape": shape_dict(shape),
        "config": hf_config(shape),
        "n_params": n_params,
        "corpus": data_info,
        "val_history": [],
    }
    step, tokens, t_train = 0, 0, time.time()
    budget = max(1.0, min(a.minutes * 60.0, deadline - a.save_margin_s - t_train))
    log(f"training: schedule {budget:.0f}s, deadline in {deadline - time.time():.0f}s")

    def checkpoint(final: bool) -> None:
        el = time.time() - t_train
        vl = val_loss(model, val, a.block, a.device, cuda)
        state.update(
            step=step,
            tokens_seen=tokens,
            train_seconds=round(el, 1),
            final=final,
            tokens_per_s=round(tokens / max(el, 1e-9)),
            epochs=tokens / max(len(data), 1),
            total_seconds=round(time.time() - T_PROCESS, 1),
        )
        state["val_history"].append({"step": step, "val_loss": vl})
        save_sharded(model, a.out, int(a.max_shard_mb * 2**20), {"step": str(step)})
        tmp = a.out / "tmp.training_state.json"
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, a.out / "training_state.json")
        log(f"checkpoint step {step} val_loss {vl} (final={final})")

    last_ckpt = last_log = time.time()
    loss_acc = torch.zeros((), device=a.device)
    n_acc = 0
    model.train()
    try:
        while time.time() < deadline - a.save_margin_s:
            frac = (time.time() - t_train) / budget
            if frac >= 1.0 or (a.max_steps and step >= a.max_steps):
                break
            lr = lr_at(step, frac, a)
            for g in opt.param_groups:
                g["lr"] = lr
            starts = torch.randint(0, n_windows, (a.batch, 1), device=a.device, generator=gen)
            x = data[starts + offsets].long()
            with torch.autocast(device_type=a.device, dtype=torch.bfloat16, enabled=cuda):
                try:
                    logits = fwd(x[:, :-1])
                except Exception as ex:  # noqa: BLE001 - compile errors surface on first call
                    if fwd is model:
                        raise
                    log(f"compiled forward failed ({type(ex).__name__}: {ex}); eager")
                    fwd = model
                    logits = fwd(x[:, :-1])
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tokens += a.batch * a.block
            loss_acc += loss.detach()
            n_acc += 1
            now = time.time()
            if step == 1 or now - last_log >= a.log_every_s:
                el = now - t_train
                log(
                    f"step {step} loss {(loss_acc / n_acc).item():.3f} lr {lr:.2e} "
                    f"tok {tokens / 1e6:.1f}M {tokens / el / 1e3:.0f}k tok/s "
                    f"ep {tokens / len(data):.2f} el {el:.0f}s"
                )
                loss_acc.zero_()
                n_acc = 0
                last_log = now
            if now - last_ckpt >= a.ckpt_every_s:
                checkpoint(final=False)
                last_ckpt = time.time()
    except Exception:  # noqa: BLE001 - save what there is, then fail loudly
        log("training failed:\n" + traceback.format_exc()[-3000:])
        state["error"] = traceback.format_exc()[-3000:]
        if step:
            checkpoint(final=False)
        return 1
    log(f"training done: {step} steps, {tokens / 1e6:.1f}M tokens, {time.time() - t_train:.0f}s")
    checkpoint(final=True)
    log(f"saved; total {time.time() - T_PROCESS:.0f}s since process start")
    return 0


if __name__ == "__main__":
    sys.exit(train(sys.argv[1:]))
