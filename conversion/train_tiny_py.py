"""Train the built-in demo model ``tiny-py``.

A small GPT-2-architecture code model trained from scratch on the Python
standard library source of the interpreter running this script (PSF licence),
so a fresh, offline machine has something real to serve.

Usage::

    python -m conversion.train_tiny_py --minutes 75 --out conversion/tiny_py/checkpoint

v2 (stdlib + site-packages, 8x384, context 1024, CUDA): ``--device cuda|cpu`` routes to
:mod:`conversion.tiny_py_train`; ``finalize --from DIR`` installs and evaluates its
output (:mod:`conversion.tiny_py_finalize`).

Pipeline:

1. collect ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` (skipping test
   suites, site-packages and large generated files);
2. hold out ~3% of the files, chosen by a hash of their relative path
   (deterministic across runs/machines with the same stdlib);
3. train a byte-level BPE tokenizer (GPT-2 pre-tokenizer regex, ByteLevel
   decoder, ``<|endoftext|>`` = id 0 used as bos/eos/document separator);
4. train a ``transformers.GPT2LMHeadModel`` (tied embeddings) with AdamW,
   linear warmup and a cosine schedule driven by the wall-clock budget,
   checkpointing periodically (atomically) so an interrupted run still leaves
   a usable model;
5. evaluate next-token accuracy / perplexity on the held-out files and print
   greedy sample completions. Metrics are written to ``eval.json``
   next to the checkpoint.

The saved checkpoint stores weights in float16 (``model.safetensors``) with
standard GPT-2 key names (``transformer.wte.weight``, ``transformer.h.N.*`` ...;
``lm_head.weight`` is tied to ``transformer.wte.weight`` and therefore not
stored separately).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

from .tiny_py_corpus import is_heldout, walk_py
from .tiny_py_model import evaluate

EOT = "<|endoftext|>"
SAMPLE_PROMPTS = [
    "def fibonacci(n):",
    "import os\n\ndef list_files(path):",
    "class Stack:\n    def __init__(self):",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data
def collect_files(root: str | None = None) -> list[tuple[str, str]]:
    """Return sorted ``(relpath, text)`` for stdlib ``.py`` files worth training on."""
    root = root or sysconfig.get_paths()["stdlib"]
    return sorted((f.relpath, f.text) for f in walk_py(root, "stdlib"))


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2 pre-tokenization (same regex as llama.cpp's "gpt-2" pre-tokenizer).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],  # -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.token_to_id(EOT) == 0
    return tok


def save_tokenizer(tok, out_dir: Path, model_max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(str(out_dir))
    # Make the directory loadable as GPT2TokenizerFast too.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "GPT2TokenizerFast"
    cfg["add_bos_token"] = False
    cfg["add_prefix_space"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    stm = out_dir / "special_tokens_map.json"
    if not stm.exists():
        stm.write_text(
            json.dumps({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, indent=2) + "\n"
        )
    # Slow-tokenizer style vocab.json + merges.txt (for GGUF converters).
    tok.model.save(str(out_dir))


# -------------------------------------------------------------------------- model
def make_model(vocab_size: int, args):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_inner=4 * args.n_embd,
        activation_function="gelu_new",
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(cfg)


def save_checkpoint(model, tok, out: Path, meta: dict, fp16: bool = True) -> None:
    """Atomically (re)write ``out`` with the current weights + tokenizer."""
    import copy

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    m = copy.deepcopy(model).eval()
    if fp16:
        m = m.half()
    m.config.use_cache = True
    m.save_pretrained(str(tmp), safe_serialization=True)
    save_tokenizer(tok, tmp, model.config.n_positions)
    (tmp / "training_state.json").write_text(json.dumps(meta, indent=2) + "\n")
    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


# --------------------------------------------------------------------------- eval
@torch.no_grad()
def samples(model, tok, max_new_tokens: int = 64) -> list[dict]:
    model.eval()
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        gen = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=0,
        )
        out.append({"prompt": prompt, "completion": tok.decode(gen[0, ids.shape[1] :].tolist())})
    model.train()
    return out


def run_eval(ckpt: Path, eval_files: list[tuple[str, str]], block: int, max_tokens: int) -> dict:
    """Evaluate the *saved* (fp16) checkpoint, upcast to fp32, on the held-out files.

    Reports the whole held-out set and, separately, the held-out set without the
    ``encodings/`` codec tables (highly repetitive generated tables that inflate
    next-token accuracy).
    """
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    model = GPT2LMHeadModel.from_pretrained(str(ckpt), dtype=torch.float32)
    out: dict = {"heldout_file_list": [p for p, _ in eval_files]}
    subsets = {
        "heldout": eval_files,
        "heldout_no_encodings": [(p, t) for p, t in eval_files if not p.startswith("encodings/")],
    }
    for name, fs in subsets.items():
        ids = [0]
        for _, t in fs:
            ids.extend(tok.encode(t).ids)
            ids.append(0)
        ids_t = torch.tensor(ids, dtype=torch.long)
        n_bytes = sum(len(t.encode()) for _, t in fs)
        m = evaluate(model, ids_t, block, max_tokens, n_bytes / len(ids))
        m["files"] = len(fs)
        out[name] = m
        log(f"{name}: " + json.dumps(m))
    out["samples"] = samples(model, tok)
    for s in out["samples"]:
        log(f"sample {s['prompt']!r} ->\n{s['prompt']}{s['completion']}\n" + "-" * 60)
    return out


# -------------------------------------------------------------------------- train
def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    # v2 (GPU-ready, larger corpus) and its post-processing live in sibling modules; the
    # v1 CPU recipe below stays the default so the card's "Reproduce" line still holds.
    if args_in[:1] == ["finalize"]:
        from .tiny_py_finalize import finalize_main

        return finalize_main(args_in[1:])
    if any(a == "--device" or a.startswith("--device=") for a in args_in):
        from .tiny_py_train import train

        return train(args_in)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=75.0, help="wall-clock training budget")
    ap.add_argument("--out", type=Path, default=Path("conversion/tiny_py/checkpoint"))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-positions", type=int, default=512)
    ap.add_argument("--block", type=int, default=512, help="training sequence length")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt-every-min", type=float, default=5.0)
    ap.add_argument("--eval-tokens", type=int, default=150_000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument(
        "--eval-only",
        action="store_true",
        help="skip training; evaluate the checkpoint in --out and (re)write its eval.json",
    )
    args = ap.parse_args(args_in)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t_start = time.time()

    files = collect_files()
    train_files = [(p, t) for p, t in files if not is_heldout(p)]
    eval_files = [(p, t) for p, t in files if is_heldout(p)]
    train_bytes = sum(len(t.encode()) for _, t in train_files)
    eval_bytes = sum(len(t.encode()) for _, t in eval_files)
    log(
        f"python {sys.version.split()[0]} stdlib: {len(files)} files; train {len(train_files)} "
        f"({train_bytes / 1e6:.2f} MB), held-out {len(eval_files)} ({eval_bytes / 1e6:.2f} MB)"
    )
    if args.eval_only:
        eval_path = args.out / "eval.json"
        report = json.loads(eval_path.read_text()) if eval_path.exists() else {}
        report.update(run_eval(args.out, eval_files, args.block, args.eval_tokens))
        eval_path.write_text(json.dumps(report, indent=2) + "\n")
        return 0

    tok = train_tokenizer([t for _, t in train_files], args.vocab_size)
    log(f"tokenizer: vocab {tok.get_vocab_size()}")

    def stream(fs):
        ids = [0]  # leading <|endoftext|> acts as bos
        for _, t in fs:
            ids.extend(tok.encode(t).ids)
            ids.append(0)
        return torch.tensor(ids, dtype=torch.long)

    train_ids = stream(train_files)
    eval_ids = stream(eval_files)
    log(
        f"train tokens {len(train_ids):,} ({train_bytes / len(train_ids):.2f} B/tok); "
        f"held-out tokens {len(eval_ids):,}"
    )

    model = make_model(tok.get_vocab_size(), args)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model: {n_params / 1e6:.2f}M params (tied), "
        f"config {args.n_layer}L/{args.n_embd}d/{args.n_head}h"
    )

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    budget = args.minutes * 60.0
    t0 = time.time()
    last_ckpt = t0
    step, tokens_seen = 0, 0
    ema = None
    n_train = len(train_ids)
    meta_base = {
        "python_version": sys.version.split()[0],
        "train_files": len(train_files),
        "heldout_files": len(eval_files),
        "train_tokens_in_corpus": n_train,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "n_params": n_params,
    }

    def meta(final: bool = False) -> dict:
        return {
            **meta_base,
            "step": step,
            "tokens_seen": tokens_seen,
            "epochs": tokens_seen / n_train,
            "train_seconds": time.time() - t0,
            "final": final,
            "train_loss_ema": ema,
        }

    model.train()
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget:
            break
        frac = elapsed / budget
        if step < args.warmup_steps:
            lr = args.lr * (step + 1) / args.warmup_steps
        else:
            lr = args.lr * (
                args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
            )
        for g in opt.param_groups:
            g["lr"] = lr
        starts = [rng.randrange(0, n_train - args.block - 1) for _ in range(args.batch)]
        x = torch.stack([train_ids[s : s + args.block + 1] for s in starts])
        out = model(x[:, :-1], labels=None)
        loss = torch.nn.functional.cross_entropy(
            out.logits.view(-1, out.logits.size(-1)), x[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += args.batch * args.block
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 20 == 0 or step == 1:
            el = time.time() - t0
            log(
                f"step {step} loss {loss.item():.3f} ema {ema:.3f} lr {lr:.2e} "
                f"tok {tokens_seen:,} ({tokens_seen / el:.0f} tok/s) "
                f"{el / 60:.1f}/{args.minutes:.0f} min"
            )
        if time.time() - last_ckpt >= args.ckpt_every_min * 60:
            save_checkpoint(model, tok, args.out, meta())
            last_ckpt = time.time()
            log(f"checkpoint saved to {args.out} (step {step})")

    train_seconds = time.time() - t0
    log(f"training done: {step} steps, {tokens_seen:,} tokens, {train_seconds / 60:.1f} min")
    final_meta = meta(final=True)
    save_checkpoint(model, tok, args.out, final_meta)
    log(f"final checkpoint saved to {args.out}")

    report = {**final_meta, **run_eval(args.out, eval_files, args.block, args.eval_tokens)}
    report["total_seconds"] = time.time() - t_start
    (args.out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.iterdir())
    log(f"checkpoint size {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
