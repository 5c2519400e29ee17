"""What the playground browser tests share: the browser, the fake's script, filling a request.

The ``browser`` fixture (in ``tests/conftest.py``) needs ``/usr/bin/chromium``
(``apt-get install -y chromium``) and the ``playwright`` package; Playwright's
own browser download is not used. A test that asks for it is skipped without them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# FakeBackend's default script, which greedy decoding writes (see tests/fakes.py).
SCRIPT = " world\n\ndef fib(n):\n    return n\n"


@contextmanager
def launch_browser() -> Iterator[Any]:
    """A headless Debian chromium driven by Playwright; skips the test without either."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed"
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def fill_greedy_request(page: Any, prompt: str) -> None:
    """Type ``prompt`` into the page and ask for up to 40 greedy tokens."""
    page.fill("#prompt", prompt)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
