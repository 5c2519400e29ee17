"""The playground's suffix box in a real headless browser (as tests/test_e2e_playground.py).

Needs ``/usr/bin/chromium`` and the ``playwright`` package; skipped otherwise.
"""

from __future__ import annotations

from fastpilot.backends.fim_tokens import FimTokenIds
from fastpilot.settings import Settings
from tests.fakes import FakeBackend
from tests.playground import SCRIPT, fill_greedy_request
from tests.test_api_support import serving

PRE, SUF, MID = 1, 2, 3


def test_suffix_box_fills_in_the_middle(browser):
    fim = FakeBackend(step_delay=0.01)
    fim.fim_tokens = FimTokenIds(pre=PRE, suf=SUF, mid=MID)
    plain = FakeBackend(step_delay=0.01)
    with serving(Settings(port=0), ("coder", fim), ("plain", plain)) as running:
        page = browser.new_page()  # under the page's own CSP
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(running.url + "/")
        page.wait_for_selector("#model option[value=coder]", state="attached")
        assert page.text_content("#model option[value=coder]").endswith(" FIM")
        assert not page.text_content("#model option[value=plain]").endswith(" FIM")
        page.select_option("#model", "coder")
        fill_greedy_request(page, "ab")
        page.fill("#suffix", "cd")
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
