"""The model catalog: the new entries, and opt-in models converted only when named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.infill_fixtures import t5_models  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def test_repo_catalog_lists_the_new_models() -> None:
    from conversion.convert_all import load_catalog

    entries = {e.name: e for e in load_catalog()}
    expected = {
        "774M": ("gpt2-large", False),
        "1558M": ("gpt2-xl", True),
        "codegen2": ("Salesforce/codegen2-1B", False),
        "codegen2-3.7B": ("Salesforce/codegen2-3_7B", True),
        "codet5-base": ("Salesforce/codet5-base", False),
        "codet5p-220m": ("Salesforce/codet5p-220m", False),
        "codet5p-770m": ("Salesforce/codet5p-770m", False),
    }
    for name, (source, opt_in) in expected.items():
        assert (entries[name].source, entries[name].opt_in) == (source, opt_in), name
    for name in ("codet5-base", "codet5p-220m", "codet5p-770m"):
        assert all(t.startswith("ct2-") for t in entries[name].targets)  # T5: CTranslate2 only


def test_opt_in_models_convert_only_when_named(
    t5_models: dict[str, dict[str, Path]],  # noqa: F811
    tmp_path: Path,
) -> None:
    hf = t5_models["codet5-base"]["hf"]
    catalog = tmp_path / "models.toml"
    catalog.write_text(
        f'[models.small]\nsource = "{hf}"\ntargets = ["ct2-int8"]\n'
        f'[models.big]\nsource = "{hf}"\ntargets = ["ct2-int8"]\nopt_in = true\n'
    )
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    base = [sys.executable, "-m", "conversion.convert_all", "--catalog", str(catalog)]
    models = ["--models-dir", str(tmp_path / "models")]

    def run(*extra: str) -> str:
        proc = subprocess.run(
            [*base, *models, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    out = run()
    assert "small: ct2-int8: wrote" in out
    assert "big: skipped: opt-in (make convert MODELS=big)" in out
    assert not (tmp_path / "models" / "big").exists()
    out = run("--only", "big")  # what `make convert MODELS=big` passes
    assert "big: ct2-int8: wrote" in out and "small:" not in out
    assert (tmp_path / "models" / "big" / "ct2-int8" / "fastpilot.json").is_file()


def test_makefile_passes_models_to_convert_all() -> None:
    proc = subprocess.run(
        ["make", "-n", "convert", "MODELS=1558M codegen2-3.7B", "BIN=bin"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert 'conversion.convert_all --only "1558M codegen2-3.7B"' in proc.stdout
