"""The engine: request semantics shared by every backend (see :mod:`fastpilot.engine.model`).

Submodules are imported where used; ``fastpilot.engine.sampling`` needs numpy,
the rest is pure Python.
"""
