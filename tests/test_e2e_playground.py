"""The playground page in a real headless browser (Debian's chromium, driven by Playwright).

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and the
``playwright`` package; Playwright's own browser download is not used.
"""

from __future__ import annotations

import json
import urllib.request
from contextlib import AbstractContextManager

from fastpilot.serve import RunningServer
from fastpilot.settings import Settings
from tests.fakes import FakeBackend
from tests.playground import SCRIPT, fill_greedy_request
from tests.test_api_support import serving


def _serve(settings: Settings) -> AbstractContextManager[RunningServer]:
    return serving(settings, ("fake", FakeBackend(step_delay=0.01)))


def test_playground_streams_a_completion(browser):
    with _serve(Settings(port=0)) as running:
        # bypass_csp: Playwright's wait_for_function evaluates strings, which the
        # page's CSP (no unsafe-eval) forbids; the page itself needs no eval.
        page = browser.new_page(bypass_csp=True)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(running.url + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        assert page.eval_on_selector("#keyrow", "e => e.hidden") is True
        assert not page.is_visible("#keyrow")  # hidden for real, not just flagged
        fill_greedy_request(page, "hello")
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


def test_playground_asks_for_the_key(browser):
    with _serve(Settings(port=0, api_key=("pg-key",))) as running:
        page = browser.new_page(bypass_csp=True)
        page.goto(running.url + "/")
        page.wait_for_selector("#keyrow:not([hidden])")
        assert page.is_visible("#keyrow")
        page.fill("#key", "pg-key")
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        fill_greedy_request(page, "hello")
        page.click("#run")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')")
        assert page.text_content("#generated") == SCRIPT
        # The key lives in page memory only.
        assert page.evaluate("localStorage.length + sessionStorage.length") == 0
        assert page.context.cookies() == []


def test_playground_runs_under_its_own_csp(browser):
    with _serve(Settings(port=0)) as running:
        page = browser.new_page()  # the page's Content-Security-Policy is enforced
        violations: list[str] = []
        page.on(
            "console", lambda m: violations.append(m.text) if "Content Security" in m.text else None
        )
        page.goto(running.url + "/")
        page.wait_for_selector("#model option[value=fake]", state="attached")
        fill_greedy_request(page, "hello")
        page.click("#run")
        page.wait_for_selector("#status:has-text('done')")
        assert page.text_content("#generated") == SCRIPT
        assert violations == []
