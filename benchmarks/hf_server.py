"""A FauxPilot-lite baseline: transformers ``generate`` on the HF checkpoint behind plain HTTP.

This is the "what you get without a serving engine" contender: a PyTorch model in
float32 on the CPU, one request at a time (a lock serializes ``generate``; concurrent
clients queue on it), a fresh KV cache per request (no prefix reuse), and the OpenAI
completions shape on ``POST /v1/completions`` and ``POST /v1/engines/<e>/completions``
(streamed as single-line SSE events, or one JSON document).

Run: ``python -m benchmarks.hf_server --model HF_DIR --threads T --port P``.
``torch.set_num_threads(T)`` bounds the intra-op threads; inter-op threads are 1.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Streamer:
    """transformers streamer protocol: ``put`` gets the prompt first, then one id per step."""

    def __init__(self, on_token) -> None:
        self.on_token = on_token
        self.seen_prompt = False

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.on_token(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


class _StopOnText:
    """Stopping criterion: the generated text contains one of the stop strings."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), bool(self.state["stopped"]), dtype=torch.bool)


class HFModel:
    """The loaded checkpoint plus the lock that serializes generation."""

    def __init__(self, path: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval()
        self.lock = threading.Lock()
        self.eos = self.tok.eos_token_id

    def generate(self, body: dict, emit) -> dict:
        """Greedy/sampled generation with stop strings; ``emit(text)`` is called per new piece.

        Returns the finish reason and token counts. Blocks while another request runs.
        """
        prompt = body.get("prompt") or ""
        if isinstance(prompt, list):
            prompt = prompt[0]
        max_tokens = int(body.get("max_tokens", 16))
        temperature = float(body.get("temperature", 1.0))
        stops = body.get("stop") or []
        if isinstance(stops, str):
            stops = [stops]
        force = bool(body.get("ignore_eos")) or int(body.get("min_tokens", 0)) >= max_tokens
        ids = self.tok(prompt, return_tensors="pt").input_ids
        n_ctx = self.model.config.max_position_embeddings
        room = n_ctx - max_tokens
        if ids.shape[1] > room:  # left-truncate like an editor route
            ids = ids[:, -room:]
        state = {"ids": [], "text": "", "sent": 0, "stopped": None}

        def on_token(t: int) -> None:
            if state["stopped"]:
                return
            state["ids"].append(t)
            text = self.tok.decode(state["ids"], skip_special_tokens=False)
            if text.endswith("\ufffd"):
                return  # half a UTF-8 character: wait for the next token
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                state["stopped"] = "stop"
            if len(text) > state["sent"]:
                emit(text[state["sent"] :])
                state["sent"] = len(text)
            state["text"] = text

        kwargs = dict(
            max_new_tokens=max_tokens,
            do_sample=temperature > 0,
            streamer=_Streamer(on_token),
            stopping_criteria=[_StopOnText(state)],
            pad_token_id=self.eos,
        )
        if temperature > 0:
            kwargs["temperature"] = temperature
        if force:
            kwargs["min_new_tokens"] = max_tokens
        with self.lock, self.torch.inference_mode():
            self.model.generate(ids, attention_mask=self.torch.ones_like(ids), **kwargs)
        n = len(state["ids"])
        finish = state["stopped"] or ("stop" if n and state["ids"][-1] == self.eos else "length")
        return {"finish_reason": finish, "prompt_tokens": int(ids.shape[1]), "completion_tokens": n}


def _handler(hf: HFModel):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # body ends at close: simplest correct streaming

        def log_message(self, fmt, *args) -> None:  # quiet
            pass

        def _json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.startswith("/health"):
                self._json(200, {"status": "ok"})
            else:
                self._json(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            if not (self.path == "/v1/completions" or self.path.endswith("/completions")):
                self._json(404, {"error": {"message": "not found"}})
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

            def chunk(text: str, finish: str | None) -> dict:
                return {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": "hf",
                    "choices": [
                        {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                    ],
                }

            if body.get("stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()

                def emit(text: str) -> None:
                    self.wfile.write(f"data: {json.dumps(chunk(text, None))}\n\n".encode())
                    self.wfile.flush()

                info = hf.generate(body, emit)
                last = chunk("", info["finish_reason"])
                last["usage"] = _usage(info)
                self.wfile.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
                return
            parts: list[str] = []
            info = hf.generate(body, parts.append)
            doc = chunk("".join(parts), info["finish_reason"])
            doc["usage"] = _usage(info)
            self._json(200, doc)

    return Handler


def _usage(info: dict) -> dict:
    p, c = info["prompt_tokens"], info["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5050)
    args = ap.parse_args(argv)
    hf = HFModel(args.model, args.threads)
    server = ThreadingHTTPServer((args.host, args.port), _handler(hf))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
