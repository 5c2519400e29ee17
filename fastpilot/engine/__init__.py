"""The engine: request semantics shared by every backend.

- ``model``     :class:`Model`, the library API (complete/stream/chat/ask/embed/tokenize).
- ``run``       one request in flight: submit, follow, shape; ``CompletionStream``.
- ``batch``     several prompts in one request: all submitted, ``choices[i*n + j]``.
- ``prompt``    tokenization, FIM rendering, context fitting, deadlines.
- ``sequences`` per-sequence state: detokenize, stop strings, logprobs, finish_reason.
- ``detok``, ``stops``, ``chat``  incremental UTF-8, stop matching, chat rendering.
- ``editor_stops``  llama.cpp's ``n_indent`` / ``t_max_predict_ms`` line stops.
- ``params``, ``coerce``  the request's fields (declared once), one reader per type.
- ``sampling``  the shared numpy sampler.

Submodules are imported where used; only ``sampling`` needs numpy.
"""
