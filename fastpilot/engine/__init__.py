"""The engine: request semantics shared by every backend.

- ``model``     :class:`Model`, the library API (complete/stream/chat/ask/embed/tokenize).
- ``run``       one request in flight: submit, follow, shape; ``CompletionStream``.
- ``prompt``    tokenization, FIM rendering, context fitting, deadlines.
- ``sequences`` per-sequence state: detokenize, stop strings, logprobs, finish_reason.
- ``detok``, ``stops``, ``chat``  incremental UTF-8, stop matching, chat rendering.
- ``params``, ``sampling``  the validated request and the shared numpy sampler.

Submodules are imported where used; only ``sampling`` needs numpy.
"""
