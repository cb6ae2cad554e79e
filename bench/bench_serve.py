"""Serving benchmark: ``edgeia3 serve`` on the embedded SmolLM2-135M-Instruct, GGUF and ONNX int4.

    python bench/bench_serve.py [--work DIR] [--kinds gguf,onnx] [--concurrency 1,4,16]
                                [--requests 48] [--tokens 32] [--resident 100,1000] [--switches 20]

1. Throughput and latency: requests/s and client-side p50/p99 latency at 1, 4 and 16
   concurrent clients, single-adapter (every request names one adapter) vs mixed-adapter
   (requests cycle over the base and 7 adapters), each request a chat completion of exactly
   ``--tokens`` tokens (``ignore_eos``). One server process per export, one worker.
2. Resident adapters: the server started with ``--adapters-dir`` holding N adapters:
   start-up time (N adapters validated and loaded), resident memory (RSS) against the
   same server without them, and time to the first token of a streamed 1-token answer
   with the same adapter again (no switch) vs a different adapter each time (switch).

Adapters are ``edgeia3.validate.adapter_for_base(base, seed=k)`` (random IA3 vectors on
PEFT's default sites, k, v, down): timing does not depend on their values. Exports:
``export gguf --base default`` (the embedded Q4_1 as is) and ``export onnx --base default
--precision int4`` (the same Q4_1 blocks transcoded), each with 8 adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, table  # noqa: E402

PROMPTS = ["Write a haiku about the sea.", "Name three colours.", "What is the capital of France?",
           "Explain IA3 adapters in one sentence.", "Give me a tip for a rainy day."]
EXPORT_ADAPTERS = 8


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- preparation ------------------------------------------------------------------------------------------
def prepare(work: Path, kinds: list[str], n_adapters: int) -> dict:
    """Canonical adapters a0000.. (cached), and the exports (cached)."""
    from edgeia3 import load_base
    from edgeia3.export import export_gguf, export_onnx
    from edgeia3.validate import adapter_for_base

    store = work / "adapters"
    store.mkdir(parents=True, exist_ok=True)
    names = [f"a{k:04d}" for k in range(max(n_adapters, EXPORT_ADAPTERS))]
    missing = [n for n in names if not (store / n / "edgeia3_adapter.safetensors").exists()]
    if missing:
        t0 = time.perf_counter()
        base = load_base("default")
        for n in missing:
            adapter_for_base(base, seed=int(n[1:])).save(store / n / "edgeia3_adapter.safetensors")
        log(f"wrote {len(missing)} adapters in {time.perf_counter() - t0:.1f} s")
    exported = {n: str(store / n) for n in names[:EXPORT_ADAPTERS]}
    out = {}
    for kind in kinds:
        path = work / f"export-{kind}"
        if not (path / "edgeia3.json").exists():
            t0 = time.perf_counter()
            if kind == "gguf":
                export_gguf("default", path, adapters=exported)
            else:
                export_onnx("default", path, "int4", adapters=exported)
            log(f"exported {kind} in {time.perf_counter() - t0:.1f} s")
        out[kind] = path
    return {"store": store, "names": names, "exports": out}


def resident_dir(work: Path, store: Path, names: list[str], n: int) -> Path:
    """A directory of ``n`` adapters (symlinks into the store), none of them in the export."""
    d = work / f"resident-{n}"
    if not d.exists() or len(list(d.iterdir())) != n:
        d.mkdir(exist_ok=True)
        for old in d.iterdir():
            old.unlink()
        for name in names[EXPORT_ADAPTERS:EXPORT_ADAPTERS + n]:
            (d / name).symlink_to(store / name)
    return d


# -- the server --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, log_path: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "edgeia3", "serve", "--model", str(model), "--port", str(self.port),
               "--max-queue", "1024", *extra]
        self._log = open(log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=600)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log_path.read_text()}")
            try:
                if self.http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.start_s = time.perf_counter() - t0

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2 ** 20

    def metrics(self) -> dict:
        return self.http.get("/metrics").json()

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def chat_body(model: str, i: int, tokens: int, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": tokens, "ignore_eos": True, "stream": stream}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# -- 1. throughput and latency ------------------------------------------------------------------------------
def load_test(srv: Server, models: list[str], concurrency: int, n: int, tokens: int) -> dict:
    lat: list[float] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def client() -> None:
        with httpx.Client(base_url=srv.url, timeout=600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = http.post("/v1/chat/completions", json=chat_body(models[i % len(models)], i, tokens))
                dt = time.perf_counter() - t0
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == tokens, r.text
                with lock:
                    lat.append(dt)

    before = srv.metrics()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        for f in [ex.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    after = srv.metrics()
    return {"rps": n / wall, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
            "tok_s": n * tokens / wall, "swaps": after["adapter_swaps"] - before["adapter_swaps"]}


# -- 2. resident adapters --------------------------------------------------------------------------------------
def first_token_s(srv: Server, model: str, i: int) -> float:
    t0 = time.perf_counter()
    with srv.http.stream("POST", "/v1/chat/completions", json=chat_body(model, i, 1, stream=True)) as r:
        assert r.status_code == 200
        dt = None
        for line in r.iter_lines():
            if dt is None and line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                dt = time.perf_counter() - t0
        assert dt is not None, "no token"
    return dt


def switch_test(srv: Server, names: list[str], k: int) -> dict:
    same = [first_token_s(srv, names[0], 0) for _ in range(k + 1)][1:]
    before = srv.metrics()
    step = max(1, len(names) // k)
    switched = [first_token_s(srv, names[(1 + j * step) % len(names)], 0) for j in range(k)]
    after = srv.metrics()
    swaps = after["adapter_swaps"] - before["adapter_swaps"]
    swap_s = (after["swap_seconds_total"] - before["swap_seconds_total"]) / max(1, swaps)
    return {"same": statistics.median(same), "switch": statistics.median(switched), "swap": swap_s,
            "swaps": swaps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="cache dir for adapters and exports (default: temp)")
    ap.add_argument("--kinds", default="gguf,onnx")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=48, help="requests per (concurrency, mode) cell")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per answer")
    ap.add_argument("--resident", default="100,1000", help="resident adapter counts ('' to skip)")
    ap.add_argument("--switches", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    resident = [int(n) for n in args.resident.split(",") if n]
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    header("edgeia3 serve: SmolLM2-135M-Instruct (embedded), one server process, one worker")
    t_all = time.perf_counter()
    prep = prepare(args.work, kinds, EXPORT_ADAPTERS + max(resident, default=0))
    names = prep["names"]
    results: dict = {"throughput": [], "resident": []}
    for kind in kinds:
        export = prep["exports"][kind]
        srv = Server(export, args.work / f"server-{kind}.log")
        try:
            rt_name = srv.metrics()["runtime"]
            baseline_rss = srv.rss_mb()
            # warm up every model once
            for m in ["base"] + names[:EXPORT_ADAPTERS - 1]:
                srv.http.post("/v1/chat/completions", json=chat_body(m, 0, 4))
            for mode, models in (("single", [names[0]]), ("mixed", ["base"] + names[:EXPORT_ADAPTERS - 1])):
                for c in levels:
                    n = max(args.requests, 2 * c)
                    log(f"{kind} {mode} c={c} n={n}")
                    r = load_test(srv, models, c, n, args.tokens)
                    results["throughput"].append({"export": f"{kind} ({rt_name})", "adapters": mode, "clients": c,
                                                  "requests": n, "req/s": f"{r['rps']:.2f}",
                                                  "tok/s": f"{r['tok_s']:.0f}",
                                                  "p50 latency": f"{1000 * r['p50']:.0f} ms",
                                                  "p99 latency": f"{1000 * r['p99']:.0f} ms",
                                                  "adapter swaps": r["swaps"]})
            sw = switch_test(srv, names[:EXPORT_ADAPTERS], min(args.switches, EXPORT_ADAPTERS - 1))
            results["resident"].append(_resident_row(kind, rt_name, EXPORT_ADAPTERS, srv, baseline_rss, sw,
                                                     baseline_rss))
        finally:
            srv.close()
        for n_res in resident:
            d = resident_dir(args.work, prep["store"], names, n_res)
            log(f"{kind}: server with {n_res} resident adapters")
            srv = Server(export, args.work / f"server-{kind}-{n_res}.log", "--adapters-dir", str(d))
            try:
                rss = srv.rss_mb()
                sw = switch_test(srv, names[EXPORT_ADAPTERS:EXPORT_ADAPTERS + n_res], args.switches)
                results["resident"].append(_resident_row(kind, rt_name, EXPORT_ADAPTERS + n_res, srv, rss, sw,
                                                         baseline_rss))
            finally:
                srv.close()
    print("## Throughput and latency")
    print()
    print(f"Each request: a chat completion of exactly {args.tokens} tokens (greedy, ignore_eos); "
          "latency is client-side (queueing included). single: every request names the same adapter; "
          f"mixed: requests cycle over the base and {EXPORT_ADAPTERS - 1} adapters.")
    print()
    print(table(results["throughput"]))
    print()
    print("## Resident adapters")
    print()
    print("first token: a streamed 1-token chat answer, median of "
          f"{args.switches} requests; 'same' repeats one adapter, 'switch' names a different adapter "
          "each time (the server swaps before the prefill); swap: the server-side use_adapter time.")
    print()
    print(table(results["resident"]))
    print()
    print(f"total bench time: {time.perf_counter() - t_all:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if tmp is not None:
        tmp.cleanup()


def _resident_row(kind: str, rt_name: str, n: int, srv: Server, rss: float, sw: dict, baseline: float) -> dict:
    extra = rss - baseline
    return {"export": f"{kind} ({rt_name})", "resident adapters": n, "server start": f"{srv.start_s:.1f} s",
            "RSS": f"{rss:.0f} MB", "RSS per extra adapter": f"{1024 * extra / max(1, n - EXPORT_ADAPTERS):.0f} kB"
            if n > EXPORT_ADAPTERS else "-",
            "first token, same adapter": f"{1000 * sw['same']:.0f} ms",
            "first token, switch": f"{1000 * sw['switch']:.0f} ms",
            "swap (server)": f"{1000 * sw['swap']:.2f} ms"}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
