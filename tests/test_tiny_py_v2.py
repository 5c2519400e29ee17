"""tiny-py v2 trainer parts: HF-sharded save parity, corpus hold-out/leak filter, deadline stop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from conversion import tiny_py_corpus as corpus
from conversion import tiny_py_train
from conversion.checkpoint import open_weights
from conversion.tiny_py_finalize import check_shards
from conversion.tiny_py_model import GPT, INDEX_NAME, GPTShape, hf_config, save_sharded

SHAPE = GPTShape(vocab_size=8192, n_positions=64, n_embd=32, n_layer=2, n_head=2)


def test_sharded_save_loads_in_transformers_with_same_logits(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT(SHAPE).eval()
    names = save_sharded(model, tmp_path, max_shard_bytes=530_000, metadata={"step": "7"})
    (tmp_path / "config.json").write_text(json.dumps(hf_config(SHAPE)))
    assert len(names) >= 2
    assert all(len((tmp_path / n).read_bytes()) <= 530_000 + 4096 for n in names)
    assert check_shards(tmp_path)["metadata"]["step"] == "7"
    # The repo's converter reads the same shards, with no lm_head (tied).
    store = open_weights(tmp_path)
    assert "transformer.h.1.attn.c_attn.weight" in store.names
    assert store.shape("transformer.h.1.attn.c_attn.weight") == (32, 96)  # Conv1D layout
    assert not any(n.startswith("lm_head") for n in store.names)

    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.randint(0, SHAPE.vocab_size, (2, 40))
    with torch.no_grad():
        ours = model.half().float()(ids)  # the saved weights are fp16
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_check_shards_rejects_mixed_saves(tmp_path: Path) -> None:
    model = GPT(SHAPE)
    save_sharded(model, tmp_path, max_shard_bytes=200_000, metadata={"step": "1"})
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    save_sharded(model, tmp_path, max_shard_bytes=200_000, metadata={"step": "2"})
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))  # as if killed before the index
    with pytest.raises(ValueError, match="step"):
        check_shards(tmp_path)


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_corpus_holdout_dedup_leaks_and_cap(tmp_path: Path) -> None:
    heldout_text = "".join(f"value_{i} = {i} * 2\n" for i in range(50))
    assert corpus.is_heldout("ast.py")  # a path the v1 rule holds out
    assert not corpus.is_heldout("kept.py")
    _tree(tmp_path / "lib", {"ast.py": "x = 1\n", "kept.py": "y = 2\n", "tests/t.py": "z = 3\n"})
    _tree(
        tmp_path / "site",
        {
            "vendored/copied.py": heldout_text + "extra = 1\n",  # near copy: a leak
            "other/copied.py": "def unrelated():\n    return 0\n",  # same name, other text
            "dup/kept.py": "y = 2\n",  # same content as lib/kept.py
            "big/zz_last.py": "w = 4\n" * 10,
        },
    )
    leak_lines = {"copied.py": [corpus.line_hashes(heldout_text)]}
    train, held, stats = corpus.collect(
        [("stdlib", str(tmp_path / "lib")), ("site", str(tmp_path / "site"))],
        leak_lines,
        max_bytes=10**6,
        log=lambda _: None,
    )
    got = {(f.root, f.relpath) for f in train}
    assert ("stdlib", "kept.py") in got and ("site", "other/copied.py") in got
    assert ("site", "vendored/copied.py") not in got
    assert stats.leaks == ["site:vendored/copied.py"]
    assert [f.relpath for f in held] == ["ast.py"]
    assert stats.duplicates == 1 and not any(f.relpath == "dup/kept.py" for f in train)
    assert not any("tests" in f.relpath for f in train + held)
    capped, _, stats2 = corpus.collect(
        [("stdlib", str(tmp_path / "lib"))], leak_lines, max_bytes=5, log=lambda _: None
    )
    assert capped == [] and stats2.over_cap == 1  # "y = 2\n" is 6 bytes


def test_committed_heldout_lines_cover_the_card_files() -> None:
    data = json.loads(corpus.HELDOUT_LINES.read_text())
    assert len(data["files"]) == 22 and "ast.py" in data["files"]
    assert "_msvccompiler.py" in corpus.load_heldout_lines()


def test_tokenize_stream_and_time_limit() -> None:
    ids, used = corpus.tokenize(["x = 1\n", "y = 2\n"], tiny_py_train.TOKENIZER, chunk=1)
    assert used == 2 and ids[0] == 0 and ids[-1] == 0 and (ids == 0).sum() == 3
    ids, used = corpus.tokenize(["x = 1\n"] * 3, tiny_py_train.TOKENIZER, stop_at=0.0)
    assert used == 0 and list(ids) == [0]


def test_deadline_stops_training_and_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    _tree(src, {f"m{i}.py": f"def f{i}(a, b):\n    return a + b * {i}\n" * 40 for i in range(30)})
    monkeypatch.setattr(corpus, "default_roots", lambda: [("stdlib", str(src))])
    monkeypatch.setattr(tiny_py_train, "T_PROCESS", time.time())
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--out", str(out), "--minutes", "60", "--deadline-s", "8"]
    argv += ["--save-margin-s", "2", "--n-layer", "1", "--n-embd", "32", "--n-head", "2"]
    argv += ["--block", "32", "--batch", "2", "--val-tokens", "64", "--warmup-steps", "2"]
    t0 = time.time()
    assert tiny_py_train.train(argv) == 0
    assert time.time() - t0 < 30  # the 60-minute schedule was cut by the 8 s deadline
    state = json.loads((out / "training_state.json").read_text())
    assert state["final"] and state["step"] > 0 and state["train_seconds"] < 8
    assert check_shards(out)["metadata"]["step"] == str(state["step"])
    assert len(list(out.iterdir())) <= 7  # the GPU machine returns at most 8 files
