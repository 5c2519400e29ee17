"""The HTTP contenders: how to start each server and how to phrase each request for it.

Every server gets the same model file, the same thread count, 127.0.0.1 and its own
port, and is started in its own process group (``benchmarks.procs.Managed``), so the
harness can measure the peak RSS of its whole process tree and kill it afterwards.

Request phrasing (greedy, EOS ignored so lengths match):

* fastpilot: ``POST /v1/engines/<e>/completions`` (Copilot plugin route), ``ignore_eos``,
  ``stream_options.include_usage``; browser workload as ``GET`` with a query string.
* llama-server: ``POST /v1/completions`` with ``ignore_eos`` and ``cache_prompt``.
* llama-cpp-python server: ``POST /v1/completions`` with ``min_tokens = max_tokens``
  (it has no ``ignore_eos``; ``min_tokens`` masks EOS until then).
* transformers baseline: ``POST /v1/completions`` with ``ignore_eos``
  (``min_new_tokens`` inside).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.client import Call
from benchmarks.models import ModelFile
from benchmarks.procs import Managed, free_port
from benchmarks.workloads import Req

__all__ = ["Contender", "fastpilot", "llama_server", "llama_cpp_python", "hf_baseline"]

BIN = Path(sys.executable).parent
FASTPILOT_MAIN = "import sys; from fastpilot.cli import main; sys.exit(main())"


@dataclass(frozen=True, slots=True)
class Contender:
    """One server configuration on one model file."""

    name: str  # "fastpilot", "llama-server", "llama-cpp-python", "transformers"
    backend: str  # "llamacpp", "ct2", "llama.cpp", "torch"
    model: str  # spec name
    label: str  # model file label, e.g. "gguf-q4_k_m", or "hf-fp32"
    argv: tuple[str, ...]
    port: int
    health: str
    engine: str
    weights_bytes: int
    startup_timeout: float = 300.0

    @property
    def key(self) -> str:
        return f"{self.name}[{self.backend}] {self.model} {self.label}"

    def with_fresh_port(self) -> Contender:
        """A copy listening on a port that is free now (queues are built long before launch)."""
        port = free_port()
        argv = list(self.argv)
        argv[argv.index("--port") + 1] = str(port)
        return replace(self, argv=tuple(argv), port=port)

    def launch(self, log_dir: Path) -> Managed:
        """Start the server (not yet waited for); the caller owns stopping it."""
        # Thread counts are explicit flags; drop a caller's OMP cap so llama.cpp's OpenMP
        # pool is not silently limited below --threads.
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        safe = self.key.replace(" ", "_").replace("/", "_").replace("[", "-").replace("]", "")
        return Managed(list(self.argv), log_dir / f"server-{safe}.log", env=env).start()

    def call(self, req: Req) -> Call:
        """Phrase ``req`` for this server."""
        if self.name == "fastpilot":
            path = f"/v1/engines/{self.engine}/completions"
            params = {
                "prompt": req.prompt,
                "max_tokens": req.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            if req.get:
                return Call.get(path, params)
            body = dict(params, stop=list(req.stop), stream=req.stream)
            if req.stream:
                body["stream_options"] = {"include_usage": True}
            return Call("POST", path, body, req.stream)
        body = {
            "model": self.engine,
            "prompt": req.prompt,
            "max_tokens": req.max_tokens,
            "temperature": 0,
            "stop": list(req.stop),
            "stream": req.stream,
        }
        if self.name == "llama-server":
            body.update(ignore_eos=True, cache_prompt=True, stream_options={"include_usage": True})
        elif self.name == "llama-cpp-python":
            # Its default repeat_penalty is 1.1; the others apply none, so neither does it here.
            body.update(min_tokens=req.max_tokens, repeat_penalty=1.0)
        else:
            body.update(ignore_eos=True)
        return Call("POST", "/v1/completions", body, req.stream)


def fastpilot(mf: ModelFile, threads: int, slots: int) -> Contender:
    port = free_port()
    exe = BIN / "fastpilot"
    # The console script exists once the package is pip-installed; the module path works always.
    head = (str(exe),) if exe.is_file() else (sys.executable, "-c", FASTPILOT_MAIN)
    argv = (
        *head,
        "serve",
        "--model",
        f"{mf.model}={mf.directory}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--slots",
        str(slots),
    )
    backend = "ct2" if mf.fmt == "ct2" else "llamacpp"
    return Contender(
        "fastpilot", backend, mf.model, mf.label, argv, port, "/health", mf.model, mf.bytes
    )


def fastpilot_serve_argv(directory: Path, port: int, threads: int, slots: int) -> list[str]:
    """``fastpilot serve`` on one model named ``m`` (the section benchmarks' servers)."""
    argv = [sys.executable, "-c", "from fastpilot.cli import main; raise SystemExit(main())"]
    argv += ["serve", "--model", f"m={directory}", "--port", str(port)]
    return argv + ["--threads", str(threads), "--slots", str(slots)]


def llama_server_argv(
    directory: Path, port: int, threads: int, slots: int, n_ctx: int
) -> list[str]:
    """llama-server on ``directory/model.gguf`` set up as fastpilot is: same threads for
    decode and batch, ``slots`` sequences of ``n_ctx`` each, continuous batching, prompt cache."""
    from benchmarks.llama_server_build import server_path

    t = str(threads)
    argv = [str(server_path()), "-m", str(directory / "model.gguf"), "--port", str(port)]
    argv += ["-t", t, "-tb", t, "--parallel", str(slots), "--cont-batching", "--cache-prompt"]
    return argv + ["--no-kv-unified", "-c", str(n_ctx * slots), "--no-webui"]


def llama_server(binary: Path, mf: ModelFile, threads: int, slots: int, n_ctx: int) -> Contender:
    """llama.cpp's own server: same threads (eval and batch), ``--parallel`` = fastpilot's
    slots, continuous batching on, prompt cache on, ``n_ctx`` tokens per slot."""
    port = free_port()
    argv = (
        str(binary),
        "-m",
        str(mf.weights),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "--parallel",
        str(slots),
        "--cont-batching",
        "--cache-prompt",
        "-c",
        str(n_ctx * slots),
        "--no-kv-unified",
        "--no-webui",
        "-a",
        mf.model,
    )
    return Contender(
        "llama-server", "llama.cpp", mf.model, mf.label, argv, port, "/health", mf.model, mf.bytes
    )


def llama_cpp_python(mf: ModelFile, threads: int, n_ctx: int) -> Contender:
    """llama-cpp-python's bundled FastAPI server (one sequence; requests are serialized).

    Started with ``--interrupt_requests False``: its default cancels the stream in flight
    when another request arrives, so with concurrent clients most streams would end early.
    """
    port = free_port()
    argv = (
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(mf.weights),
        "--model_alias",
        mf.model,
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--n_ctx",
        str(n_ctx),
        # Its default (True) aborts the running stream whenever a new request arrives, which
        # cuts concurrent streams short; off, requests queue and every stream completes.
        "--interrupt_requests",
        "False",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    )
    return Contender(
        "llama-cpp-python",
        "llama.cpp",
        mf.model,
        mf.label,
        argv,
        port,
        "/v1/models",
        mf.model,
        mf.bytes,
    )


def hf_baseline(hf_dir: Path, model: str, threads: int) -> Contender:
    port = free_port()
    argv = (
        sys.executable,
        "-m",
        "benchmarks.hf_server",
        "--model",
        str(hf_dir),
        "--threads",
        str(threads),
        "--port",
        str(port),
    )
    size = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")) or sum(
        f.stat().st_size for f in hf_dir.glob("*.bin")
    )
    return Contender("transformers", "torch", model, "hf-fp32", argv, port, "/health", model, size)
