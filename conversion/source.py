"""Resolve a conversion SOURCE (a local directory or a hub id) to a local directory.

A hub id is served from the local Hugging Face cache when the cache already holds
a complete checkpoint, without touching the network. Otherwise the hub is asked
once with a short timeout for the file list, and only what conversion reads is
downloaded (safetensors when the repo has them, else the pickle). When the hub
cannot be reached the caller gets one :class:`ConversionError` line within
seconds, never a long hang or a retry loop.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from fastpilot.errors import ConversionError

from .progress import tqdm_class

__all__ = ["HUB_TIMEOUT_S", "HubUnreachable", "ResolvedSource", "resolve_source"]

HUB_TIMEOUT_S = 5.0  # seconds for the metadata request; a cold hub answers in < 1 s
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
]
_SAFETENSORS = ["*.safetensors", "model.safetensors.index.json"]
_PICKLE = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


class HubUnreachable(ConversionError):
    """A hub id is not cached and the hub cannot be reached (offline, DNS, timeout)."""


@dataclass(frozen=True, slots=True)
class ResolvedSource:
    """A local checkpoint directory plus where it came from (for the manifest)."""

    directory: Path
    source: str  # what the user typed: a hub id, or the absolute directory
    revision: str | None = None  # the hub commit of a cached snapshot


def _complete(directory: Path) -> bool:
    """True when ``directory`` has a config, weights and a tokenizer."""
    has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("pytorch_model*.bin"))
    has_tok = (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file()
    return (directory / "config.json").is_file() and has_weights and has_tok


def _revision_of(snapshot: Path) -> str | None:
    # The cache layout is .../models--org--name/snapshots/<commit>/
    return snapshot.name if snapshot.parent.name == "snapshots" else None


def looks_like_path(source: str) -> bool:
    """A source with a leading ``.``/``/``/``~`` or more than one slash is a path."""
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or os.sep != "/"
        and os.sep in source
    )


def resolve_source(
    source: str, *, timeout: float = HUB_TIMEOUT_S, offline: bool = False
) -> ResolvedSource:
    """Return a local directory holding the checkpoint ``source``.

    Args:
        source: a checkpoint directory, or a hub id such as ``gpt2`` or
            ``Salesforce/codegen-350M-mono``. An existing directory always wins.
        timeout: seconds allowed for the hub's metadata request.
        offline: use the cache only (as with ``HF_HUB_OFFLINE=1``).

    Raises:
        HubUnreachable: a hub id that is not cached while the hub is offline or
            unreachable.
        ConversionError: no such directory, or an unknown/gated hub repo.

    Downloads go to the Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``) and may take
    minutes for large models; progress is shown on a terminal.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{source}: not a directory (expected a Hugging Face checkpoint)")
        return ResolvedSource(path.resolve(), str(path.resolve()))
    if looks_like_path(source) or not _REPO_ID.match(source):
        raise ConversionError(f"{source}: no such directory")
    return _from_hub(source, timeout, offline)


def _from_hub(repo_id: str, timeout: float, offline: bool) -> ResolvedSource:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    everything = ["config.json", *_TOKENIZER_FILES, *_SAFETENSORS, *_PICKLE]
    try:
        cached = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=everything))
        if _complete(cached):
            return ResolvedSource(cached, repo_id, _revision_of(cached))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if offline or constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub is unreachable"
        raise HubUnreachable(
            f"{repo_id}: not in the Hugging Face cache and {why}; "
            "download it on a connected machine or pass a checkpoint directory"
        )
    try:
        info = HfApi().model_info(repo_id, timeout=timeout)
        files = {s.rfilename for s in (info.siblings or [])}
        weights = _SAFETENSORS if any(f.endswith(".safetensors") for f in files) else _PICKLE
        local = Path(
            snapshot_download(
                repo_id,
                revision=info.sha,
                allow_patterns=["config.json", *_TOKENIZER_FILES, *weights],
                etag_timeout=timeout,
                tqdm_class=tqdm_class(),
            )
        )
    except (RepositoryNotFoundError, GatedRepoError) as ex:
        raise ConversionError(
            f"{repo_id}: no such (public) model on the hub ({type(ex).__name__})"
        ) from ex
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as ex:
        raise HubUnreachable(
            f"{repo_id}: not in the Hugging Face cache and the hub at {constants.ENDPOINT} is "
            f"unreachable ({type(ex).__name__}); pass a local checkpoint directory"
        ) from ex
    except Exception as ex:  # httpx transport errors, timeouts: all mean "unreachable"
        raise HubUnreachable(
            f"{repo_id}: not in the Hugging Face cache and the hub at {constants.ENDPOINT} is "
            f"unreachable ({type(ex).__name__}: {ex})"
        ) from ex
    if not _complete(local):
        raise ConversionError(f"{repo_id}: the hub repo lacks config.json, weights or a tokenizer")
    return ResolvedSource(local, repo_id, info.sha)
