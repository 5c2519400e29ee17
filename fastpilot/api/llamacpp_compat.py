"""llama.cpp-server (and vLLM) tokenizer routes and ``/props``, with their field names.

llama.vim / llama.vscode read ``GET /props`` (context size, model, whether the
model can infill); lm-evaluation-harness's remote tokenizer (``tokenizer_backend
=remote``, auto-detected) reads ``GET /tokenizer_info`` and posts to ``/tokenize``
and ``/detokenize`` with vLLM's names. These are adapters over the same
:class:`fastpilot.engine.model.Model` calls as ``/v1/tokenize``; they differ only
in names:

- ``POST /tokenize`` ``{content | prompt, add_special? | add_special_tokens?,
  parse_special?, with_pieces?, model?}`` -> ``{tokens: [id, ...]}`` or, with
  ``with_pieces``, ``{tokens: [{id, piece}]}`` where ``piece`` is the token's
  text, or its bytes as a list of ints when the token is part of a UTF-8
  character.
- ``POST /detokenize`` ``{tokens: [id, ...], model?}`` -> ``{content, prompt}``
  (llama.cpp's name and vLLM's, same text).
- ``GET /tokenizer_info[?model=]`` -> ``{eos_token, bos_token, pad_token,
  model_max_length, ...}`` (vLLM's shape, what lm-eval checks for).
- ``GET /props[?model=]`` -> ``{default_generation_settings: {n_ctx, params},
  total_slots, model_path, model_alias, modalities, infill, build_info, ...}``.

``add_special`` and ``parse_special`` are accepted and checked. The models
served here (GPT-2, CodeGen) add no BOS token -- their GGUF files say
``add_bos_token = false`` and llama.cpp adds none for them either -- and
whether special-token text becomes one token is the model tokenizer's rule,
the same on every route.
"""

from __future__ import annotations

from typing import Any

import falcon

from fastpilot import __version__
from fastpilot.api.resolve import ModelBodyResource, ModelResolver
from fastpilot.engine.params import CompletionRequest
from fastpilot.errors import InvalidRequest


def _flag(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false", param=name)
    return value


def _piece(model: Any, token_id: int) -> str | list[int]:
    """A token's text, or its raw bytes when they are not valid UTF-8 on their own."""
    data = model.backend.token_bytes(token_id)
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


class Tokenize(ModelBodyResource):
    """``POST /tokenize`` with llama.cpp's names (``content`` in, ``tokens`` out)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        data, model = self._body_and_model(req)
        if "content" not in data and "prompt" not in data:
            raise InvalidRequest(
                "send the text to tokenize as 'content' (llama.cpp) or 'prompt' (vLLM)",
                param="content",
            )
        field = "content" if "content" in data else "prompt"
        content = data[field]
        if not isinstance(content, str):
            raise InvalidRequest(f"{field} must be a string: the text to tokenize", param=field)
        _flag(data, "add_special", False)
        _flag(data, "add_special_tokens", False)
        _flag(data, "parse_special", True)
        with_pieces = _flag(data, "with_pieces", False)
        ids = list(model.tokenize(content))
        tokens: list[Any] = (
            [{"id": t, "piece": _piece(model, t)} for t in ids] if with_pieces else ids
        )
        resp.media = {"tokens": tokens}


class Detokenize(ModelBodyResource):
    """``POST /detokenize``: ``{tokens}`` -> ``{content}``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        data, model = self._body_and_model(req)
        ids = data.get("tokens")
        if not isinstance(ids, list):
            raise InvalidRequest("tokens must be a list of token ids", param="tokens")
        text = model.detokenize(ids)
        resp.media = {"content": text, "prompt": text}


class _QueryModelResource:
    """Base of the GET routes that name their model in the query (``?model=``)."""

    def __init__(self, resolver: ModelResolver) -> None:
        self._resolver = resolver

    def _model(self, req: falcon.Request) -> Any:
        """The model asked for (the default without ``?model=``), noted in the access record."""
        model = self._resolver.get(req.get_param("model") or None)
        req.context.record.model = model.name
        return model


class TokenizerInfo(_QueryModelResource):
    """``GET /tokenizer_info``: the special tokens as text, vLLM's shape."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        model = self._model(req)
        eos_ids = sorted(model.backend.eos_token_ids)
        eos = model.token_text(eos_ids[0]) if eos_ids else None
        resp.media = {
            "model": model.name,
            "tokenizer_class": "fastpilot",
            # GPT-2 and CodeGen use one token for all three roles.
            "eos_token": eos,
            "bos_token": eos,
            "pad_token": None,
            "unk_token": eos,
            "model_max_length": model.context_length,
            "vocab_size": model.backend.vocab_size,
        }


class Props(_QueryModelResource):
    """``GET /props``: what llama.cpp's server says about itself, for one model."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        model = self._model(req)
        n_ctx = model.context_length
        defaults = CompletionRequest()
        resp.media = {
            "default_generation_settings": {
                "id": 0,
                "n_ctx": n_ctx,
                "is_processing": False,
                # OpenAI's defaults, which the completion routes apply to an absent field.
                "params": {
                    "n_predict": defaults.max_tokens,
                    "temperature": defaults.temperature,
                    "top_p": defaults.top_p,
                    "top_k": defaults.top_k,
                    "seed": -1,
                    "stop": [],
                    "stream": False,
                },
            },
            "total_slots": 1,
            # The served name, never the file's path: answers do not reveal the disk layout.
            "model_path": model.name,
            "model_alias": model.name,
            "n_ctx": n_ctx,
            "vocab_size": model.backend.vocab_size,
            "infill": model.supports_fim,
            "modalities": {"vision": False, "audio": False},
            "chat_template": "",
            "build_info": f"fastpilot {__version__}",
            "is_sleeping": False,
        }
