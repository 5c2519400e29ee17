"""One Manifest type for conversion and serving; one model-discovery rule; read once on load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fastpilot import loader, manifest
from fastpilot.errors import ModelFileError
from fastpilot.manifest import MANIFEST, Manifest, find_gguf


def fields(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "arch": "gpt2",
        "format": "gguf",
        "quantization": "q8_0",
        "context_length": 128,
        "vocab_size": 300,
        "tokenizer": "tokenizer.json",
        "eos_token_ids": [299],
        "weights": {"model.gguf": "ab" * 32},
    }
    return {**base, **overrides}


def test_fields_are_typed_and_unknown_keys_are_kept() -> None:
    fim = {"style": "codegen2", "mask": "<mask_1>", "eot": "<|endoftext|>"}
    m = Manifest.from_json(fields(fim=fim, gguf_arch="gpt2", files={"tokenizer.json": "cd" * 32}))
    assert (m.arch, m.format, m.quantization) == ("gpt2", "gguf", "q8_0")
    assert (m.context_length, m.vocab_size, m.eos_token_ids) == (128, 300, (299,))
    assert m.bos_token_id is None
    assert dict(m.fim or {}) == fim  # carried through unchanged, whatever its style
    assert m.get("gguf_arch") == "gpt2" and m.get("nothing", 7) == 7
    assert m.listed == {"tokenizer.json": "cd" * 32, "model.gguf": "ab" * 32}
    assert m.to_json() == fields(fim=fim, gguf_arch="gpt2", files={"tokenizer.json": "cd" * 32})
    assert (
        Manifest.from_json(fields()).fim is None and dict(Manifest.from_json(fields()).files) == {}
    )
    with pytest.raises(AttributeError):
        m.arch = "codegen"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "not a JSON object"),
        ({k: v for k, v in fields().items() if k != "weights"}, "lacks weights"),
        (fields(context_length="128"), "context_length must be an integer"),
        (fields(context_length=True), "context_length must be an integer"),
        (fields(eos_token_ids=299), "eos_token_ids must be a list"),
        (fields(eos_token_ids=["299"]), "eos_token_ids must be an integer"),
        (fields(arch=None), "arch must be a string"),
        (fields(weights=["model.gguf"]), "weights must be an object"),
        (fields(files={"a": 1}), "files must be an object"),
        (fields(bos_token_id="0"), "bos_token_id must be an integer"),
        (fields(fim="<fim>"), "fim must be an object or null"),
    ],
)
def test_a_malformed_manifest_names_the_field(data: Any, message: str) -> None:
    with pytest.raises(ModelFileError, match=message) as err:
        Manifest.from_json(data, "/m/fastpilot.json")
    assert "/m/fastpilot.json" in err.value.message


def test_read_and_find(tmp_path: Path) -> None:
    assert Manifest.find(tmp_path) is None
    assert Manifest.find(tmp_path / "model.gguf") is None
    with pytest.raises(ModelFileError, match="no fastpilot.json"):
        Manifest.read(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps(fields()))
    assert Manifest.read(tmp_path) == Manifest.find(tmp_path / "model.gguf")
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ModelFileError, match="unreadable manifest"):
        Manifest.find(tmp_path)


def test_conversion_writes_what_serving_reads(tmp_path: Path) -> None:
    from conversion import manifest as conversion_manifest

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "tokenizer.json").write_text("{}")
    spec = {k: v for k, v in fields(fim={"style": "t5-span"}).items() if k != "weights"}
    written = conversion_manifest.write_manifest(tmp_path, spec, ["model.gguf"])
    assert written == Manifest.read(tmp_path) == conversion_manifest.verify(tmp_path)
    assert set(written.files) == {"tokenizer.json"} and set(written.weights) == {"model.gguf"}
    assert conversion_manifest.MANIFEST is MANIFEST  # one file name
    with pytest.raises(ModelFileError, match="context_length"):
        conversion_manifest.write_manifest(tmp_path, {**spec, "context_length": None}, [])


def test_find_gguf(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such model"):
        find_gguf(tmp_path / "absent")
    with pytest.raises(ModelFileError, match="no model.gguf"):
        find_gguf(tmp_path)
    (tmp_path / "only.gguf").write_bytes(b"GGUF")
    assert find_gguf(tmp_path) == tmp_path / "only.gguf"
    (tmp_path / "second.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelFileError, match="2 other .gguf files"):
        find_gguf(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert find_gguf(tmp_path) == tmp_path / "model.gguf"
    assert find_gguf(tmp_path / "second.gguf") == tmp_path / "second.gguf"


# -- discovery ----------------------------------------------------------------------------


def test_one_discovery_rule(tmp_path: Path) -> None:
    def output(*parts: str, weights: str = "model.gguf") -> None:
        d = tmp_path.joinpath(*parts)
        d.mkdir(parents=True)
        (d / weights).write_bytes(b"x")

    output("gpt2", "gguf-q8_0")  # the converter's layout
    output("bare", weights="model.bin")  # an output directly under the models dir
    output("unverified", "ct2-int8", weights="model.bin")  # no manifest: found, refused on load
    output("converting", ".gguf-q8_0.x1y2.tmp")  # the converter's temp dir: not a model yet
    output(".hidden", "gguf-q8_0")
    (tmp_path / "empty" / "notes").mkdir(parents=True)  # a directory, but no weights
    (tmp_path / "empty" / "notes" / "README").write_text("")
    (tmp_path / "stray.gguf").write_bytes(b"x")  # files are not engines
    assert loader.discover_models(tmp_path) == ["bare", "gpt2", "unverified"]
    assert loader.discover_models(tmp_path / "absent") == []
    assert loader.candidates(tmp_path / "converting") == []
    assert loader.outputs(tmp_path / "bare") == [tmp_path / "bare"]
    from fastpilot import serve

    assert serve.discover_models is loader.discover_models  # serve uses the same function


def test_models_command_lists_outputs_without_manifest(tmp_path: Path, capsys) -> None:
    from fastpilot import cli

    d = tmp_path / "solo" / "gguf-q8_0"
    d.mkdir(parents=True)
    (d / "model.gguf").write_bytes(b"x")
    assert cli.list_models(str(tmp_path), as_json=True) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["engine"], row["format"], row["arch"]) == ("solo", "gguf", "?")


# -- read once ----------------------------------------------------------------------------


def test_the_loader_reads_the_manifest_once_and_hands_it_to_the_backend(
    tiny_gpt2_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tiny_gpt2_models["gguf-q8_0"]
    d = shutil.copytree(src, tmp_path / "m" / "gguf-q8_0")
    data = json.loads((d / MANIFEST).read_text())
    data["marker"] = "from-the-loader"
    (d / MANIFEST).write_text(json.dumps(data))
    reads: list[Path] = []
    real = Manifest.read.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Manifest], directory: Any) -> Manifest:
        reads.append(Path(directory))
        return real(cls, directory)

    monkeypatch.setattr(manifest.Manifest, "read", classmethod(counting))
    model = loader.load(d, backend="llamacpp", threads=1, slots=1)
    try:
        assert reads == [d]
        assert model.info.extra["manifest"]["marker"] == "from-the-loader"
        assert model.backend.eos_token_ids >= set(data["eos_token_ids"])
    finally:
        model.close()
