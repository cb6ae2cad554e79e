"""The real `edgeia3 serve` for tests: started in a subprocess on 127.0.0.1 and driven by the
official openai client (test_serve*.py, test_t5_gguf.py), or in a thread through the Python API
(``ThreadServer``), with the tiny model's tokenizer, the exports it serves and the helpers that
synchronize on /metrics."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from tiny_models import CHAT_TEMPLATE

KEY = "sk-test-edgeia3"
MODELS = ["base", "a", "b"]
SERVED = MODELS + ["c0"]  # c0: loaded from --adapters-dir at start
PROMPTS = ["hello there", "tell me a story", "what is 2+2?", "the quick brown fox"]
LONG = 2000  # tokens of one blocking request (the tiny model's context is 2048)
MAX_QUEUE = 32
REPO = Path(__file__).resolve().parents[1]


# -- the tiny model: a llama with a 2048 context and a byte-level BPE tokenizer -----------------------------
def ascii_bpe_tokenizer(out: Path) -> None:
    """Byte-level BPE over printable ASCII (+ a few merges): loads in llama.cpp (it has merges),
    in onnxruntime-genai and in transformers, and every token decodes to valid text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_end|>", "<|im_start|>"]
    alphabet = sorted(c for c in pre_tokenizers.ByteLevel.alphabet() if 33 <= ord(c) <= 126) + ["Ġ", "Ċ"]
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    merges = [("h", "e"), ("l", "l"), ("Ġ", "t"), ("e", "r"), ("o", "u")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def export(kind: str, tiny: dict, out: Path, names: list[str], merge: str | None = None) -> Path:
    from edgeia3.export import export_gguf, export_onnx

    adapters = {n: str(tiny["peft"][n]) for n in names}
    if kind == "onnx":
        return export_onnx(str(tiny["base"]), out, "fp32", adapters=adapters, merge=merge).out
    return export_gguf(str(tiny["base"]), out, quant="f32", adapters=adapters, merge=merge).out


@contextlib.contextmanager
def paced(monkeypatch, seconds: float):
    """Each step (or token) takes >= ``seconds``: concurrent requests of a tiny model really overlap."""
    from edgeia3.serve import engine

    monkeypatch.setattr(engine, "TOKEN_DELAY", seconds)
    yield


# -- the server ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float = 60.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class ThreadServer:
    """``edgeia3.serve`` through its Python API (build + create_app), uvicorn on 127.0.0.1 in a thread."""

    def __init__(self, model: Path, limits=None, adapters_dir: Path | None = None):
        import uvicorn

        from edgeia3.serve import build, create_app

        self.engine = build(model, adapters_dir, limits=limits)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.engine), host="127.0.0.1", port=free_port(),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.config.port}"

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        wait_until(lambda: self.server.started, 60, "the in-thread server")
        self.http = httpx.Client(base_url=self.url, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def batch(self) -> dict:
        return self.http.get("/metrics").json()["batch"]


class Server:
    """``edgeia3 serve`` in a subprocess on 127.0.0.1 (a free port)."""

    def __init__(self, model: Path, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "edgeia3", "serve", "--model", str(model), "--port", str(self.port),
               "--api-key", KEY, "--max-queue", str(MAX_QUEUE), "--max-tokens", str(LONG),
               "--max-prompt-tokens", "300", "--max-body-bytes", "65536", *extra]
        self._log = open(log, "w")
        # 1 ms per token: a tiny model decodes too fast to observe queues and disconnects
        env = dict(os.environ, EDGEIA3_SERVE_TOKEN_DELAY="0.001")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        try:
            wait_until(self._up, 120, "the server to start")
        except BaseException:
            self.close()
            raise

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            return self.http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def client(self, key: str = KEY) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def metrics(self) -> dict:
        r = self.http.get("/metrics")
        assert r.status_code == 200, r.text
        return r.json()

    def idle(self) -> dict:
        return wait_until(lambda: (m := self.metrics())["running"] == 0 and m["queue_depth"] == 0 and m,
                          120, "the server to be idle")

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def chat(client, model: str, prompt: str, max_tokens: int = 24, **kw) -> tuple[str, str]:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                       max_tokens=max_tokens, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason


def long_request(srv: Server, model: str = "base") -> int:
    r = srv.client().completions.create(model=model, prompt="x", max_tokens=LONG, extra_body={"ignore_eos": True})
    return r.usage.completion_tokens


class Blocker:
    """Keeps the worker busy for >= ``seconds``: k long base-model requests, accepted before entry returns.
    A batching server gets a full batch of them (all running at once), so later requests wait."""

    def __init__(self, srv: Server, seconds: float = 4.0):
        self.srv = srv
        self.rows = srv.metrics()["batch"]["max_rows"]
        self.k = max(self.rows, min(8, max(2, math.ceil(seconds / srv.long_s))))

    def __enter__(self) -> "Blocker":
        before = self.srv.metrics()["requests"]
        self.pool = ThreadPoolExecutor(self.k)
        self.futures = [self.pool.submit(long_request, self.srv) for _ in range(self.k)]
        running = min(self.k, self.rows)
        wait_until(lambda: (m := self.srv.metrics())["requests"] - before >= self.k and m["running"] == running
                   and m["active_adapter"] == "base", 60, "the blocking requests to be accepted")
        return self

    def __exit__(self, *exc) -> None:
        self.results = [f.result() for f in self.futures]
        self.pool.shutdown()
        assert self.results == [LONG] * self.k


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    assert body["error"]["message"]
    return body["error"]


def expected_alone(srv: Server, client, cases) -> dict:
    for case in cases:
        if case not in srv.alone:
            srv.alone[case] = chat(client, *case)
    return srv.alone


def drive_rows(dec, cases) -> tuple[dict, dict, int]:
    """Run ``cases`` - (prompt ids, adapter, max_tokens, ignore_eos, step it may join at, steps after
    which it is dropped or None) - through the batch decoder ``dec`` as the server does: rows join
    while there is room, dropped ones leave, then one step. The tokens per case, the step each
    joined at, and the most rows that decoded at once."""
    got: dict[int, list[int]] = {i: [] for i in range(len(cases))}
    pending, joined, step, widest = list(range(len(cases))), {}, 0, 0
    while pending or len(dec):
        for i in [i for i in pending if cases[i][4] <= step][: dec.max_rows - len(dec)]:
            pending.remove(i)
            ids, ad, n, ie, _, _ = cases[i]
            tok, joined[i] = dec.join(i, ids, ad, n, ignore_eos=ie), step
            got[i] += [tok] if tok is not None else []
        for i, (*_, drop) in enumerate(cases):
            if drop is not None and joined.get(i) == step - drop:
                dec.leave(i)
        widest = max(widest, len(dec))
        for key, tok in dec.step():
            got[key] += [tok] if tok is not None else []
        step += 1
    return got, joined, widest
