"""``/openapi.json`` describes exactly the routes the app has (Falcon's router is the truth).

The route table is read from the compiled router itself, so a route added to
``create_app`` without a line in :mod:`fastpilot.api.openapi` (or removed from
one and not the other) fails here. Responses of a real app are checked against
the document's schemas with ``jsonschema_rs`` (installed with schemathesis).
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import falcon
import pytest

from fastpilot.api.openapi import build_document
from fastpilot.settings import Settings
from tests.test_api_support import client

HTTP_METHODS = ("get", "post", "put", "patch", "delete", "head", "options", "trace")


def app_routes(app: falcon.App) -> dict[str, set[str]]:
    """{URI template: methods with a responder the app defined}, from the compiled router.

    Falcon fills every other method with a default 405 responder and OPTIONS
    with a default responder: those are plain functions, not ``on_*`` methods
    of the resource, so they are left out.
    """
    routes: dict[str, set[str]] = {}

    def walk(nodes: list[Any]) -> None:
        for node in nodes:
            if node.method_map:
                methods = {
                    method.lower()
                    for method, responder in node.method_map.items()
                    if inspect.ismethod(responder)
                    and responder.__self__ is node.resource
                    and responder.__name__.startswith("on_")
                }
                routes[node.uri_template] = methods
            walk(node.children)

    walk(app._router._roots)
    return routes


@pytest.fixture(scope="module")
def api():
    c, backend, registry = client(Settings())
    yield c
    registry.close_all()


def test_every_route_is_documented_and_nothing_else(api):
    routes = app_routes(api.app)
    assert len(routes) >= 17 and "/v1/completions" in routes  # the walk found the table
    doc = build_document()
    documented = {path: {m for m in ops if m in HTTP_METHODS} for path, ops in doc["paths"].items()}
    assert documented == routes


def test_document_served_is_openapi_31_and_self_consistent(api):
    resp = api.simulate_get("/openapi.json")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
    doc = resp.json
    assert doc["openapi"].startswith("3.1") and doc == build_document()
    schemas = doc["components"]["schemas"]
    text = json.dumps(doc)
    # Every $ref resolves; every path parameter is declared.
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas
    for path, ops in doc["paths"].items():
        names = {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
        for op in ops.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == names, path
            assert "default" in op["responses"] and "200" in op["responses"]


def _validator(doc: dict[str, Any], name: str):
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    # The component plus the components, so "#/components/schemas/..." refs resolve.
    return jsonschema_rs.validator_for(
        {**doc["components"]["schemas"][name], "components": doc["components"]}
    )


def test_real_responses_match_their_schemas(api):
    doc = build_document()
    checks = [
        ("post", "/v1/completions", {"prompt": "hello", "max_tokens": 4}, "Completion"),
        ("post", "/v1/engines/x/completions", {"prompt": "hello", "max_tokens": 4}, "Completion"),
        ("get", "/v1/models", None, "ModelList"),
        ("get", "/v1/engines", None, "ModelList"),
        ("get", "/v1/models/fake", None, "Model"),
        ("post", "/v1/tokenize", {"prompt": "hello"}, "Tokenized"),
        ("post", "/v1/detokenize", {"tokens": [104, 105]}, "Detokenized"),
        ("post", "/v1/embeddings", {"input": ["a", "b"]}, "Embeddings"),
        ("post", "/ask", {"messages": [{"role": "user", "content": "hi"}]}, "AskReply"),
        ("post", "/v1/completions", {"prompt": "x", "n": 999}, "Error"),
        ("get", "/v1/nothing", None, "Error"),
        ("put", "/v1/completions", {}, "Error"),
        ("get", "/v1/models/nope", None, "Error"),
    ]
    for method, path, body, schema in checks:
        resp = api.simulate_request(method.upper(), path, json=body)
        assert (resp.status_code == 200) == (schema != "Error"), (path, resp.text)
        validator = _validator(doc, schema)
        errors = [str(e) for e in validator.iter_errors(resp.json)]
        assert not errors, (path, errors)
    # The validators do reject what does not fit.
    assert not _validator(doc, "Error").is_valid({"error": {"message": "x"}})
    assert not _validator(doc, "Completion").is_valid(
        {"id": "x", "object": "t", "created": 1, "model": "m", "choices": []}
    )


class RecordingBody(dict):
    """A request body that records every key the parser looks up."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def test_schema_and_parser_list_the_same_fields():
    from fastpilot.engine.params import CompletionRequest

    body = RecordingBody({"prompt": "x"})
    CompletionRequest.from_dict(body)
    doc = build_document()
    documented = set(doc["components"]["schemas"]["CompletionRequest"]["properties"])
    # "model" is read by the resolver before the parser runs; everything else by the parser.
    assert documented - {"model"} == body.read
    assert {"n_indent", "t_max_predict_ms", "extra", "stop", "truncate"} <= body.read
    # The GET form documents the same names as query parameters.
    for path in ("/v1/completions", "/v1/engines/{engine}/completions"):
        params = doc["paths"][path]["get"]["parameters"]
        assert {p["name"] for p in params if p["in"] == "query"} == documented
    chat = set(doc["components"]["schemas"]["ChatRequest"]["properties"])
    assert documented - chat == {"prompt", "suffix", "echo", "best_of"}
    assert chat - documented == {"messages", "max_completion_tokens", "top_logprobs"}


@pytest.mark.parametrize("schema", ["CompletionRequest", "ChatRequest"])
def test_every_documented_field_is_read_and_named_in_its_error(api, schema):
    """A value no field accepts is refused naming each documented field: the parser reads it."""
    doc = build_document()
    names = set(doc["components"]["schemas"][schema]["properties"])
    path = "/v1/completions" if schema == "CompletionRequest" else "/v1/chat/completions"
    base: dict[str, Any] = {"prompt": "x"}
    if schema == "ChatRequest":
        base = {"messages": [{"role": "user", "content": "x"}]}
    # extra is Copilot's own object: a non-object is ignored, not refused.
    for name in sorted(names - {"extra"}):
        r = api.simulate_post(path, json={**base, name: [[[]]]})
        assert r.status_code == 400, (name, r.text)
        assert r.json["error"]["param"] == name, (name, r.json)
