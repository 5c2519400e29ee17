"""Install a tiny-py v2 run's output as the tiny-py checkpoint and evaluate it next to v1.

``python -m conversion.train_tiny_py finalize --from DIR`` (DIR: what the training
command wrote under ``$OUT``):

1. checks that every shard belongs to the same save (the step in each shard's
   metadata equals the index's; a run killed mid-save would mix two saves);
2. replaces the weights in ``--to`` (default ``conversion/tiny_py/checkpoint``): old
   ``model*.safetensors`` go, the shards and index come in; ``config.json``,
   ``generation_config.json``, ``training_state.json`` and ``train_log.txt`` are
   written; the tokenizer files stay (v2 keeps v1's tokenizer) with
   ``model_max_length`` raised to the new context;
3. evaluates the new model and the old one (its ``model.safetensors`` and
   ``config.json`` from ``git show REF:...``) with v1's :func:`evaluate` on the same
   22 held-out CPython files, both at 512-token windows (the old model's context) and
   the new one also at its full context, plus greedy and sampled completions;
   writes ``eval.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .tiny_py_corpus import is_heldout, walk_py
from .tiny_py_model import INDEX_NAME, evaluate

OLD_FILES = ("model.safetensors", "config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
PROMPTS = [
    "def fib(n):",
    "import os\nimport sys\n",
    "def fibonacci(n):",
    "import os\n\ndef list_files(path):",
    "class Stack:\n    def __init__(self):",
]


def check_shards(src: Path) -> dict[str, Any]:
    """Return the index; raise ``ValueError`` when shards are missing or from another save."""
    from safetensors import safe_open

    index = json.loads((src / INDEX_NAME).read_text())
    step = index["metadata"].get("step")
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(src / name), framework="pt") as f:
            got = (f.metadata() or {}).get("step")
        if got != step:
            raise ValueError(f"{name} is from step {got}, the index from step {step}")
    return index


def install(src: Path, dest: Path) -> dict[str, Any]:
    """Replace ``dest``'s weights with ``src``'s shards; returns the training state."""
    index = check_shards(src)
    state = json.loads((src / "training_state.json").read_text())
    for old in list(dest.glob("model*.safetensors")) + list(dest.glob(INDEX_NAME)):
        old.unlink()
    for name in sorted(set(index["weight_map"].values())) + [INDEX_NAME]:
        shutil.copyfile(src / name, dest / name)
    if (src / "train_log.txt").exists():
        shutil.copyfile(src / "train_log.txt", dest / "train_log.txt")
    (dest / "config.json").write_text(json.dumps(state["config"], indent=2) + "\n")
    (dest / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": 0}, indent=2) + "\n"
    )
    (dest / "training_state.json").write_text(json.dumps(state, indent=2) + "\n")
    tc_path = dest / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["model_max_length"] = state["config"]["n_positions"]
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    return state


def old_checkpoint(ref: str, tokenizer_dir: Path, tmp: Path) -> Path:
    """The v1 checkpoint at git ``ref`` in ``tmp`` (weights + config from git, same tokenizer)."""
    for name in OLD_FILES:
        blob = subprocess.run(
            ["git", "show", f"{ref}:conversion/tiny_py/checkpoint/{name}"],
            check=True,
            capture_output=True,
        ).stdout
        (tmp / name).write_bytes(blob)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, tmp / name)
    return tmp


@torch.no_grad()
def completions(model: Any, tok: Any, sample: bool, new_tokens: int, seed: int) -> list[dict]:
    out = []
    for prompt in PROMPTS:
        torch.manual_seed(seed)
        ids = torch.tensor([tok.encode(prompt).ids])
        kw: dict[str, Any] = {"do_sample": sample}
        if sample:
            kw.update(temperature=0.8, top_p=0.95, top_k=0)
        gen = model.generate(ids, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=0, **kw)
        out.append({"prompt": prompt, "completion": tok.decode(gen[0, ids.shape[1] :].tolist())})
    return out


def evaluate_dir(
    ckpt: Path, files: list[tuple[str, str]], blocks: list[int], max_tokens: int, new_tokens: int
) -> dict[str, Any]:
    """v1's metrics (both held-out subsets) at each window size, greedy and sampled text."""
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    model = GPT2LMHeadModel.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    subsets = {
        "heldout": files,
        "heldout_no_encodings": [(p, t) for p, t in files if not p.startswith("encodings/")],
    }
    out: dict[str, Any] = {"n_params": sum(p.numel() for p in model.parameters())}
    t_eval = time.time()
    for block in blocks:
        for name, fs in subsets.items():
            ids = [0]
            for _, t in fs:
                ids.extend(tok.encode(t).ids)
                ids.append(0)
            n_bytes = sum(len(t.encode()) for _, t in fs)
            m = evaluate(model, torch.tensor(ids), block, max_tokens, n_bytes / len(ids))
            m["files"] = len(fs)
            out[f"{name}@{block}"] = m
            print(
                f"{ckpt.name} {name}@{block} ({time.time() - t_eval:.0f}s): {json.dumps(m)}",
                flush=True,
            )
    t_eval = time.time()
    out["greedy"] = completions(model, tok, False, new_tokens, 0)
    out["sampled"] = completions(model, tok, True, new_tokens, 1234)
    print(f"{ckpt.name} samples in {time.time() - t_eval:.0f}s", flush=True)
    return out


def finalize_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m conversion.train_tiny_py finalize")
    ap.add_argument("--from", dest="src", type=Path, required=True, help="the run's $OUT")
    ap.add_argument("--to", type=Path, default=Path("conversion/tiny_py/checkpoint"))
    # v2 replaced v1's model.safetensors with shards; 7292bd4 (on main) is the last commit with v1.
    ap.add_argument("--old-ref", default="7292bd4", help="git ref holding the v1 checkpoint")
    ap.add_argument("--eval-tokens", type=int, default=150_000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-old", action="store_true", help="do not evaluate the old model")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    state = install(a.src, a.to)
    stdlib = sysconfig.get_paths()["stdlib"]
    # The v1 trainer's evaluation set: its held-out stdlib files in sorted path order.
    files = sorted((f.relpath, f.text) for f in walk_py(stdlib, "stdlib") if is_heldout(f.relpath))
    print(
        f"installed step {state.get('step')} into {a.to}; {len(files)} held-out files", flush=True
    )
    n_pos = state["config"]["n_positions"]
    report: dict[str, Any] = {
        "training": {k: v for k, v in state.items() if k not in ("config",)},
        "heldout_file_list": [p for p, _ in files],
        "new": evaluate_dir(a.to, files, sorted({512, n_pos}), a.eval_tokens, a.new_tokens),
    }
    if not a.skip_old:
        with tempfile.TemporaryDirectory() as tmp:
            old = old_checkpoint(a.old_ref, a.to, Path(tmp))
            report["old"] = evaluate_dir(old, files, [512], a.eval_tokens, a.new_tokens)
    (a.to / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    for who in ("new", "old"):
        if who in report:
            m = report[who]["heldout_no_encodings@512"]
            print(
                f"{who}: no-encodings@512 acc {m['next_token_accuracy']:.4f} "
                f"ppl {m['perplexity']:.1f}",
                flush=True,
            )
    for s in report["new"]["greedy"]:
        print(f"--- greedy {s['prompt']!r}\n{s['prompt']}{s['completion']}", flush=True)
    return 0
