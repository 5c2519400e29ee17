"""``fastpilot serve | complete | models | convert`` -- a thin command line.

``serve`` flags are generated from :class:`fastpilot.settings.Settings`
(CLI > ``FASTPILOT_*`` env > default). ``complete`` talks to a running server
with ``--url`` (plain ``http.client`` and SSE parsing, so it works with no
extra packages) or loads the model in-process. ``convert`` hands its
arguments to ``conversion.cli.main``. Heavy modules are imported only by the
subcommand that needs them, so ``fastpilot --help`` starts fast.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from fastpilot import settings as settings_mod


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpilot", description="Self-hosted code completion server."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve converted models over HTTP (OpenAI/Copilot API)")
    settings_mod.add_arguments(serve)

    comp = sub.add_parser("complete", help="complete a prompt (against --url, or in-process)")
    comp.add_argument("prompt", help="text to complete ('-' reads stdin)")
    comp.add_argument(
        "--model", help="model/engine name (with --url) or model dir/engine name (in-process)"
    )
    comp.add_argument(
        "--suffix",
        default=None,
        help="text after the cursor: fill in the middle between PROMPT and it "
        "(models that cannot infill ignore it, with a warning)",
    )
    comp.add_argument("--max-tokens", type=int, default=64)
    comp.add_argument("--temperature", type=float, default=0.0)
    comp.add_argument("--top-p", type=float, default=None)
    comp.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    comp.add_argument("--seed", type=int, default=None)
    comp.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    comp.add_argument(
        "--url", help="server base URL, e.g. http://127.0.0.1:5000 (default: in-process)"
    )
    comp.add_argument(
        "--api-key", default=os.environ.get("FASTPILOT_API_KEY"), help="key for --url"
    )
    comp.add_argument("--models-dir", default=os.environ.get("FASTPILOT_MODELS_DIR", "models"))
    comp.add_argument("--backend", default=None)
    comp.add_argument("--device", default="cpu")
    comp.add_argument("--threads", type=int, default=None)

    models = sub.add_parser("models", help="list converted models")
    models.add_argument("--models-dir", default=os.environ.get("FASTPILOT_MODELS_DIR", "models"))
    models.add_argument("--json", action="store_true", help="print JSON")

    conv = sub.add_parser(
        "convert", help="convert a checkpoint (see `fastpilot convert --help`)", add_help=False
    )
    conv.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["convert"]:
        # Everything after `convert` belongs to the converter's own parser (--help included).
        from conversion.cli import main as convert_main

        return int(convert_main(args_list[1:]) or 0)
    args = _parser().parse_args(args_list)
    if args.command == "serve":
        from fastpilot.serve import run

        try:
            settings = settings_mod.load_settings(namespace=args)
        except settings_mod.SettingsError as ex:
            print(f"fastpilot: {ex}", file=sys.stderr)
            return 2
        return run(settings)
    if args.command == "complete":
        return complete(args)
    if args.command == "models":
        return list_models(args.models_dir, as_json=args.json)
    return 2  # unreachable: argparse requires a command


# -- complete --------------------------------------------------------------------------


def _body(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
    }
    if getattr(args, "suffix", None):
        body["suffix"] = args.suffix
    if args.top_p is not None:
        body["top_p"] = args.top_p
    if args.stop:
        body["stop"] = args.stop
    if args.seed is not None:
        body["seed"] = args.seed
    if args.model and args.url:
        body["model"] = args.model
    return body


_SUFFIX_IGNORED = "fastpilot: warning: this model cannot fill in the middle; --suffix was ignored"


def sse_data(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """Decode ``data:`` lines of an SSE body until ``[DONE]``; raise on an error event."""
    for raw in lines:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if "error" in event:
            raise RuntimeError(event["error"].get("message", "server error"))
        yield event


def remote_completion(url: str, body: dict[str, Any], api_key: str | None, out: TextIO) -> int:
    """POST to ``url``/v1/completions and print the text; streams when ``body['stream']``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        print(f"fastpilot: --url must start with http:// or https://, got {url!r}", file=sys.stderr)
        return 2
    conn_cls = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = conn_cls(parts.hostname or "127.0.0.1", parts.port, timeout=600)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    path = parts.path.rstrip("/") + "/v1/completions"
    try:
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        if resp.getheader("x-fastpilot-suffix") == "ignored":
            print(_SUFFIX_IGNORED, file=sys.stderr)
        if resp.status != 200:
            data = resp.read().decode("utf-8", "replace")
            try:
                message = json.loads(data)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = data[:500]
            print(f"fastpilot: server answered {resp.status}: {message}", file=sys.stderr)
            return 1
        if body.get("stream"):
            for event in sse_data(iter(resp.readline, b"")):
                for choice in event.get("choices", []):
                    out.write(choice.get("text", ""))
                    out.flush()
        else:
            out.write(json.loads(resp.read())["choices"][0]["text"])
        out.write("\n")
        return 0
    except (OSError, RuntimeError) as ex:
        print(f"fastpilot: {ex}", file=sys.stderr)
        return 1
    finally:
        conn.close()


def complete(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    body = _body(args, prompt)
    if args.stream:
        body["stream"] = True
    if args.url:
        return remote_completion(args.url, body, args.api_key, out)
    from fastpilot.errors import FastpilotError
    from fastpilot.loader import discover_models, load
    from fastpilot.serve import DEFAULT_MODEL_NAME

    target = args.model
    if target is None:
        found = discover_models(args.models_dir)
        if not found:
            print(
                f"fastpilot: no converted models under {args.models_dir}/; give --model",
                file=sys.stderr,
            )
            return 1
        target = DEFAULT_MODEL_NAME if DEFAULT_MODEL_NAME in found else found[0]
    try:
        model = load(
            target,
            backend=args.backend,
            device=args.device,
            threads=args.threads,
            models_dir=args.models_dir,
        )
    except (FastpilotError, OSError) as ex:
        print(f"fastpilot: cannot load {target}: {ex}", file=sys.stderr)
        return 1
    try:
        if body.get("suffix") and not model.supports_fim:
            print(_SUFFIX_IGNORED, file=sys.stderr)
        if args.stream:
            stream = model.stream(**body)
            try:
                for chunk in stream:
                    for choice in chunk.get("choices", []):
                        out.write(choice.get("text", ""))
                        out.flush()
            finally:
                stream.close()
        else:
            out.write(model.complete(**body)["choices"][0]["text"])
        out.write("\n")
        return 0
    except FastpilotError as ex:
        print(f"fastpilot: {ex}", file=sys.stderr)
        return 1
    finally:
        model.close()


# -- models ----------------------------------------------------------------------------


def _manifests(models_dir: Path) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """(engine, output directory, manifest fields) for every output the loader would find.

    An output without a readable manifest is still listed, with the format from the
    files on disk and ``?`` for the rest (``fastpilot serve`` refuses it unless trusted).
    """
    from fastpilot.errors import ModelFileError
    from fastpilot.loader import detect_format, discover_models, outputs
    from fastpilot.manifest import Manifest

    for engine in discover_models(models_dir):
        for directory in outputs(models_dir / engine):
            try:
                manifest = Manifest.find(directory)
            except ModelFileError:
                manifest = None
            if manifest is None:
                yield engine, directory, {"format": detect_format(directory)}
            else:
                yield engine, directory, manifest.to_json()


def list_models(models_dir: str, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print every converted model under ``models_dir`` with format and quantization."""
    out = out or sys.stdout
    rows = []
    for engine, directory, data in _manifests(Path(models_dir)):
        rows.append(
            {
                "engine": engine,
                "path": str(directory),
                "arch": data.get("arch", "?"),
                "format": data.get("format", "?"),
                "quantization": data.get("quantization", "?"),
                "context_length": data.get("context_length", "?"),
            }
        )
    if as_json:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return 0
    if not rows:
        print(f"no converted models under {models_dir}/ (run `make convert`)", file=out)
        return 0
    header = ("ENGINE", "ARCH", "FORMAT", "QUANT", "CONTEXT", "PATH")
    table = [header] + [
        (
            r["engine"],
            str(r["arch"]),
            str(r["format"]),
            str(r["quantization"]),
            str(r["context_length"]),
            r["path"],
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
