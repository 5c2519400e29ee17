"""GitHub Copilot's language server, unmodified, against a real ``fastpilot serve``.

``@github/copilot-language-server`` (pinned in ``tests/clients/package.json``,
installed by ``npm ci`` there; ``.ci/run`` does it) is what the Copilot
plugins for VS Code, Neovim and JetBrains run. It is started over stdio LSP
with node, a throwaway ``HOME`` and ``GH_COPILOT_TOKEN=<anything>`` plus
``GH_COPILOT_API_URL`` / ``GH_COPILOT_SERVER_URL`` pointing at fastpilot --
through :class:`tests.recorder.Recorder`, which relays every request
unchanged and keeps what fastpilot answered. The test then asks for
``textDocument/inlineCompletion`` and checks that the suggestions the editor
would show are exactly fastpilot's completions for the request the client
sent, with and without an API key (``/k/<key>/``).

Skipped only when ``node`` is missing; CI installs it. A missing
``node_modules`` is a failure that says to run ``npm ci``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.lsp import LspClient
from tests.recorder import Exchange, Recorder
from tests.servers import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "tests" / "clients"
LANGUAGE_SERVER = (
    CLIENTS / "node_modules" / "@github" / "copilot-language-server" / "dist" / "language-server.js"
)
KEY = "copilot-key-42"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")

# A Python file with the cursor at the end of a statement being typed in a function.
DOCUMENT = "import os\n\n\ndef count_lines(path):\n    total =\n"
CURSOR = {"line": 4, "character": 11}
TYPED = DOCUMENT.split("\n")[4][:11]


def language_server_cmd() -> list[str]:
    if not LANGUAGE_SERVER.is_file():
        pytest.fail(f"{LANGUAGE_SERVER} is missing: run `npm ci` in {CLIENTS}")
    return [str(shutil.which("node")), str(LANGUAGE_SERVER), "--stdio"]


@pytest.fixture(scope="module")
def servers(tiny_gpt2_models):
    """fastpilot without keys and with one, each behind its own recorder."""
    model = ["--model", f"tiny={tiny_gpt2_models['gguf-f32']}", "--threads", "1"]
    with (
        ServeProcess(model) as open_server,
        ServeProcess([*model, "--api-key", KEY]) as keyed_server,
        Recorder(open_server.port) as open_rec,
        Recorder(keyed_server.port) as keyed_rec,
    ):
        yield {
            "open": (open_server, open_rec, "/"),
            "keyed": (keyed_server, keyed_rec, f"/k/{KEY}/"),
        }


def start(tmp_path: Path, base_url: str) -> LspClient:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "GH_COPILOT_TOKEN": "not-a-github-token",
        "GH_COPILOT_API_URL": base_url,
        "GH_COPILOT_SERVER_URL": base_url,
    }
    return LspClient(language_server_cmd(), env=env, cwd=tmp_path)


def initialize(lsp: LspClient, project: Path) -> None:
    lsp.request(
        "initialize",
        {
            "processId": os.getpid(),
            "workspaceFolders": [{"uri": project.as_uri(), "name": "project"}],
            "capabilities": {"workspace": {"workspaceFolders": True}},
            "initializationOptions": {
                "editorInfo": {"name": "fastpilot-tests", "version": "1.0"},
                "editorPluginInfo": {"name": "fastpilot-tests", "version": "1.0"},
            },
        },
        timeout=120,
    )
    lsp.notify("initialized", {})
    # What an editor whose user turned telemetry off sends; the client then reports nothing.
    lsp.notify(
        "workspace/didChangeConfiguration", {"settings": {"telemetry": {"telemetryLevel": "off"}}}
    )


def one_file_project(tmp_path: Path, name: str, text: str) -> tuple[Path, Path]:
    """A project folder holding one file ``name`` with ``text``: (folder, file)."""
    project = tmp_path / "project"
    project.mkdir()
    source = project / name
    source.write_text(text)
    return project, source


def open_in_editor(lsp: LspClient, project: Path, source: Path, text: str) -> None:
    """What an editor sends on opening ``source`` in ``project``: initialize, then didOpen."""
    initialize(lsp, project)
    lsp.notify(
        "textDocument/didOpen",
        {
            "textDocument": {
                "uri": source.as_uri(),
                "languageId": "python",
                "version": 1,
                "text": text,
            }
        },
    )


def inline(lsp: LspClient, uri: str, trigger: int) -> list[dict[str, Any]]:
    """``textDocument/inlineCompletion``; trigger 1 = invoked (3 choices), 2 = automatic."""
    result = lsp.request(
        "textDocument/inlineCompletion",
        {
            "textDocument": {"uri": uri, "version": 1},
            "position": CURSOR,
            "context": {"triggerKind": trigger},
            "formattingOptions": {"tabSize": 4, "insertSpaces": True},
        },
        timeout=180,
    )
    return list((result or {}).get("items", []))


def sse_texts(exchange: Exchange) -> dict[int, str]:
    """Each choice's text from a recorded SSE answer, by index."""
    texts: dict[int, str] = {}
    for line in exchange.response.decode("utf-8").split("\n"):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[len("data: ") :]).get("choices", []):
            texts[choice["index"]] = texts.get(choice["index"], "") + choice.get("text", "")
    return texts


def shown(item: dict[str, Any]) -> str:
    """What the editor would insert, as the document would read from the line start."""
    start = item["range"]["start"]
    line = DOCUMENT.split("\n")[start["line"]]
    return line[: start["character"]] + item["insertText"]


def expected_suggestion(choice_text: str) -> str:
    # The line as typed, then fastpilot's text without trailing whitespace (the
    # client drops that); nothing else may differ.
    return TYPED + choice_text.rstrip()


@pytest.mark.parametrize("which", ["open", "keyed"])
def test_inline_completion_is_fastpilots_completion(servers, tmp_path, which):
    server, recorder, prefix = servers[which]
    project, source = one_file_project(tmp_path, "lines.py", DOCUMENT)
    before = len(recorder.exchanges)
    with start(tmp_path, recorder.url + prefix) as lsp:
        open_in_editor(lsp, project, source, DOCUMENT)
        greedy_items = inline(lsp, source.as_uri(), trigger=2)
        sampled_items = inline(lsp, source.as_uri(), trigger=1)
        log = lsp.log()
    exchanges = recorder.exchanges[before:]
    paths = [e.path for e in exchanges]
    # Every GitHub-API call went through the key prefix and got an answer it accepted.
    assert all(p.startswith(prefix) for p in paths), paths
    for needed in ("copilot_internal/v2/token", "copilot_internal/user", "models", "telemetry"):
        hits = [e for e in exchanges if e.path.split("?")[0].endswith(needed)]
        assert hits and all(e.status == 200 for e in hits), (needed, paths)
    # The catalogue named our model, so the client asked for it by name.
    completions = [e for e in exchanges if e.path.endswith("/completions")]
    assert [e.path for e in completions] == [f"{prefix}v1/engines/tiny/completions"] * 2, log
    assert all(e.status == 200 for e in completions)
    greedy, sampled = (json.loads(e.body) for e in completions)
    assert completions[0].headers.get("OpenAI-Intent") == "copilot-ghost"
    assert (greedy["n"], greedy["temperature"]) == (1, 0)
    assert (sampled["n"], sampled["temperature"]) == (3, 0.2)
    assert greedy["stream"] is True and greedy["stop"]
    assert greedy["prompt"].endswith("def count_lines(path):\n" + TYPED)

    # Automatic trigger: temperature 0, one choice. fastpilot's greedy answer to the same
    # body, asked again without streaming, is what the editor shows.
    status, raw = server.request(
        "POST",
        "/v1/engines/tiny/completions",
        {**greedy, "stream": False},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert status == 200, raw
    [direct] = [c["text"] for c in json.loads(raw)["choices"]]
    assert sse_texts(completions[0]) == {0: direct}
    if direct.strip():
        assert [shown(i) for i in greedy_items] == [expected_suggestion(direct)], (
            greedy_items,
            direct,
            log,
        )
    else:  # the client drops whitespace-only suggestions
        assert greedy_items == []

    # Invoked: n=3 at temperature 0.2. Each suggestion is one of the choices fastpilot
    # streamed for that request, or the one the client cached from the automatic trigger
    # at the same position; at least one of the new choices is offered. (Not all of them:
    # the client may drop a choice, e.g. one it finds repetitive.)
    choices = sse_texts(completions[1])
    assert sorted(choices) == [0, 1, 2]
    offered = {expected_suggestion(t) for t in choices.values() if t.strip()}
    cached = {expected_suggestion(direct)} if direct.strip() else set()
    shown_now = {shown(i) for i in sampled_items}
    assert shown_now <= offered | cached, (choices, sampled_items, log)
    assert not offered or shown_now & offered, (choices, sampled_items, log)


# The cursor on an empty line inside a loop body, with deeper code after it: the client
# asks for a multi-line block with trim_by_indentation and next_indent 12.
BLOCK_DOCUMENT = (
    "import os\n\n\ndef count_lines(path):\n    for line in open(path):\n"
    "        \n            total = 1\n"
)
BLOCK_CURSOR = {"line": 5, "character": 8}


def block_cut(text: str, n_indent: int) -> str:
    """``text`` up to the first later line with text indented by fewer than ``n_indent``."""
    lines = text.split("\n")
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() and len(line) - len(line.lstrip(" \t")) < n_indent:
            return "\n".join(lines[:i]) + "\n"
    return text


def test_block_suggestion_ends_where_the_indentation_says(servers, tmp_path):
    server, recorder, prefix = servers["open"]
    project, source = one_file_project(tmp_path, "loop.py", BLOCK_DOCUMENT)
    before = len(recorder.exchanges)
    with start(tmp_path, recorder.url + prefix) as lsp:
        open_in_editor(lsp, project, source, BLOCK_DOCUMENT)
        result = lsp.request(
            "textDocument/inlineCompletion",
            {
                "textDocument": {"uri": source.as_uri(), "version": 1},
                "position": BLOCK_CURSOR,
                "context": {"triggerKind": 2},
                "formattingOptions": {"tabSize": 4, "insertSpaces": True},
            },
            timeout=180,
        )
        log = lsp.log()
    [exchange] = [e for e in recorder.exchanges[before:] if e.path.endswith("/completions")]
    body = json.loads(exchange.body)
    assert body["extra"]["trim_by_indentation"] is True and body["extra"]["next_indent"] == 12
    assert body["temperature"] == 0 and body["n"] == 1

    def ask(extra: dict[str, Any]) -> str:
        status, raw = server.request(
            "POST", "/v1/engines/tiny/completions", {**body, "stream": False, "extra": extra}
        )
        assert status == 200, raw
        return json.loads(raw)["choices"][0]["text"]

    trimmed = ask(body["extra"])
    untrimmed = ask({**body["extra"], "trim_by_indentation": False})
    # The block ends at the first line indented 12 columns or less (next_indent).
    assert trimmed == block_cut(untrimmed, 13)
    assert trimmed != untrimmed, "the tiny model's text never leaves the block here"
    assert sse_texts(exchange) == {0: trimmed}
    items = (result or {}).get("items", [])
    line = BLOCK_DOCUMENT.split("\n")[5]
    shown_text = [line[: i["range"]["start"]["character"]] + i["insertText"] for i in items]
    assert [s.strip() for s in shown_text] == [trimmed.strip()], (items, trimmed, log)
