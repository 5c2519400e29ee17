"""Dependencies run one way: api -> engine -> backends -> native libraries; no cycles.

Every module of ``fastpilot/`` and ``conversion/`` is parsed (never imported) and
every ``import`` statement in it counted -- at module level, inside functions
(lazy imports) and under ``if TYPE_CHECKING:`` alike, since each is a
dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fastpilot", "conversion")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {
        module_name(p): p
        for package in PACKAGES
        for p in sorted((ROOT / package).rglob("*.py"))
        if "tiny_py" not in p.parts
    }


def imported_names(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """Every module ``path`` imports; ``from pkg import sub`` names ``pkg.sub`` if it is one."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if sub in known else target


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {
        name: {dep for dep in imported_names(name, path, known) if dep != name}
        for name, path in modules.items()
    }


def test_the_walk_sees_every_kind_of_import() -> None:
    """The checks below are only as good as the graph: spot-check known edges."""
    graph = import_graph()
    assert "fastpilot.backends.base" in graph["fastpilot.backends.llamacpp"]  # module level
    assert "fastpilot.validate" in graph["fastpilot.loader"]  # inside a function
    assert "fastpilot.engine.chat" in graph["fastpilot.engine.model"]  # from pkg import sub
    assert "conversion.manifest" in graph["conversion.convert"]  # relative, lazy
    assert "falcon" in graph["fastpilot.app"] and "numpy" in graph["fastpilot.backends.sampling"]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's own modules, as a path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c", "os"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# (importer prefix, forbidden import prefixes, why)
RULES = [
    (
        "fastpilot.backends",
        (
            "fastpilot.engine",
            "fastpilot.api",
            "fastpilot.app",
            "fastpilot.loader",
            "fastpilot.models",
            "fastpilot.serve",
            "fastpilot.cli",
            "fastpilot.settings",
            "falcon",
            "waitress",
        ),
        "backends sit below the engine and know nothing of HTTP",
    ),
    (
        "fastpilot.engine",
        (
            "fastpilot.api",
            "fastpilot.app",
            "fastpilot.serve",
            "fastpilot.cli",
            "fastpilot.loader",
            "falcon",
            "waitress",
        ),
        "the engine is a library: no HTTP layer, no loading",
    ),
    (
        "fastpilot.api",
        (
            "ctranslate2",
            "llama_cpp",
            "fastpilot.backends.ctranslate2",
            "fastpilot.backends.llamacpp",
        ),
        "the API reaches a model only through the engine",
    ),
    (
        "conversion",
        (
            "fastpilot.api",
            "fastpilot.app",
            "fastpilot.engine",
            "fastpilot.backends",
            "fastpilot.loader",
            "fastpilot.serve",
            "fastpilot.models",
        ),
        "conversion shares only errors and the manifest with serving",
    ),
]


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for importer, deps in sorted(graph.items()):
        for prefix, forbidden, why in RULES:
            if within(importer, prefix):
                found += [f"{importer} imports {d} ({why})" for d in deps if within(d, *forbidden)]
        # Serving never imports the converter; only `fastpilot convert` hands over to it.
        if within(importer, "fastpilot") and importer != "fastpilot.cli":
            found += [f"{importer} imports {d} (serving)" for d in deps if within(d, "conversion")]
    return sorted(found)


def test_dependencies_run_one_way() -> None:
    assert violations(import_graph()) == []


@pytest.mark.parametrize(
    ("importer", "dep"),
    [
        ("fastpilot.backends.llamacpp", "fastpilot.engine.run"),
        ("fastpilot.backends.base", "fastpilot.api.errors"),
        ("fastpilot.engine.run", "fastpilot.api.completions"),
        ("fastpilot.engine.model", "falcon"),
        ("fastpilot.api.completions", "llama_cpp"),
        ("fastpilot.validate", "conversion.manifest"),
        ("conversion.convert", "fastpilot.engine.model"),
    ],
)
def test_each_rule_catches_its_violation(importer: str, dep: str) -> None:
    graph = import_graph()
    graph[importer] = graph[importer] | {dep}
    assert any(v.startswith(f"{importer} imports {dep} ") for v in violations(graph))
