"""The command line and the settings it is generated from."""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
import signal
from argparse import Namespace
from pathlib import Path

import pytest

from fastpilot import cli
from fastpilot.serve import discover_models, ordered_specs
from fastpilot.settings import Settings, SettingsError, build_parser, load_settings
from tests.fakes import FakeBackend
from tests.servers import ServeProcess
from tests.test_api_support import serving

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = " world\n\ndef fib(n):\n    return n\n"


# -- settings -----------------------------------------------------------------------------


def test_precedence_cli_over_env_over_default():
    env = {
        "FASTPILOT_PORT": "6000",
        "FASTPILOT_MAX_N": "4",
        "FASTPILOT_API_KEY": "a, b",
        "FASTPILOT_STRICT_MODELS": "true",
        "FASTPILOT_TIMEOUT": "2.5",
    }
    s = load_settings(["--port", "7000", "--no-strict-models"], env)
    assert s.port == 7000  # CLI beats env
    assert s.strict_models is False  # CLI --no-x beats env true
    assert s.max_n == 4 and s.limits.max_n == 4  # env beats default
    assert s.api_key == ("a", "b")  # env lists are comma separated
    assert s.timeout == 2.5
    assert s.host == "127.0.0.1" and s.max_body_bytes == 4 * 1024 * 1024  # defaults
    s = load_settings(["--model", "a=/x", "--model", "b"], {})
    assert s.model == ("a=/x", "b")
    with pytest.raises(SettingsError, match="FASTPILOT_PORT"):
        load_settings([], {"FASTPILOT_PORT": "many"})


# One value per kind of setting that parses from a flag and from the environment alike.
_SAMPLES = {"int": ("7", 7), "float": ("2.5", 2.5), "str": ("somewhere", "somewhere")}


def test_every_field_has_a_flag_with_help_and_env():
    text = build_parser().format_help()
    options = {a.dest: a for a in build_parser()._actions}
    names = [f.name for f in dataclasses.fields(Settings)]
    assert len(names) >= 24  # the settings object was read, not an empty list
    for f in dataclasses.fields(Settings):
        env = "FASTPILOT_" + f.name.upper()
        assert f.name in options, f"no flag for {f.name}"
        flags = [o for o in options[f.name].option_strings if o.startswith("--")]
        assert flags and all(o in text for o in flags), f.name
        assert flags[0] == (f.metadata.get("flag") or "--" + f.name.replace("_", "-")), flags
        assert env in text, env
        assert f.metadata["help"].split()[0] in options[f.name].help, f.name
        # The flag and the variable really set this field.
        kind = f.metadata["kind"]
        if kind == "bool":
            assert getattr(load_settings([flags[0]], {}), f.name) is True, f.name
            assert getattr(load_settings([], {env: "true"}), f.name) is True, f.name
            continue
        if kind == "list":
            raw, want = "a", ("a",)
        else:
            raw, want = _SAMPLES[kind]
        assert getattr(load_settings([flags[0], raw], {}), f.name) == want, f.name
        assert getattr(load_settings([], {env: raw}), f.name) == want, f.name


def test_public_bind_needs_a_key(tmp_path):
    with pytest.raises(SettingsError, match="--api-key"):
        Settings(host="0.0.0.0").check()
    Settings(host="0.0.0.0", insecure_public=True).check()
    Settings(host="0.0.0.0", api_key=("k",)).check()
    Settings(host="::1").check()
    keys = tmp_path / "keys"
    keys.write_text("# comment\n\nk1\n  k2  \n")
    s = Settings(host="192.168.1.5", api_key_file=str(keys))
    s.check()
    assert s.api_keys() == ("k1", "k2")
    with pytest.raises(SettingsError, match="cannot read"):
        Settings(api_key_file=str(tmp_path / "missing")).api_keys()


def test_serve_refuses_public_bind_without_key(capsys):
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without an API key" in err
    assert "--insecure-public" in err


def test_serve_with_nothing_to_serve_fails_clearly(tmp_path, capsys):
    code = cli.main(["serve", "--port", "0", "--models-dir", str(tmp_path / "empty")])
    assert code == 1
    assert "no models to serve" in capsys.readouterr().err


def test_waitress_thread_default_covers_slots():
    assert Settings(slots=4).waitress_thread_count(2) == 16
    assert Settings(waitress_threads=3).waitress_thread_count(5) == 3


# -- model discovery ----------------------------------------------------------------------


def _models_dir(tmp_path: Path, tiny: dict[str, Path]) -> Path:
    root = tmp_path / "models"
    for engine in ("alpha", "tiny-py"):
        (root / engine).mkdir(parents=True)
        for key in ("gguf-q8_0", "ct2-int8"):
            shutil.copytree(tiny[key], root / engine / key)
    (root / "not-a-model").mkdir()
    return root


def test_discovery_defaults_to_tiny_py(tmp_path, tiny_gpt2_models):
    root = _models_dir(tmp_path, tiny_gpt2_models)
    assert discover_models(root) == ["alpha", "tiny-py"]
    specs = ordered_specs(Settings(models_dir=str(root)))
    assert specs[0] == ("tiny-py", "tiny-py")  # the registry's default is the first added
    specs = ordered_specs(Settings(models_dir=str(root), default_model="alpha"))
    assert specs[0][0] == "alpha"
    with pytest.raises(ValueError, match="not among"):
        ordered_specs(Settings(models_dir=str(root), default_model="zzz"))


def test_models_command_lists_format_and_quantization(tmp_path, tiny_gpt2_models):
    root = _models_dir(tmp_path, tiny_gpt2_models)
    out = io.StringIO()
    assert cli.list_models(str(root), out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:5] == ["ENGINE", "ARCH", "FORMAT", "QUANT", "CONTEXT"]
    rows = {tuple(line.split()[:4]) for line in lines[1:]}
    assert ("alpha", "gpt2", "gguf", "q8_0") in rows
    assert ("tiny-py", "gpt2", "ct2", "int8") in rows
    assert len(lines) == 5


# -- complete -----------------------------------------------------------------------------


def _complete_args(**kw) -> Namespace:
    base = {
        "prompt": "hello",
        "model": None,
        "max_tokens": 40,
        "temperature": 0.0,
        "top_p": None,
        "stop": None,
        "seed": None,
        "stream": False,
        "url": None,
        "api_key": None,
        "models_dir": "models",
        "backend": None,
        "device": "cpu",
        "threads": 1,
    }
    base.update(kw)
    return Namespace(**base)


@pytest.fixture
def fake_server():
    with serving(Settings(port=0, api_key=("ck",)), ("fake", FakeBackend())) as running:
        yield running


@pytest.mark.parametrize("stream", [False, True])
def test_complete_against_a_server(fake_server, stream):
    out = io.StringIO()
    args = _complete_args(url=fake_server.url, api_key="ck", stream=stream, stop=["\n\n"])
    assert cli.complete(args, out=out) == 0
    assert out.getvalue() == " world\n"


def test_complete_reports_server_errors(fake_server, capsys):
    args = _complete_args(url=fake_server.url, api_key="wrong")
    assert cli.complete(args, out=io.StringIO()) == 1
    assert "401" in capsys.readouterr().err


def test_complete_in_process_matches_model(tiny_gpt2_models):
    from fastpilot.loader import load

    model = load(tiny_gpt2_models["gguf-q8_0"], threads=1)
    try:
        want = model.complete(prompt="def f", max_tokens=8, temperature=0)["choices"][0]["text"]
    finally:
        model.close()
    for stream in (False, True):
        out = io.StringIO()
        args = _complete_args(
            prompt="def f", model=str(tiny_gpt2_models["gguf-q8_0"]), max_tokens=8, stream=stream
        )
        assert cli.complete(args, out=out) == 0
        assert out.getvalue() == want + "\n"


def test_convert_delegates_to_conversion_cli(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    assert "usage:" in help_text and "fastpilot serve" not in help_text


def test_ctrl_c_exits_zero(tiny_gpt2_models):
    args = ["--threads", "1", "--model", f"tiny={tiny_gpt2_models['gguf-q8_0']}"]
    with ServeProcess(args) as server:
        lines = list(server.lines)
        assert any(re.match(r"loaded tiny: llamacpp", x) for x in lines), lines
        code = server.stop(timeout=30, sig=signal.SIGINT)
        assert code == 0, server.output
        assert "Traceback" not in server.output
