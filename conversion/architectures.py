"""Architecture loaders: a Hugging Face checkpoint -> the canonical :class:`DecoderModel`.

Each supported architecture is one :class:`ArchitectureLoader` subclass that
implements only :meth:`ArchitectureLoader.load` and is registered with
:func:`register`. :func:`loader_for` picks one from config.json and, on a miss,
names every supported architecture.

Every tensor is checked against the shape config.json implies, so a checkpoint
whose weights and config disagree fails with one line naming the tensor instead of
producing a model that loads but talks nonsense.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fastpilot.errors import ConversionError

from .checkpoint import Checkpoint
from .model import Activation, DecoderModel, Hyper, Layer, Linear, Norm
from .progress import bar

if TYPE_CHECKING:
    from .seq2seq import Seq2SeqModel

__all__ = ["ArchitectureLoader", "loader_for", "register", "supported_architectures"]

_ACTIVATIONS = {"gelu_new": Activation.GELU_TANH, "gelu_pytorch_tanh": Activation.GELU_TANH}


class ArchitectureLoader(ABC):
    """Turns one checkpoint family into a :class:`DecoderModel`.

    Subclasses set ``model_type`` (config.json's ``model_type``) and
    ``architectures`` (its ``architectures`` entries) and implement :meth:`load`.
    """

    model_type: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.config = checkpoint.config

    @abstractmethod
    def load(self) -> DecoderModel | Seq2SeqModel:
        """Read and rearrange every tensor; holds the whole model in memory once.

        Decoder-only loaders return a :class:`DecoderModel`; encoder-decoder loaders
        (:mod:`conversion.t5`) a ``Seq2SeqModel``.
        """

    # -- helpers shared by loaders ------------------------------------------------

    def cfg(self, *keys: str, default: Any = None) -> Any:
        """Return the first of ``keys`` present in config.json, else ``default``.

        Raises:
            ConversionError: none present and no default.
        """
        for key in keys:
            if self.config.get(key) is not None:
                return self.config[key]
        if default is None:
            raise ConversionError(f"config.json has no {' / '.join(keys)}")
        return default

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Read ``name`` and check it has ``shape`` (as implied by config.json).

        Raises:
            ConversionError: missing tensor, or a shape that disagrees with config.json.
        """
        weights = self.checkpoint.weights
        if name not in weights.names:
            raise ConversionError(f"{self.checkpoint.directory}: checkpoint has no tensor {name!r}")
        actual = weights.shape(name)
        if actual != shape:
            raise ConversionError(
                f"{self.checkpoint.directory}: tensor {name!r} has shape {actual} but "
                f"config.json implies {shape}"
            )
        return weights.get(name)

    def activation(self) -> Activation:
        name = self.cfg("activation_function", default="gelu_new")
        if name not in _ACTIVATIONS:
            raise ConversionError(
                f"activation_function {name!r} is not supported (supported: {sorted(_ACTIVATIONS)})"
            )
        return _ACTIVATIONS[name]

    def hyper(self, n_head: int, n_embd: int, **extra: Any) -> Hyper:
        """Hyper-parameters read the same way for every GPT-2-family config.json."""
        return Hyper(
            arch=self.model_type,
            n_layer=int(self.cfg("n_layer")),
            n_head=n_head,
            n_embd=n_embd,
            n_ff=int(self.cfg("n_inner", default=4 * n_embd)),
            n_ctx=int(self.cfg("n_positions", "n_ctx")),
            vocab_size=int(self.cfg("vocab_size")),
            layer_norm_eps=float(self.cfg("layer_norm_epsilon", default=1e-5)),
            activation=self.activation(),
            **extra,
        )

    def norm(self, prefix: str, n_embd: int) -> Norm:
        return Norm(
            self.tensor(f"{prefix}.weight", (n_embd,)), self.tensor(f"{prefix}.bias", (n_embd,))
        )


_REGISTRY: dict[str, type[ArchitectureLoader]] = {}


def register(cls: type[ArchitectureLoader]) -> type[ArchitectureLoader]:
    """Class decorator: make ``cls`` the loader for its ``model_type``."""
    _REGISTRY[cls.model_type] = cls
    return cls


def supported_architectures() -> list[str]:
    """Names a user may see, e.g. ``['CodeGenForCausalLM (codegen)', ...]``."""
    return sorted(f"{a} ({m})" for m, cls in _REGISTRY.items() for a in cls.architectures)


def loader_for(checkpoint: Checkpoint) -> ArchitectureLoader:
    """Return the loader for ``checkpoint``, chosen by config.json.

    Raises:
        ConversionError: the architecture is not supported; the message lists those
            that are.
    """
    model_type = checkpoint.config.get("model_type")
    archs = checkpoint.config.get("architectures") or []
    cls = _REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if cls is None:
        by_arch = {a: c for c in _REGISTRY.values() for a in c.architectures}
        cls = next((by_arch[a] for a in archs if a in by_arch), None)
    if cls is None:
        what = ", ".join(archs) if archs else f"model_type {model_type!r}"
        raise ConversionError(
            f"unsupported architecture {what}; supported: {', '.join(supported_architectures())}"
        )
    return cls(checkpoint)


@register
class GPT2Loader(ArchitectureLoader):
    """GPT-2 (all sizes): learned positions, sequential pre-norm blocks, Conv1D weights.

    HF stores GPT-2 projections as Conv1D, ``(in, out)``; they are transposed to the
    canonical ``(out, in)``. ``attn.bias``/``attn.masked_bias`` are causal-mask buffers,
    not weights, and are ignored. A missing ``lm_head.weight`` means it is tied to wte.
    """

    model_type = "gpt2"
    architectures = ("GPT2LMHeadModel",)

    def load(self) -> DecoderModel:
        if self.config.get("scale_attn_by_inverse_layer_idx"):
            raise ConversionError("GPT-2 with scale_attn_by_inverse_layer_idx is not supported")
        if self.config.get("scale_attn_weights") is False:
            raise ConversionError("GPT-2 with scale_attn_weights=false is not supported")
        n_embd = int(self.cfg("n_embd"))
        n_head = int(self.cfg("n_head"))
        if n_embd % n_head:
            raise ConversionError(
                f"config.json: n_embd {n_embd} is not divisible by n_head {n_head}"
            )
        hp = self.hyper(n_head, n_embd)
        # The original gpt2 repos store names without the "transformer." prefix.
        names = self.checkpoint.weights.names
        p = "transformer." if "transformer.wte.weight" in names else ""
        E, F = hp.n_embd, hp.n_ff

        def conv1d(prefix: str, n_in: int, n_out: int) -> Linear:
            # Conv1D: weight (n_in, n_out) -> canonical (n_out, n_in).
            w = self.tensor(f"{prefix}.weight", (n_in, n_out))
            return Linear(np.ascontiguousarray(w.T), self.tensor(f"{prefix}.bias", (n_out,)))

        layers = []
        for i in bar(range(hp.n_layer), desc=f"load {self.model_type}", unit="layer"):
            h = f"{p}h.{i}"
            layers.append(
                Layer(
                    attn_norm=self.norm(f"{h}.ln_1", E),
                    qkv=conv1d(f"{h}.attn.c_attn", E, 3 * E),  # out rows already [q | k | v]
                    attn_out=conv1d(f"{h}.attn.c_proj", E, E),
                    ffn_norm=self.norm(f"{h}.ln_2", E),
                    ffn_up=conv1d(f"{h}.mlp.c_fc", E, F),
                    ffn_down=conv1d(f"{h}.mlp.c_proj", F, E),
                )
            )
        wte = self.tensor(f"{p}wte.weight", (hp.vocab_size, E))
        head = (
            self.tensor("lm_head.weight", (hp.vocab_size, E)) if "lm_head.weight" in names else wte
        )
        return DecoderModel(
            hyper=hp,
            token_embd=wte,
            pos_embd=self.tensor(f"{p}wpe.weight", (hp.n_ctx, E)),
            layers=tuple(layers),
            final_norm=self.norm(f"{p}ln_f", E),
            lm_head=Linear(head, None),
        )


def split_codegen_qkv(w: np.ndarray, mp_num: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split CodeGen's fused ``qkv_proj.weight`` into q, k, v, each ``(E, E)``.

    CodeGen was trained with model parallelism baked into this matrix: the ``3E``
    output rows are ``mp_num`` groups (4 for CodeGen-1, 8 for CodeGen2), each
    ``[q | v | k]`` of ``E / mp_num`` rows (note: v before k), and group g holds heads
    ``g * n_head/mp_num ...``. Concatenating a part over groups therefore yields the
    usual head-major order. Splitting with the wrong ``mp_num`` mixes q, k and v rows
    of different heads; the model still loads but talks nonsense.
    """
    three_e, e = w.shape
    # (3E, E) -> (mp_num, 3 [q, v, k], E / mp_num, E)
    grouped = w.reshape(mp_num, 3, e // mp_num, e)
    q, v, k = (grouped[:, j].reshape(e, e) for j in range(3))
    return q, k, v


def interleaved_to_halves(w: np.ndarray, n_head: int, rotary_dim: int) -> np.ndarray:
    """Reorder q or k rows so interleaved (GPT-J) rotary becomes halves (NeoX) rotary.

    GPT-J rotates pairs ``(2i, 2i+1)`` of each head's first ``rotary_dim`` dims; NeoX
    rotates ``(i, i + rotary_dim/2)`` with the same frequency ``i``. Taking rows
    ``[0, 2, ..., rd-2, 1, 3, ..., rd-1]`` maps one onto the other; rows past
    ``rotary_dim`` stay. q and k get the same permutation, so q.k is unchanged.
    """
    rows, cols = w.shape
    head_dim = rows // n_head
    perm = np.concatenate(
        [np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2), np.arange(rotary_dim, head_dim)]
    )
    # (n_head, head_dim, cols): rows grouped per head, permuted within each head.
    return w.reshape(n_head, head_dim, cols)[:, perm, :].reshape(rows, cols)


@register
class CodeGenLoader(ArchitectureLoader):
    """CodeGen-1 (350M..16B) and CodeGen2 (1B..16B): partial rotary, parallel residual, one norm.

    Each block computes ``x + attn(ln_1(x)) + mlp(ln_1(x))``; attention has no biases;
    the LM head has a bias; the vocabulary may be padded (e.g. 51200 rows for 50295
    tokens in CodeGen-1).

    The two generations share config.json's ``model_type`` and tensor names and differ
    in how ``qkv_proj`` is packed: CodeGen-1 in 4 model-parallel groups, CodeGen2 in 8
    (its TPU-v3 training layout). CodeGen2's config.json is the only one that states
    ``head_dim`` (its own configuration class adds it; transformers' CodeGenConfig has
    no such field), so that key is what tells them apart, as in CTranslate2's loader.
    Telling them apart by the computed head size would not work: CodeGen-6B and
    CodeGen2-7B both have 256-dim heads.
    """

    model_type = "codegen"
    architectures = ("CodeGenForCausalLM",)
    MP_NUM_CODEGEN1 = 4
    MP_NUM_CODEGEN2 = 8

    def generation(self, n_embd: int, n_head: int) -> tuple[str, int]:
        """Return ``(arch name, mp_num)``: ``("codegen", 4)`` or ``("codegen2", 8)``.

        Raises:
            ConversionError: a ``head_dim`` that disagrees with ``n_embd / n_head``.
        """
        stated = self.config.get("head_dim")
        if stated is None:
            return "codegen", self.MP_NUM_CODEGEN1
        if not isinstance(stated, int) or stated * n_head != n_embd:
            raise ConversionError(
                f"config.json: head_dim {stated!r} disagrees with n_embd {n_embd} / n_head {n_head}"
            )
        return "codegen2", self.MP_NUM_CODEGEN2

    def load(self) -> DecoderModel:
        n_embd = int(self.cfg("n_embd"))
        n_head = int(self.cfg("n_head"))
        if n_embd % n_head:
            raise ConversionError(
                f"config.json: n_embd {n_embd} is not divisible by n_head {n_head}"
            )
        arch, mp_num = self.generation(n_embd, n_head)
        if n_head % mp_num:
            raise ConversionError(
                f"config.json: n_head {n_head} must be a multiple of {mp_num} ({arch}'s "
                "qkv_proj holds that many model-parallel groups of whole heads)"
            )
        head_dim = n_embd // n_head
        rotary_dim = int(self.cfg("rotary_dim", default=head_dim))
        if rotary_dim > head_dim or rotary_dim % 2:
            raise ConversionError(
                f"config.json: rotary_dim {rotary_dim} must be even and <= {head_dim}"
            )
        hp = replace(self.hyper(n_head, n_embd, rotary_dim=rotary_dim), arch=arch)
        E, F = hp.n_embd, hp.n_ff
        names = self.checkpoint.weights.names

        def linear(prefix: str, n_in: int, n_out: int, bias: bool = True) -> Linear:
            b = self.tensor(f"{prefix}.bias", (n_out,)) if bias else None
            return Linear(self.tensor(f"{prefix}.weight", (n_out, n_in)), b)

        layers = []
        for i in bar(range(hp.n_layer), desc=f"load {arch}", unit="layer"):
            h = f"transformer.h.{i}"
            q, k, v = split_codegen_qkv(
                self.tensor(f"{h}.attn.qkv_proj.weight", (3 * E, E)), mp_num
            )
            q = interleaved_to_halves(q, n_head, rotary_dim)
            k = interleaved_to_halves(k, n_head, rotary_dim)
            layers.append(
                Layer(
                    attn_norm=self.norm(f"{h}.ln_1", E),
                    qkv=Linear(np.concatenate([q, k, v], axis=0), None),  # (3E, E)
                    attn_out=linear(f"{h}.attn.out_proj", E, E, bias=False),
                    ffn_norm=None,
                    ffn_up=linear(f"{h}.mlp.fc_in", E, F),
                    ffn_down=linear(f"{h}.mlp.fc_out", F, E),
                )
            )
        wte = self.tensor("transformer.wte.weight", (hp.vocab_size, E))
        if "lm_head.weight" in names:
            has_bias = "lm_head.bias" in names
            head = linear("lm_head", E, hp.vocab_size, bias=has_bias)
        else:
            head = Linear(wte, None)
        return DecoderModel(
            hyper=hp,
            token_embd=wte,
            pos_embd=None,
            layers=tuple(layers),
            final_norm=self.norm("transformer.ln_f", E),
            lm_head=head,
        )
