"""The engine: request semantics shared by every backend.

- ``model``     :class:`Model`, the library API (complete/stream/chat/ask/embed/tokenize).
- ``context``   what a request in flight needs of its model (``RunContext``), the counters.
- ``run``       one request in flight: submit, follow, shape; ``CompletionStream``.
- ``batch``     several prompts in one request: all submitted, ``choices[i*n + j]``.
- ``prompt``    tokenization, FIM rendering, context fitting, deadlines.
- ``sequences`` per-sequence state: detokenize, stop strings, logprobs, finish_reason.
- ``detok``, ``stops``, ``chat``  incremental UTF-8, stop matching, chat rendering.
- ``editor_stops``  llama.cpp's ``n_indent`` / ``t_max_predict_ms`` line stops.
- ``params``, ``coerce``  the request's fields (declared once), one reader per type.

Dependencies run one way: api -> engine -> backends; nothing here imports
``fastpilot.api`` (tests/test_imports.py checks it). Submodules are imported
where used. The numpy sampler lives in :mod:`fastpilot.backends.sampling`, so
backends need not import the engine.
"""
