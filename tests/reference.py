"""transformers as the reference model for the backend tests (dev-only: imports torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastpilot.backends.sampling import log_softmax


class Ref:
    """Reference logits, greedy continuations and embeddings from transformers."""

    def __init__(self, hf_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) logits at every position."""
        with self.torch.no_grad():
            return self.model(self.torch.tensor([ids])).logits[0].numpy()

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits after ``ids`` (vocab,)."""
        return self.all_logits(ids)[-1]

    def greedy(
        self, ids: list[int], n: int, ban: int | None = None
    ) -> tuple[list[int], list[float]]:
        """Argmax continuation of ``n`` tokens and each token's logprob (``ban`` gets -inf)."""
        seq, toks, lps = list(ids), [], []
        for _ in range(n):
            x = self.all_logits(seq)[-1].astype(np.float64)
            if ban is not None:
                x[ban] = -np.inf
            lp = log_softmax(x)
            t = int(np.argmax(lp))
            toks.append(t)
            lps.append(float(lp[t]))
            seq.append(t)
        return toks, lps

    def embedding(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids]), output_hidden_states=True)
        return out.hidden_states[-1][0].mean(0).numpy()  # GPT-2/CodeGen: after the final norm
