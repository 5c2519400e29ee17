"""Build (once) llama.cpp's native ``llama-server`` from the llama-cpp-python sdist.

The peer must run the same llama.cpp as fastpilot's llamacpp backend, so it is compiled
from the vendored tree of the exact llama-cpp-python release the venv uses, with the
same CPU flags (``GGML_NATIVE=ON``, AMX compiled out as the Makefile does), in
``~/.cache/fastpilot/llama-server`` (outside the repository), and reused by every later
run. The build takes tens of minutes on two cores; it runs at low priority (``nice``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

__all__ = ["LLAMA_CPP_VERSION", "ensure_llama_server", "server_path"]

LLAMA_CPP_VERSION = "0.3.36"
ROOT = Path.home() / ".cache" / "fastpilot" / "llama-server"
SRC = ROOT / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
BUILD = SRC / "build"
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
# The Makefile's reason: ggml's AMX matmul segfaults in this release on Q4_K_M models.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if os.uname().machine == "x86_64" else ""


def server_path() -> Path:
    return BUILD / "bin" / "llama-server"


def _building_elsewhere() -> bool:
    """True while another process compiles in our build tree (read-only /proc scan)."""
    me = os.getpid()
    needle = str(SRC).encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            if needle in (d / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def _run(argv: list[str], log, cwd: Path | None = None) -> None:
    log.write(f"$ {' '.join(argv)}\n".encode())
    log.flush()
    env = dict(os.environ, CFLAGS=NO_AMX, CXXFLAGS=NO_AMX)
    subprocess.run(
        ["nice", "-n", "10", *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        check=True,
        env=env,
    )


def ensure_llama_server(log_path: Path, wait_other: float = 3600.0) -> tuple[Path | None, str]:
    """Return ``(path, note)``: the binary, building it if missing; ``(None, why)`` on failure.

    If another process is already compiling in the same tree, wait for it (up to
    ``wait_other`` seconds) instead of racing it.
    """
    exe = server_path()
    if exe.is_file():
        return exe, "cached build"
    t0 = time.monotonic()
    while _building_elsewhere() and time.monotonic() - t0 < wait_other:
        print(
            "[llama-server] another build is running in the cache; waiting",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(30)
    if exe.is_file():
        return exe, "built by a concurrent build"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_path, "ab") as log:
            if not (SRC / "CMakeLists.txt").is_file():
                ROOT.mkdir(parents=True, exist_ok=True)
                sdist = ROOT / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
                if not sdist.is_file():
                    _run(
                        [
                            sys.executable,
                            "-m",
                            "pip",
                            "download",
                            f"llama-cpp-python=={LLAMA_CPP_VERSION}",
                            "--no-deps",
                            "--no-binary",
                            ":all:",
                            "-d",
                            str(ROOT),
                        ],
                        log,
                    )
                with tarfile.open(sdist) as tar:
                    tar.extractall(ROOT, filter="data")
            _run(["cmake", "-S", str(SRC), "-B", str(BUILD), *CMAKE_ARGS], log)
            jobs = str(os.cpu_count() or 2)
            _run(
                [
                    "cmake",
                    "--build",
                    str(BUILD),
                    "--config",
                    "Release",
                    "--target",
                    "llama-server",
                    "-j",
                    jobs,
                ],
                log,
            )
    except (subprocess.CalledProcessError, OSError, tarfile.TarError) as ex:
        return None, f"llama-server build failed ({ex}); see {log_path}"
    if exe.is_file():
        return exe, f"built in {time.monotonic() - t0:.0f}s"
    return None, f"llama-server build produced no binary; see {log_path}"


if __name__ == "__main__":
    path, note = ensure_llama_server(Path("/tmp/llama_server_build_bench.log"))
    print(path, note)
