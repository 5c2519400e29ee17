"""The tiny test models' cache key: converters key it, the tiny-py training scripts do not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests import fingerprint as fp


def test_converters_key_the_test_models_and_tiny_py_scripts_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tests").mkdir()
    shutil.copy(fp.ROOT / "tests" / "tinymodels.py", tmp_path / "tests")
    (tmp_path / "conversion").mkdir()
    for path in (fp.ROOT / "conversion").glob("*.py"):
        shutil.copy(path, tmp_path / "conversion")
    monkeypatch.setattr(fp, "ROOT", tmp_path)
    before = fp.fingerprint("tinymodels.py")
    for name in ("train_tiny_py.py", "tiny_py_model.py", "tiny_py_train.py"):
        with (tmp_path / "conversion" / name).open("a") as fh:
            fh.write("\n# edited\n")
    assert fp.fingerprint("tinymodels.py") == before
    with (tmp_path / "conversion" / "convert.py").open("a") as fh:
        fh.write("\n# edited\n")
    assert fp.fingerprint("tinymodels.py") != before
