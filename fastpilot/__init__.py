"""fastpilot: a fast self-hosted code-completion server and library.

    import fastpilot
    model = fastpilot.load("models/codegen-350M-mono")
    print(model.complete(prompt="def fib(n):", max_tokens=32)["choices"][0]["text"])

Importing the package is cheap: ``load`` and ``Model`` are imported on first
use, and the native libraries only when a model is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "Model", "__version__"]

if TYPE_CHECKING:
    from fastpilot.engine.model import Model
    from fastpilot.loader import load


def __getattr__(name: str) -> Any:
    if name == "load":
        from fastpilot.loader import load

        return load
    if name == "Model":
        from fastpilot.engine.model import Model

        return Model
    raise AttributeError(f"module 'fastpilot' has no attribute {name!r}")
