"""Model files are untrusted: truncated, corrupted or hostile files are refused before native code.

Real converted tiny models (tests/conftest.py) are copied, then damaged in the
ways a download, a disk or an attacker would damage them; :func:`check_model`,
``fastpilot.load`` and ``fastpilot serve`` must refuse each with a message that
names the file and the problem. Hand-built GGUF headers cover the hostile
cases (absurd counts and lengths) that no converter writes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpilot
from fastpilot.errors import ModelFileError
from fastpilot.validate import DigestCache, check_ct2_binary, check_gguf, check_model
from tests.servers import ServeProcess, run_serve

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gguf_dir(tiny_gpt2_models, tmp_path) -> Path:
    out = tmp_path / "gguf-q8_0"
    shutil.copytree(tiny_gpt2_models["gguf-q8_0"], out)
    return out


@pytest.fixture
def ct2_dir(tiny_gpt2_models, tmp_path) -> Path:
    out = tmp_path / "ct2-int8"
    shutil.copytree(tiny_gpt2_models["ct2-int8"], out)
    return out


def refused(path: Path, fmt: str, *, trust: bool = False) -> str:
    with pytest.raises(ModelFileError) as err:
        check_model(path, fmt, trust_unverified=trust, cache=DigestCache())
    return err.value.message


# -- every real conversion passes --------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "codegen"])
def test_every_converted_output_verifies(tiny_models, arch):
    for key, path in tiny_models[arch].items():
        if key == "hf":
            continue
        fmt = key.split("-", 1)[0]
        verified = check_model(path, fmt, cache=DigestCache())
        assert verified.manifest is not None and verified.manifest.format == fmt
        weight = "model.gguf" if fmt == "gguf" else "model.bin"
        assert weight in verified.hashed and "tokenizer.json" in verified.hashed
    summary = check_gguf(tiny_models[arch]["gguf-q8_0"] / "model.gguf")
    assert summary.version == 3 and summary.n_tensors > 10
    # The tensor table accounts for the file up to its last byte.
    assert summary.data_end == summary.file_size


# -- GGUF ----------------------------------------------------------------------------------


def test_truncated_gguf_is_refused_even_when_trusted(gguf_dir):
    f = gguf_dir / "model.gguf"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = refused(gguf_dir, "gguf", trust=True)
    assert "truncated" in msg and str(f) in msg and "tensor" in msg
    f.write_bytes(data[:20])
    assert "too small" in refused(gguf_dir, "gguf", trust=True)
    f.write_bytes(data[:3000])  # cut inside the key/value section
    assert "truncated" in refused(gguf_dir, "gguf", trust=True)


def test_flipped_weight_byte_fails_sha256_unless_trusted(gguf_dir):
    f = gguf_dir / "model.gguf"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's data: the header still parses
    f.write_bytes(bytes(data))
    check_gguf(f)
    msg = refused(gguf_dir, "gguf")
    assert "sha256 does not match" in msg and "model.gguf" in msg
    assert check_model(gguf_dir, "gguf", trust_unverified=True).hashed == ()


def test_missing_manifest_needs_trust(gguf_dir):
    (gguf_dir / "fastpilot.json").unlink()
    msg = refused(gguf_dir, "gguf")
    assert "fastpilot.json" in msg and "--trust-unverified-models" in msg
    assert check_model(gguf_dir, "gguf", trust_unverified=True).manifest is None


def test_manifest_must_match_the_directory(gguf_dir):
    manifest = json.loads((gguf_dir / "fastpilot.json").read_text())
    manifest["format"] = "ct2"
    (gguf_dir / "fastpilot.json").write_text(json.dumps(manifest))
    assert "format 'ct2'" in refused(gguf_dir, "gguf")
    manifest["format"] = "gguf"
    manifest["weights"] = {"other.gguf": "0" * 64}
    (gguf_dir / "fastpilot.json").write_text(json.dumps(manifest))
    assert "lists no sha256 for model.gguf" in refused(gguf_dir, "gguf")
    manifest["weights"] = {"model.gguf": "0" * 64, "../../etc/passwd": "0" * 64}
    (gguf_dir / "fastpilot.json").write_text(json.dumps(manifest))
    assert "listed in fastpilot.json but missing" in refused(gguf_dir, "gguf")
    (gguf_dir / "fastpilot.json").write_text("{not json")
    assert "unreadable manifest" in refused(gguf_dir, "gguf")


def _kv_string(key: str, value: bytes) -> bytes:
    k = key.encode()
    return (
        struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value
    )


def _gguf(
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    kvs: list[bytes] | None = None,
    tensors: list[tuple[str, list[int], int, int]] | None = None,
    data: bytes | None = None,
) -> bytes:
    """A GGUF file: ``tensors`` are (name, dims, ggml type, offset); f32 data follows."""
    kvs = [_kv_string("general.architecture", b"gpt2")] if kvs is None else kvs
    tensors = [("w", [8, 2], 0, 0)] if tensors is None else tensors
    out = magic + struct.pack("<I", version)
    out += struct.pack(
        "<QQ", len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    out += b"".join(kvs)
    for name, dims, ttype, offset in tensors:
        n = name.encode()
        out += struct.pack("<Q", len(n)) + n + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ttype, offset)
    out += b"\0" * (-len(out) % 32)
    return out + (b"\0" * 64 if data is None else data)


HOSTILE = {
    "bad magic": (dict(magic=b"GGML"), "not a GGUF file"),
    "version 1": (dict(version=1), "version 1 is not supported"),
    "version 99": (dict(version=99), "version 99"),
    "2^60 tensors": (dict(n_tensors=1 << 60), "implausible tensor count"),
    "2^40 keys": (dict(n_kv=1 << 40), "implausible key/value count"),
    "string past the end": (
        dict(kvs=[struct.pack("<Q", 4) + b"name" + struct.pack("<IQ", 8, 1 << 62)]),
        "runs past the end",
    ),
    "huge key": (dict(kvs=[struct.pack("<Q", 1 << 20) + b"x" * 64]), "limit"),
    "array of 2^50 strings": (
        dict(kvs=[struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, 8, 1 << 50)]),
        "runs past the end",
    ),
    "unknown value type": (
        dict(kvs=[struct.pack("<Q", 1) + b"a" + struct.pack("<I", 77)]),
        "unknown value type",
    ),
    "5 dimensions": (dict(tensors=[("w", [1, 1, 1, 1, 1], 0, 0)]), "5 dimensions"),
    "unknown tensor type": (dict(tensors=[("w", [8], 999, 0)]), "unknown type 999"),
    "zero dim": (dict(tensors=[("w", [0, 4], 0, 0)]), "impossible shape"),
    "misaligned offset": (dict(tensors=[("w", [8], 0, 3)]), "not 32-aligned"),
    "data past the end": (dict(tensors=[("w", [1024, 1024], 0, 0)]), "needs bytes up to"),
    "offset past the end": (dict(tensors=[("w", [8], 0, 1 << 40)]), "needs bytes up to"),
    "bad alignment": (
        dict(kvs=[struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<II", 4, 3)]),
        "power of two",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_gguf_headers_are_refused(tmp_path, case):
    kwargs, expect = HOSTILE[case]
    f = tmp_path / "model.gguf"
    f.write_bytes(_gguf(**kwargs))
    with pytest.raises(ModelFileError) as err:
        check_gguf(f)
    assert expect in err.value.message and str(f) in err.value.message


def test_hand_built_gguf_is_accepted(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(_gguf())
    assert check_gguf(f).n_tensors == 1


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8))
def test_random_header_corruption_is_only_ever_a_model_file_error(
    tiny_gpt2_models, tmp_path, edits
):
    data = bytearray((tiny_gpt2_models["gguf-q4_k_m"] / "model.gguf").read_bytes())
    for pos, value in edits:
        data[pos] = value
    f = tmp_path / "fuzz.gguf"
    f.write_bytes(bytes(data))
    try:
        check_gguf(f)
    except ModelFileError as ex:
        assert str(f) in ex.message


# -- CTranslate2 --------------------------------------------------------------------------


def test_truncated_ct2_is_refused(ct2_dir):
    f = ct2_dir / "model.bin"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 10])
    assert "truncated" in refused(ct2_dir, "ct2", trust=True)
    f.write_bytes(data + b"junk")
    assert "unexpected bytes" in refused(ct2_dir, "ct2", trust=True)


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_in_place_of_model_bin_is_never_unpickled(ct2_dir, tmp_path):
    marker = tmp_path / "pwned"
    (ct2_dir / "model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    msg = refused(ct2_dir, "ct2", trust=True)
    assert "pickle" in msg and "never loads pickles" in msg
    with pytest.raises(ModelFileError):
        fastpilot.load(ct2_dir, threads=1, trust_unverified=True)
    assert not marker.exists()


def test_ct2_config_and_vocabulary_must_parse(ct2_dir):
    (ct2_dir / "config.json").write_text("[1, 2")
    assert "config.json" in refused(ct2_dir, "ct2", trust=True)
    (ct2_dir / "config.json").write_text("{}")
    (ct2_dir / "vocabulary.json").write_text("[1, 2, 3]")
    assert "list of strings" in refused(ct2_dir, "ct2", trust=True)


def test_ct2_bad_version_and_bad_sizes(ct2_dir):
    f = ct2_dir / "model.bin"
    data = bytearray(f.read_bytes())
    data[0:4] = struct.pack("<I", 7)
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="binary version 7"):
        check_ct2_binary(f)


def _ct2_string(text: str, *, nul: bool = True) -> bytes:
    raw = text.encode() + (b"\0" if nul else b"")
    return struct.pack("<H", len(raw)) + raw


def _ct2_variable(
    name: str, shape: tuple[int, ...], dtype: int = 0, *, nbytes: int | None = None
) -> bytes:
    """One record: name, rank, shape (uint32 each), dtype, byte size, data."""
    count = 1
    for dim in shape:
        count *= dim
    size = count * (4, 1, 2, 4, 2, 2)[dtype] if nbytes is None else nbytes
    return (
        _ct2_string(name)
        + struct.pack("<B", len(shape))
        + b"".join(struct.pack("<I", d) for d in shape)
        + struct.pack("<BI", dtype, size)
        + b"\xab" * size
    )


def _ct2_binary(records: list[bytes], *, count: int | None = None, spec: bytes = b"") -> bytes:
    """A CTranslate2 model.bin of version 6: spec name, revision, variables, no aliases."""
    return (
        struct.pack("<I", 6)
        + (spec or _ct2_string("TransformerDecoderModelSpec"))
        + struct.pack("<I", 1)
        + struct.pack("<I", len(records) if count is None else count)
        + b"".join(records)
        + struct.pack("<I", 0)
    )


GOOD_VARIABLES = [_ct2_variable("w", (2, 3)), _ct2_variable("b", (3,), dtype=4)]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # A size field that disagrees with shape x dtype (2 x 3 float32 is 24 bytes).
        (_ct2_binary([_ct2_variable("w", (2, 3), nbytes=20)]), "20 bytes disagree with its shape"),
        (_ct2_binary([_ct2_variable("w", (2, 3), dtype=1, nbytes=24)]), "disagree with its shape"),
        (_ct2_binary([_ct2_variable("w", (1,) * 9)]), "variable w has rank 9"),
        (_ct2_binary([_ct2_variable("w", (4,), dtype=6, nbytes=4)]), "unknown dtype 6"),
        (_ct2_binary(GOOD_VARIABLES, count=1 << 21), "implausible variable count"),
        # More variables announced than the file could hold (12 bytes each at least).
        (_ct2_binary(GOOD_VARIABLES, count=100), "implausible variable count 100"),
        (_ct2_binary(GOOD_VARIABLES, spec=_ct2_string("Spec", nul=False)), "NUL-terminated"),
    ],
    ids=["size", "size-int8", "rank", "dtype", "count-cap", "count-file", "nul"],
)
def test_ct2_record_checks(tmp_path, data, message):
    f = tmp_path / "model.bin"
    f.write_bytes(_ct2_binary(GOOD_VARIABLES))
    assert check_ct2_binary(f) == 2  # the hand-built layout itself is valid
    f.write_bytes(data)
    with pytest.raises(ModelFileError) as err:
        check_ct2_binary(f)
    assert message in err.value.message and str(f) in err.value.message


def test_ct2_size_check_on_a_real_conversion(ct2_dir):
    f = ct2_dir / "model.bin"
    data = bytearray(f.read_bytes())
    # Walk to the first variable's size field and claim one byte more than its shape.
    pos = 4
    pos += 2 + struct.unpack_from("<H", data, pos)[0] + 4 + 4  # spec name, revision, count
    pos += 2 + struct.unpack_from("<H", data, pos)[0]  # variable name
    rank = data[pos]
    pos += 1 + 4 * rank + 1  # rank, shape, dtype
    (size,) = struct.unpack_from("<I", data, pos)
    struct.pack_into("<I", data, pos, size + 1)
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=f"{size + 1} bytes disagree with its shape"):
        check_ct2_binary(f)


# -- hashing cost and the loader -------------------------------------------------------------


def test_digests_are_memoized_per_unchanged_file(gguf_dir):
    cache = DigestCache()
    check_model(gguf_dir, "gguf", cache=cache)
    assert cache.computed == 2  # model.gguf and tokenizer.json
    check_model(gguf_dir, "gguf", cache=cache)
    assert cache.computed == 2
    st_ = (gguf_dir / "model.gguf").stat()
    os.utime(gguf_dir / "model.gguf", ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))
    check_model(gguf_dir, "gguf", cache=cache)
    assert cache.computed == 3


def test_fastpilot_load_refuses_before_native_code(gguf_dir, monkeypatch):
    f = gguf_dir / "model.gguf"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 4096])
    import fastpilot.backends.llamacpp as llamacpp

    def never(*args, **kwargs):  # the native loader must not even be reached
        raise AssertionError("native code was handed an unverified file")

    monkeypatch.setattr(llamacpp.LlamaCppBackend, "__init__", never)
    with pytest.raises(ModelFileError, match="truncated"):
        fastpilot.load(gguf_dir, threads=1)
    f.write_bytes(data)
    (gguf_dir / "fastpilot.json").unlink()
    with pytest.raises(ModelFileError, match="trust-unverified"):
        fastpilot.load(gguf_dir, threads=1)
    monkeypatch.setenv("FASTPILOT_TRUST_UNVERIFIED_MODELS", "1")
    with pytest.raises(AssertionError, match="native code"):
        fastpilot.load(gguf_dir, threads=1)  # trusted: validation passes, the backend is next


def test_trusted_model_without_manifest_really_loads(gguf_dir):
    (gguf_dir / "fastpilot.json").unlink()
    model = fastpilot.load(gguf_dir, threads=1, trust_unverified=True)
    try:
        out = model.complete(prompt="def", max_tokens=3, temperature=0)
        assert out["usage"]["completion_tokens"] >= 1
    finally:
        model.close()


def test_serve_refuses_a_corrupted_model_with_a_clear_message(gguf_dir):
    f = gguf_dir / "model.gguf"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    out = run_serve(
        ["--model", f"bad={gguf_dir}", "--threads", "1"],
        unset=("FASTPILOT_TRUST_UNVERIFIED_MODELS",),
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "cannot load models" in out.stderr and "sha256 does not match" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_flag_trusts_a_model_without_manifest(gguf_dir):
    (gguf_dir / "fastpilot.json").unlink()
    out = run_serve(
        ["--model", f"plain={gguf_dir}", "--threads", "1"],
        unset=("FASTPILOT_TRUST_UNVERIFIED_MODELS",),
    )
    assert out.returncode == 1 and "--trust-unverified-models" in out.stderr
    with ServeProcess(["--model", f"plain={gguf_dir}", "--threads", "1",
                       "--trust-unverified-models"]) as server:  # fmt: skip
        status, data = server.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 200, data
