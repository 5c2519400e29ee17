"""The Python half of ``benchmarks/gpu_cuda.sh``: llama.cpp on CUDA, tests and benchmark.

``python -m benchmarks.gpu_cuda check`` imports everything the GPU run needs and loads
llama.cpp through fastpilot's own binding (``LLAMA_CPP_LIB_PATH`` picks the CUDA build),
printing whether that build can offload. ``tiny-models`` builds the tests' tiny models
where ``tests/conftest.py`` looks for them, GGUF only: the fixture would also convert to
CTranslate2, which the GPU machine does not have, and the llama.cpp tests need none of
it. ``bench --out DIR`` runs :mod:`benchmarks.speculative`'s side-by-side measurement
(same prompts, same slots, same greedy streamed 160 tokens, single stream and N clients)
with fastpilot at ``--device cuda`` and llama-server at ``-ngl 99``, the llama-server
being the one built beside the libraries (``--llama-build``), and writes ``bench.md``
(the table) and ``bench.json`` (every row) into ``DIR``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_KEYS = ("gguf-f32", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m")


def check(offload: bool) -> None:
    """Fail loudly unless the run's imports and fastpilot's llama.cpp binding work, and
    (``offload``) unless that build can offload to a GPU."""
    from importlib.metadata import version

    import falcon  # noqa: F401  (imported: what fastpilot serve needs)
    import gguf  # noqa: F401
    import waitress  # noqa: F401

    from fastpilot.backends.llamacpp_native import load_library

    lib = load_library()
    names = ("falcon", "waitress", "gguf", "diskcache")
    print("imported: " + ", ".join(f"{n} {version(n)}" for n in names), flush=True)
    print(f"llama_cpp {lib.__version__} from {Path(lib.__file__).parent}", flush=True)
    print(f"gpu offload: {bool(lib.llama_supports_gpu_offload())}", flush=True)
    print(lib.llama_print_system_info().decode(), flush=True)
    if offload and not lib.llama_supports_gpu_offload():
        raise SystemExit("this llama.cpp build cannot offload to a GPU")


def tiny_models() -> None:
    """Build the tests' tiny models (GGUF only) under the cache path the fixture uses."""
    import os
    import shutil

    from conversion.convert import Target, convert
    from tests import conftest, tinymodels

    setting = os.environ.get("FASTPILOT_TEST_CACHE", "")
    cache = Path(setting) if setting else Path.home() / ".cache" / "fastpilot" / "test-models"
    final = cache / conftest._fingerprint()
    if (final / "DONE").is_file():
        print(f"tiny models already in {final}", flush=True)
        return
    t0 = time.monotonic()
    tmp = cache / ".gpu-build"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = tinymodels.build_tokenizer(tmp / "tokenizer")
    for arch, build in (("gpt2", tinymodels.build_gpt2), ("codegen", tinymodels.build_codegen)):
        hf = build(tok, tmp / f"{arch}-hf")
        targets = [Target(*key.split("-", 1)) for key in TINY_KEYS]
        convert(str(hf), f"tiny-{arch}", targets, out=tmp / arch)
    (tmp / "DONE").write_text("gguf only (benchmarks/gpu_cuda.py)\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    print(f"tiny models built in {final} in {time.monotonic() - t0:.0f}s", flush=True)


def bench(args: argparse.Namespace) -> None:
    """Side-by-side fastpilot (CUDA) and llama-server (-ngl 99) rows, table and JSON."""
    from benchmarks import llama_server_build, speculative

    # server_path() reads BUILD at call time: every user now finds the CUDA build's binary.
    llama_server_build.BUILD = args.llama_build
    if not llama_server_build.server_path().is_file():
        raise SystemExit(f"no llama-server in {args.llama_build}/bin")
    cpu_argv = speculative._argv

    def gpu_argv(contender: str, directory: Path, port: int, a: argparse.Namespace, n: int):
        argv = cpu_argv(contender, directory, port, a, n)
        if contender.startswith("fastpilot"):
            return [*argv, "--device", args.device]
        return [*argv, "-ngl", str(args.ngl)] if args.ngl >= 0 else argv

    speculative._argv = gpu_argv  # measure() looks it up per call
    cpu_round = speculative._round
    seen: set[int] = set()

    def round_and_device(port: int, texts: list[str], tokens: int, fastpilot: bool):
        if fastpilot and port not in seen:  # once per server: where did the model go?
            seen.add(port)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/v1/models")
            for m in json.loads(conn.getresponse().read())["data"]:
                print(f"[gpu] fastpilot {m['id']}: device {m.get('device')}, "
                      f"kernels {m.get('kernels')}", flush=True)  # fmt: skip
            conn.close()
        return cpu_round(port, texts, tokens, fastpilot)

    speculative._round = round_and_device
    t0 = time.monotonic()
    models = speculative.resolve([m for m in args.models.split(",") if m])
    print(f"[gpu] bench models ready in {time.monotonic() - t0:.0f}s: {models}", flush=True)
    margs = argparse.Namespace(
        threads=args.threads,
        tokens=args.tokens,
        repeats=args.repeats,
        draft_max=None,
        prompt_chars=600,
    )
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name, directory in models:
        for n in (int(x) for x in args.clients.split(",")):
            for c in args.contenders.split(","):
                t1 = time.monotonic()
                try:
                    rows.extend(speculative.measure(c, name, Path(directory), margs, n))
                except (RuntimeError, OSError) as ex:
                    print(f"[gpu] {c} on {name} x{n} failed: {ex}", flush=True)
                print(f"[gpu] {c} {name} x{n}: {time.monotonic() - t1:.0f}s", flush=True)
                # Written after every measurement: a run cut short still returns its rows.
                (args.out / "bench.json").write_text(json.dumps(rows, indent=1))
                (args.out / "bench.md").write_text(
                    f"{args.title}\n\n{speculative.table(rows)}\n\n"
                    + "\n".join(speculative.ratios(rows))
                    + "\n"
                )
    print((args.out / "bench.md").read_text(), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--cpu", action="store_true", help="a CPU build is fine (a dry run)")
    sub.add_parser("tiny-models")
    b = sub.add_parser("bench")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--llama-build", type=Path, required=True, help="the CMake build directory")
    b.add_argument("--models", default="gpt2-117m,codegen-350m")
    b.add_argument("--contenders", default="fastpilot-off,llama-server")
    b.add_argument("--clients", default="1,8")
    b.add_argument("--tokens", type=int, default=160)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int, default=4)
    b.add_argument("--device", default="cuda", help="fastpilot serve --device")
    b.add_argument("--ngl", type=int, default=99, help="llama-server -ngl (-1: leave out)")
    b.add_argument("--title", default="fastpilot vs llama-server, CUDA build")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        check(offload=not args.cpu)
    elif args.cmd == "tiny-models":
        tiny_models()
    else:
        bench(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
