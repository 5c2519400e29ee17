"""``fastpilot convert``: argument parsing and the entry point.

Used two ways, both through :func:`main`:

* ``fastpilot convert ...`` — ``fastpilot/cli.py`` forwards everything after
  ``convert`` (``--help`` included) to :func:`main`;
* ``python -m conversion ...`` — :func:`main` directly.

Exit status: 0 on success, 1 on a conversion error (one ``error:`` line on stderr,
no traceback), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fastpilot.errors import ConversionError, FastpilotError

__all__ = ["build_parser", "main", "run"]

ALL_QUANTIZATIONS = ("float32", "float16", "int8", "int8_float16", "f32", "f16", "q8_0", "q4_k_m")

_DESCRIPTION = """\
Convert a GPT-2 or CodeGen Hugging Face checkpoint (a directory, or a hub id when
the hub is reachable or the model is cached) into CTranslate2 and/or GGUF.
Outputs go to models/ENGINE/<format>-<quantization>/ with a fastpilot.json manifest.
"""

_EPILOG = """\
quantizations: ct2: float32, float16, int8 (default), int8_float16;
gguf: f32, f16, q8_0, q4_k_m (default). --format all writes ct2-int8, gguf-q8_0
and gguf-q4_k_m.

examples:
  fastpilot convert gpt2 --name 117M --format ct2 --quantization int8
  fastpilot convert ./checkpoints/my-model --name mine --format all
"""


def build_parser(prog: str = "fastpilot convert") -> argparse.ArgumentParser:
    """The ``convert`` command's parser (``fastpilot convert`` and ``python -m conversion``)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="checkpoint directory, or a hub id such as gpt2 or Salesforce/codegen-350M-mono",
    )
    parser.add_argument(
        "--name",
        required=True,
        metavar="ENGINE",
        help="engine name the server will use (output under models/ENGINE/)",
    )
    parser.add_argument(
        "--format",
        choices=("ct2", "gguf", "all"),
        default="all",
        help="output format (default: all = ct2 int8 + gguf q8_0 + gguf q4_k_m)",
    )
    parser.add_argument(
        "--quantization",
        choices=ALL_QUANTIZATIONS,
        default=None,
        help="weight type; must suit --format (default: int8 for ct2, q4_k_m for gguf)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output directory (with --format all: the parent of the per-format dirs)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=Path("models"),
        metavar="DIR",
        help="root of converted models (default: ./models)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="rewrite outputs that already exist with a valid manifest",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``convert`` command; print one line per output; return the exit status."""
    from .convert import DEFAULT_TARGETS, convert, parse_target

    try:
        if args.format == "all":
            if args.quantization is not None:
                raise ConversionError(
                    "--format all converts the default set; drop --quantization "
                    "or pick --format ct2/gguf"
                )
            targets = list(DEFAULT_TARGETS)
        else:
            targets = [parse_target(args.format, args.quantization)]
        results = convert(
            args.source,
            args.name,
            targets,
            models_dir=args.models_dir,
            out=args.out,
            force=args.force,
        )
    except (ConversionError, FastpilotError) as ex:
        print(f"error: {' '.join(ex.message.splitlines())}", file=sys.stderr)
        return 1
    except OSError as ex:  # disk full, permission denied: the partial output is gone
        print(f"error: {ex}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; partial outputs were removed", file=sys.stderr)
        return 130
    for r in results:
        state = "wrote" if r.written else "up to date (use --force to rewrite)"
        print(f"{r.target.dirname}: {state} {r.path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run(args)
