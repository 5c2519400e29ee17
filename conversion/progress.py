"""tqdm progress bars that appear on a terminal and stay silent in logs and CI."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["bar", "enabled", "steps", "tqdm_class"]


def enabled() -> bool:
    """Bars only when stderr is a terminal; piped output gets no carriage-return noise."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def bar(
    iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr (disabled off a terminal)."""
    from tqdm.auto import tqdm

    yield from tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        disable=not enabled(),
        leave=False,
        file=sys.stderr,
    )


def steps(desc: str, total: int) -> Any:
    """A manual tqdm bar (call ``.update()``; use as a context manager)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="step", disable=not enabled(), leave=False, file=sys.stderr
    )


def tqdm_class() -> Any:
    """A tqdm class for huggingface_hub downloads, silenced off a terminal."""
    from tqdm.auto import tqdm

    if enabled():
        return tqdm

    class _Silent(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent
