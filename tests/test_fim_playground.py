"""The playground's suffix box in a real headless browser (as tests/test_e2e_playground.py).

Needs ``/usr/bin/chromium`` and the ``playwright`` package; skipped otherwise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fastpilot.app import create_app
from fastpilot.backends.fim_tokens import FimTokenIds
from fastpilot.serve import start_in_thread
from fastpilot.settings import Settings
from tests.fakes import FakeBackend
from tests.test_api_support import make_registry

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCRIPT = " world\n\ndef fib(n):\n    return n\n"
PRE, SUF, MID = 1, 2, 3

pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason="Debian chromium is not installed (apt-get install -y chromium)",
    ),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed"
)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def test_suffix_box_fills_in_the_middle(browser):
    fim = FakeBackend(step_delay=0.01)
    fim.fim_tokens = FimTokenIds(pre=PRE, suf=SUF, mid=MID)
    plain = FakeBackend(step_delay=0.01)
    registry = make_registry(("coder", fim), ("plain", plain))
    settings = Settings(port=0)
    running = start_in_thread(create_app(settings, registry), settings)
    try:
        page = browser.new_page()  # under the page's own CSP
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(running.url + "/")
        page.wait_for_selector("#model option[value=coder]", state="attached")
        assert page.text_content("#model option[value=coder]").endswith(" FIM")
        assert not page.text_content("#model option[value=plain]").endswith(" FIM")
        page.select_option("#model", "coder")
        page.fill("#prompt", "ab")
        page.fill("#suffix", "cd")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "40")
        page.click("#run")
        page.wait_for_selector("#status:has-text('done')")
        # The suffix went through the engine's FIM layer...
        assert fim.submitted[-1].prompt_ids == [PRE, 97, 98, SUF, 99, 100, MID]
        # ... and the page shows prompt, generated middle and suffix in order.
        assert page.text_content("#generated") == SCRIPT
        assert page.text_content("#out") == "ab" + SCRIPT + "cd"
        assert "ignored" not in page.text_content("#status")
        # A model that cannot infill says so.
        page.select_option("#model", "plain")
        page.click("#run")
        page.wait_for_selector("#status:has-text('done')")
        assert "suffix was ignored" in page.text_content("#status")
        assert errors == []
    finally:
        running.stop()
        registry.close_all()
