"""The playground page in a real headless browser (Debian's chromium, driven by Playwright).

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and the
``playwright`` package; Playwright's own browser download is not used.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from fastpilot.app import create_app
from fastpilot.serve import start_in_thread
from fastpilot.settings import Settings
from tests.fakes import FakeBackend
from tests.test_api_support import make_registry

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCRIPT = " world\n\ndef fib(n):\n    return n\n"

pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason="Debian chromium is not installed (apt-get install -y chromium)",
    ),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed"
)


def _serve(settings: Settings):
    registry = make_registry(("fake", FakeBackend(step_delay=0.01)))
    running = start_in_thread(create_app(settings, registry), settings)
    return running, registry


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def test_playground_streams_a_completion(browser):
    running, registry = _serve(Settings(port=0))
    try:
        # bypass_csp: Playwright's wait_for_function evaluates strings, which the
        # page's CSP (no unsafe-eval) forbids; the page itself needs no eval.
        page = browser.new_page(bypass_csp=True)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(running.url + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        assert page.eval_on_selector("#keyrow", "e => e.hidden") is True
        assert not page.is_visible("#keyrow")  # hidden for real, not just flagged
        page.fill("#prompt", "hello")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "40")
        page.wait_for_function(
            "document.querySelector('#tokens').textContent.includes('prompt tokens: 1 /')"
        )
        # Count how many times the generated text grows: a streamed page updates per event.
        page.evaluate(
            """() => { window.updates = 0;
                new MutationObserver(() => window.updates++).observe(
                    document.querySelector('#out'), {subtree: true, characterData: true,
                                                     childList: true}); }"""
        )
        page.click("#run")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')")
        assert page.text_content("#generated") == SCRIPT
        assert page.evaluate("window.updates") > 3
        href = page.eval_on_selector("#getlink", "a => a.href")
        assert "/v1/engines/fake/completions?" in href and "prompt=hello" in href
        with urllib.request.urlopen(href, timeout=30) as resp:
            assert json.load(resp)["choices"][0]["text"] == SCRIPT
        assert errors == []
    finally:
        running.stop()
        registry.close_all()


def test_playground_asks_for_the_key(browser):
    running, registry = _serve(Settings(port=0, api_key=("pg-key",)))
    try:
        page = browser.new_page(bypass_csp=True)
        page.goto(running.url + "/")
        page.wait_for_selector("#keyrow:not([hidden])")
        assert page.is_visible("#keyrow")
        page.fill("#key", "pg-key")
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        page.fill("#prompt", "hello")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "40")
        page.click("#run")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')")
        assert page.text_content("#generated") == SCRIPT
        # The key lives in page memory only.
        assert page.evaluate("localStorage.length + sessionStorage.length") == 0
        assert page.context.cookies() == []
    finally:
        running.stop()
        registry.close_all()


def test_playground_runs_under_its_own_csp(browser):
    running, registry = _serve(Settings(port=0))
    try:
        page = browser.new_page()  # the page's Content-Security-Policy is enforced
        violations: list[str] = []
        page.on(
            "console", lambda m: violations.append(m.text) if "Content Security" in m.text else None
        )
        page.goto(running.url + "/")
        page.wait_for_selector("#model option[value=fake]", state="attached")
        page.fill("#prompt", "hello")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "40")
        page.click("#run")
        page.wait_for_selector("#status:has-text('done')")
        assert page.text_content("#generated") == SCRIPT
        assert violations == []
    finally:
        running.stop()
        registry.close_all()
