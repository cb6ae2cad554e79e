"""Soak and abuse: thousands of mixed requests against one ``edgeia3 serve`` on loopback.

    python bench/bench_soak.py [--kind onnx|gguf] [--requests 5000] [--clients 16] [--seed 0]
                               [--work DIR] [--out soak.json]

A tiny random llama (the suite's: byte-level BPE, 2048 context) exported with adapters ``a`` and
``b``; the server runs with ``--adapters-dir`` (adapter ``c0`` loaded at start, a spare one
hot-loaded and unloaded under fresh names while requests run) and an API key. Requests, drawn at
random: chat completions for base/a/b/c0, streamed or not, some with stop strings; streamed
requests abandoned after the first chunk (cancellations); hot loads/unloads; and malformed
requests (bad JSON, text/plain bodies, unknown models, impossible values, out-of-vocabulary ids).

Reported: every answer compared with the same request sent alone before the soak (a quiet
server), errors by kind (a malformed request must get its 4xx, anything else is an error),
client-side p50/p99 latency of the chat requests, hung requests (none may pass the timeout),
and the server's RSS after the first 500 requests and at the end.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the suite's tiny model and server harness
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, table  # noqa: E402
from serving import KEY, Server, ascii_bpe_tokenizer, export  # noqa: E402

PROMPTS = ["hello there", "tell me a story", "what is 2+2?", "the quick brown fox", "rain on the sea"]
MODELS = ["base", "a", "b", "c0"]
STOPS = [None, ["e"], ["Ġ", "o"], ["hello there, how are you today? this is longer than any answer"]]
TIMEOUT = 120.0


def prepare(work: Path, kind: str) -> tuple[Path, Path]:
    """The tiny base, adapters a/b (in the export) and c (the adapters dir), made once per work
    dir; the export once per kind."""
    from edgeia3 import load_base
    from edgeia3.formats import load_adapter
    from tiny_models import make_tiny_model, random_peft_adapter

    base, adir = work / "base", work / "adapters"
    peft = {name: work / f"peft_{name}" for name in "abc"}
    if not adir.exists():
        make_tiny_model("llama", base, seed=0, max_position_embeddings=2048)
        ascii_bpe_tokenizer(base)
        lb = load_base(base)
        for seed, (name, path) in enumerate(peft.items(), start=1):
            random_peft_adapter(copy.deepcopy(lb.model), "llama", path, seed=seed)
        c = dataclasses.replace(load_adapter(peft["c"], base_config=lb.config), base=lb.identity)
        c.save(adir / "spare" / "hot" / "edgeia3_adapter.safetensors")  # a folder, not an adapter itself
        c.save(adir / "c0" / "edgeia3_adapter.safetensors")
    out = work / f"export-{kind}"
    if not out.exists():
        export(kind, {"base": base, "peft": peft}, out, ["a", "b"])
    return out, adir


# -- one request of each kind ---------------------------------------------------------------------------------
def chat_body(rng: random.Random) -> dict:
    body = {"model": rng.choice(MODELS), "max_tokens": rng.choice([4, 8, 16]),
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}
    stop = rng.choice(STOPS)
    if stop:
        body["stop"] = stop
    return body


def key_of(body: dict) -> str:
    return json.dumps({k: body.get(k) for k in ("model", "max_tokens", "messages", "stop")}, sort_keys=True)


def send_chat(http: httpx.Client, body: dict, stream: bool) -> tuple[int, str]:
    if not stream:
        r = http.post("/v1/chat/completions", json=body)
        return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
    text = []
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"]
                text.append((delta[0]["delta"].get("content") or "") if delta else "")
    return 200, "".join(text)


def cancel(http: httpx.Client, body: dict) -> str:
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "max_tokens": 64}) as r:
        for _ in r.iter_lines():
            break  # walk away after the first line
    return "cancelled"


MALFORMED = [
    ("bad json", lambda h: h.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})),
    ("text/plain", lambda h: h.post("/v1/chat/completions", content=b'{"model":"a"}', headers={"content-type": "text/plain"})),
    ("unknown model", lambda h: h.post("/v1/chat/completions", json={"model": "zz", "messages": [{"role": "user", "content": "x"}]})),
    ("max_tokens -1", lambda h: h.post("/v1/chat/completions", json={"model": "a", "max_tokens": -1, "messages": [{"role": "user", "content": "x"}]})),
    ("bad ids", lambda h: h.post("/v1/completions", json={"model": "a", "prompt": [10 ** 9], "max_tokens": 2})),
    ("no key", lambda h: httpx.post(str(h.base_url) + "/v1/models", timeout=TIMEOUT)),
]


class Soak:
    def __init__(self, srv: Server, adir: Path, alone: dict, seed: int):
        self.srv, self.adir, self.alone = srv, adir, alone
        self.rng = random.Random(seed)
        self.hot = 0
        self.results: list[dict] = []

    def one(self, i: int) -> dict:
        rng = random.Random(self.rng.random() + i)
        roll = rng.random()
        http = httpx.Client(base_url=self.srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT)
        t0 = time.perf_counter()
        try:
            if roll < 0.08:
                name, call = rng.choice(MALFORMED)
                status = call(http).status_code
                return {"kind": "malformed", "ok": 400 <= status < 500, "what": f"{name} -> {status}"}
            if roll < 0.13:
                return {"kind": "cancel", "ok": cancel(http, chat_body(rng)) == "cancelled"}
            if roll < 0.16:
                return self.hot_load(http, i)
            body = chat_body(rng)
            status, text = send_chat(http, body, stream=rng.random() < 0.5)
            want = self.alone.get(key_of(body))
            return {"kind": "chat", "ok": status == 200 and text == want, "latency": time.perf_counter() - t0,
                    "what": None if status == 200 and text == want else f"{status}: {text!r} != {want!r}"}
        except httpx.TimeoutException:
            return {"kind": "hung", "ok": False}
        except Exception as e:  # noqa: BLE001  (counted, not fatal: the soak goes on)
            return {"kind": "client error", "ok": False, "what": repr(e)}
        finally:
            http.close()

    def hot_load(self, http: httpx.Client, i: int) -> dict:
        name = f"h{i}"
        r = http.post("/v1/adapters", json={"name": name, "path": str(self.adir / "spare" / "hot")})
        if r.status_code != 200:
            return {"kind": "hot load", "ok": False, "what": f"load {r.status_code}: {r.text[:120]}"}
        d = http.delete(f"/v1/adapters/{name}")
        return {"kind": "hot load", "ok": d.status_code == 200, "what": None if d.status_code == 200 else d.text}


def reference_answers(srv: Server) -> dict:
    """Every distinct chat request, sent alone to the quiet server."""
    http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT)
    alone = {}
    for model in MODELS:
        for prompt in PROMPTS:
            for n in (4, 8, 16):
                for stop in STOPS:
                    body = {"model": model, "max_tokens": n, "messages": [{"role": "user", "content": prompt}]}
                    if stop:
                        body["stop"] = stop
                    status, text = send_chat(http, body, stream=False)
                    assert status == 200, text
                    alone[key_of(body)] = text
    http.close()
    return alone


def rss_mb(srv: Server) -> float:
    return psutil.Process(srv.proc.pid).memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="onnx", choices=["onnx", "gguf"])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    header(f"edgeia3 serve soak ({args.kind}, {args.requests} requests, {args.clients} clients)")
    work = Path(args.work or tempfile.mkdtemp(prefix="edgeia3-soak-"))
    model, adir = prepare(work, args.kind)
    srv = Server(model, work / f"serve-{args.kind}.log", "--adapters-dir", str(adir), "--max-queue", "256")
    try:
        alone = reference_answers(srv)
        soak = Soak(srv, adir, alone, args.seed)
        rss = {}
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            first = min(500, args.requests)
            results = list(pool.map(soak.one, range(first)))
            srv.idle()
            rss["after 500"] = round(rss_mb(srv), 1)
            results += list(pool.map(soak.one, range(first, args.requests)))
        wall = time.perf_counter() - t0
        srv.idle()
        rss["at the end"] = round(rss_mb(srv), 1)
    finally:
        srv.close()
    report(results, rss, wall, args)


def report(results: list[dict], rss: dict, wall: float, args: argparse.Namespace) -> None:
    by_kind = collections.Counter(r["kind"] for r in results)
    bad = collections.Counter(r["kind"] for r in results if not r["ok"])
    lat = sorted(r["latency"] for r in results if r["kind"] == "chat" and "latency" in r)
    rows = [{"kind": k, "requests": n, "failed": bad.get(k, 0)} for k, n in sorted(by_kind.items())]
    summary = {"requests": len(results), "wall_s": round(wall, 1), "clients": args.clients,
               "answers differing from alone": sum(1 for r in results if r["kind"] == "chat" and not r["ok"]),
               "hung": by_kind.get("hung", 0),
               "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
               "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1) if lat else None,
               "rss_mb": rss, "rss_growth_pct": round(100 * (rss["at the end"] / rss["after 500"] - 1), 1)}
    print(table(rows))
    print()
    print(json.dumps(summary, indent=1))
    examples = [r["what"] for r in results if not r["ok"] and r.get("what")][:5]
    if examples:
        print("first failures:", *examples, sep="\n  ")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "by_kind": rows, "failures": examples}, indent=1))


if __name__ == "__main__":
    main()
