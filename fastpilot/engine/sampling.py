"""Engine-level names of the shared NumPy sampler (:mod:`fastpilot.backends.sampling`).

Backends import the sampler from ``fastpilot.backends.sampling`` so that no backend
depends on the engine; this module keeps the engine-level names that library users
and the tests import. Importing it imports numpy.
"""

from __future__ import annotations

from fastpilot.backends.sampling import BAN, SequenceSampler, log_softmax, top_entries

__all__ = ["BAN", "SequenceSampler", "log_softmax", "top_entries"]
