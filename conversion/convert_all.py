"""``make convert``: convert every model in ``conversion/models.toml`` that can be had.

For each entry: outputs that already exist with a valid manifest are kept; a local
checkpoint that does not exist yet, or a hub model that is neither cached nor
downloadable, is skipped with one line (the first unreachable hub answer switches
the rest of the run to cache-only, so an offline machine is done in seconds);
anything else that fails is reported and the run goes on.

Exit status: 0 when nothing failed unexpectedly or the local ``tiny-py`` demo model
was converted (so ``make serve`` has something to serve); 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastpilot.errors import ConversionError

__all__ = ["CatalogEntry", "load_catalog", "main"]

CATALOG = Path(__file__).with_name("models.toml")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = "tiny-py"


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    name: str
    source: str
    targets: tuple[str, ...]  # "<format>-<quantization>"
    description: str = ""
    opt_in: bool = False  # converted only when named (--only / make convert MODELS=...)


def load_catalog(path: Path = CATALOG) -> list[CatalogEntry]:
    """Read the model catalog (TOML, ``[models.ENGINE]`` tables), in file order.

    Raises:
        ConversionError: unreadable file or an entry without ``source``.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    from .convert import DEFAULT_TARGETS

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as ex:
        raise ConversionError(f"{path}: cannot read the model catalog ({ex})") from ex
    default = tuple(t.dirname for t in DEFAULT_TARGETS)
    entries = []
    for name, table in (data.get("models") or {}).items():
        if not isinstance(table, dict) or not isinstance(table.get("source"), str):
            raise ConversionError(f'{path}: [models.{name}] needs a source = "..."')
        if not isinstance(table.get("opt_in", False), bool):
            raise ConversionError(f"{path}: [models.{name}] opt_in must be true or false")
        entries.append(
            CatalogEntry(
                name,
                table["source"],
                tuple(table.get("targets", default)),
                str(table.get("description", "")),
                table.get("opt_in", False),
            )
        )
    return entries


def _local_path(source: str) -> Path | None:
    """The checkpoint dir a catalog source names, or None when it is a hub id."""
    from .source import looks_like_path

    for base in (Path.cwd(), REPO_ROOT):
        if (base / source).is_dir():
            return base / source
    return REPO_ROOT / source if looks_like_path(source) else None


def main(argv: Sequence[str] | None = None) -> int:
    """Convert the catalog; print one line per model (and per output); return the status."""
    from .convert import convert, parse_target
    from .source import HubUnreachable

    parser = argparse.ArgumentParser(
        prog="python -m conversion.convert_all",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--catalog", type=Path, default=CATALOG, help="model catalog (TOML)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="output root")
    parser.add_argument(
        "--only",
        action="append",
        metavar="ENGINE",
        help="convert only these (repeat, or separate with commas/spaces); opt-in models "
        "are converted only when named here",
    )
    parser.add_argument("--force", action="store_true", help="rewrite existing outputs")
    args = parser.parse_args(argv)

    try:
        entries = load_catalog(args.catalog)
    except ConversionError as ex:
        print(f"error: {ex.message}", file=sys.stderr)
        return 1
    only = [n for arg in args.only or [] for n in arg.replace(",", " ").split()]
    if only:
        unknown = sorted(set(only) - {e.name for e in entries})
        if unknown:
            print(
                f"error: not in {args.catalog}: {', '.join(unknown)}; "
                f"known: {', '.join(e.name for e in entries)}",
                file=sys.stderr,
            )
            return 1
        entries = [e for e in entries if e.name in only]
    else:
        for entry in entries:
            if entry.opt_in:
                print(f"{entry.name}: skipped: opt-in (make convert MODELS={entry.name})")
        entries = [e for e in entries if not e.opt_in]

    hub_down = False
    converted: list[str] = []
    failed: list[str] = []
    for entry in entries:
        local = _local_path(entry.source)
        if local is not None and not local.is_dir():
            hint = (
                " (train it: python -m conversion.train_tiny_py)"
                if entry.name == DEMO_MODEL
                else ""
            )
            print(f"{entry.name}: skipped: checkpoint {entry.source} does not exist yet{hint}")
            continue
        try:
            targets = [parse_target(*t.split("-", 1)) for t in entry.targets]
            results = convert(
                str(local) if local else entry.source,
                entry.name,
                targets,
                models_dir=args.models_dir,
                force=args.force,
                offline=hub_down,
            )
        except HubUnreachable as ex:
            hub_down = True
            print(f"{entry.name}: skipped: {ex.message}")
            continue
        except ConversionError as ex:
            print(f"{entry.name}: FAILED: {' '.join(ex.message.splitlines())}")
            failed.append(entry.name)
            continue
        except Exception as ex:  # keep going: one broken model must not block the others
            print(f"{entry.name}: FAILED unexpectedly: {type(ex).__name__}: {ex}")
            failed.append(entry.name)
            continue
        converted.append(entry.name)
        for r in results:
            state = "wrote" if r.written else "up to date"
            print(f"{entry.name}: {r.target.dirname}: {state} {r.path}")
    print(
        f"converted: {', '.join(converted) or 'none'}"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 0 if not failed or DEMO_MODEL in converted else 1


if __name__ == "__main__":
    sys.exit(main())
