"""Serving benchmark: ``edgeia3 serve`` on the embedded SmolLM2-135M-Instruct, GGUF and ONNX int4.

    python bench/bench_serve.py [--work DIR] [--kinds gguf,onnx] [--concurrency 1,4,16]
                                [--requests 48] [--tokens 32] [--max-batch 16]
                                [--resident 100,1000] [--switches 20]
                                [--llama-server PATH [--llama-server-args '...']]

1. Throughput and latency: requests/s and client-side p50/p99 latency at 1, 4 and 16
   concurrent clients, single-adapter (every request names one adapter) vs mixed-adapter
   (requests cycle over the base and 7 adapters), each request a chat completion of exactly
   ``--tokens`` tokens (``ignore_eos``). One server process per export and scheduling, one
   worker. Each export runs twice: batched (``Limits.max_batch`` = ``--max-batch``: requests
   decode together; ONNX: each row with its own adapter; GGUF: llama.cpp sequences in groups
   of one adapter) and one request at a time (``max_batch`` 1, the onnxruntime-genai /
   llama.cpp path); the goals table gives mixed / single-adapter and batched / one-at-a-time
   requests/s at the highest concurrency.
   With ``--llama-server PATH`` (llama.cpp's own server, built from the llama.cpp that
   llama-cpp-python vendors: ``scripts/build_llama_server.sh``), the GGUF export's
   ``model.gguf`` (the same file ``edgeia3 serve`` loads) is also served by llama-server
   twice, with ``--max-batch`` slots (``-np``, continuous batching) and with 1 slot, each
   ``-c slots x context`` and ``--no-kv-unified`` (every slot a full context of its own, as
   edgeia3's batch rows have), ``-t`` = CPU count, ``--no-repack`` and flash attention off
   (what edgeia3's runtime sets; ``--llama-server-args`` appends more). Its cells
   (single-adapter only: it serves the base, no adapter) run interleaved with edgeia3's,
   through the same client; requests carry ``cache_prompt: false`` and the server runs with
   ``--cache-ram 0`` because edgeia3 reuses no prompt cache either. The goals
   table adds edgeia3 batched / llama-server N slots (single adapter, highest concurrency)
   and edgeia3 one at a time / llama-server 1 slot (1 client). On a machine whose cores are
   busy with other work, llama-server's OpenMP threads spin-wait (libgomp's default) and
   lose 2-8x against edgeia3's 2 threads (measured on the 2-core dev machine, alternating
   requests); ``--llama-server-env OMP_WAIT_POLICY=passive`` puts them on par there, the
   stock setting is left as the default.
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


# ``edgeia3 serve`` with a given Limits.max_batch (the CLI has no flag for it)
LAUNCH = ("import sys; from edgeia3.serve import Limits, serve; serve(sys.argv[1], port=int(sys.argv[2]), "
          "limits=Limits(max_queue=1024, max_batch=int(sys.argv[3])), announce=None)")


class Server:
    extra_body: dict = {}  # merged into every load-test request body

    def __init__(self, model: Path, log_path: Path, *extra: str, max_batch: int | None = None,
                 src: Path | None = None):
        self.port = free_port()
        cmd = [sys.executable, "-m", "edgeia3", "serve", "--model", str(model), "--port", str(self.port),
               "--max-queue", "1024", *extra]
        if max_batch is not None:
            cmd = [sys.executable, "-c", LAUNCH, str(model), str(self.port), str(max_batch)]
        # src: another checkout's edgeia3 (``python -c`` imports from its working directory first)
        self._start(cmd, src or ROOT, log_path)

    def _start(self, cmd: list[str], cwd: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        """Run ``cmd`` (listening on ``self.port``; ``env``: more environment variables) until its ``/health``
        answers 200; stopped again if not."""
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env} if env else None)
        self.http = httpx.Client(base_url=self.url, timeout=600)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited ({self.proc.returncode}):\n{log_path.read_text()}")
                try:
                    if self.http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        self.start_s = time.perf_counter() - t0

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2 ** 20

    def metrics(self) -> dict | None:
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


class LlamaServer(Server):
    """llama.cpp's ``llama-server`` on a GGUF file: ``slots`` parallel sequences (continuous batching,
    its default), each with a full ``context`` of its own (no unified KV); settings as edgeia3's llama.cpp
    runtime has them (module docstring). No prompt-cache reuse (``cache_prompt: false``, no RAM prompt
    cache: ``--cache-ram 0``) and no edgeia3 metrics."""

    extra_body = {"cache_prompt": False}

    def __init__(self, binary: Path, gguf: Path, log_path: Path, slots: int, context: int,
                 extra: tuple[str, ...] | list[str] = (), env: dict[str, str] | None = None):
        self.port = free_port()
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "-np", str(slots), "-c", str(slots * context), "--no-kv-unified", "--cont-batching",
               "--no-repack", "-fa", "off", "-t", str(os.cpu_count() or 1), "--cache-ram", "0", "--no-webui",
               *extra]
        template = gguf.parent / "chat_template.jinja"  # an export's template for a base GGUF without one
        if template.exists():
            cmd += ["--jinja", "--chat-template-file", str(template)]
        self._start(cmd, ROOT, log_path, env)

    def metrics(self) -> None:
        return None


def llama_version(binary: Path) -> str:
    """``llama-server --version``'s version line (it prints to stderr)."""
    try:
        r = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"version unknown: {e}"
    lines = [x.strip() for x in (r.stdout + r.stderr).splitlines() if x.strip().startswith("version")]
    return lines[0] if lines else "version unknown"


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
                body = chat_body(models[i % len(models)], i, tokens) | srv.extra_body
                r = http.post("/v1/chat/completions", json=body)
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
    if before is None:  # llama-server: no edgeia3 metrics
        return {"rps": n / wall, "lat": lat, "swaps": None, "rows": None}
    steps = after["batch"]["steps"] - before["batch"]["steps"]
    rows = (after["batch"]["rows_decoded"] - before["batch"]["rows_decoded"]) / steps if steps else 1.0
    return {"rps": n / wall, "lat": lat, "swaps": after["adapter_swaps"] - before["adapter_swaps"], "rows": rows}


def throughput(kind: str, export: Path, names: list[str], args: argparse.Namespace, levels: list[int]) -> tuple:
    """The throughput table's rows for one export, the requests/s per cell, its first server's
    resident-adapter row, runtime name and RSS. A batched and a one-at-a-time server, both up, their cells
    interleaved (and repeated ``--repeat`` times: req/s is the median) so that a busy machine's
    drift hits both alike. GGUF with ``--llama-server``: llama-server with ``--max-batch`` slots and with 1
    slot on the export's model file too, single-adapter cells only (it serves the base)."""
    schedules = (("batched", args.max_batch), ("one at a time", 1))
    if args.baseline_src:
        schedules += (("one at a time, baseline", 1),)
    llama = ()
    if kind == "gguf" and args.llama_server:
        llama = ((f"llama-server, {args.max_batch} slots", args.max_batch), ("llama-server, 1 slot", 1))
    modes = (("single", [names[0]]), ("mixed", ["base"] + names[:EXPORT_ADAPTERS - 1]))
    servers = {}
    try:
        for sched, max_batch in schedules:
            servers[sched] = srv = Server(export, args.work / f"server-{kind}-{max_batch}-{len(servers)}.log",
                                          max_batch=max_batch, src=args.baseline_src if "baseline" in sched else None)
            srv.baseline_rss = srv.rss_mb()
            for m in ["base"] + names[:EXPORT_ADAPTERS - 1]:  # warm up every model once
                srv.http.post("/v1/chat/completions", json=chat_body(m, 0, 4))
        if llama:
            from edgeia3.manifest import read_manifest

            gguf = export / (read_manifest(export).model_file or "model.gguf")
            context = servers[schedules[0][0]].metrics()["limits"]["context"]  # edgeia3's, per row
            for sched, slots in llama:
                log(f"{sched}: {args.llama_server} on {gguf}, context {slots} x {context}")
                servers[sched] = srv = LlamaServer(args.llama_server, gguf,
                                                   args.work / f"llama-server-{kind}-{slots}.log", slots, context,
                                                   args.llama_server_args.split(), args.llama_server_env)
                srv.http.post("/v1/chat/completions", json=chat_body("base", 0, 4) | srv.extra_body)  # warm-up
        cells: dict = {}
        for rnd in range(args.repeat):
            for c in levels:
                for mode, models in modes:
                    for sched, _ in schedules + (llama if mode == "single" else ()):
                        n = max(args.requests, 2 * c)
                        asked = ["base"] if sched in dict(llama) else models  # llama-server: the base only
                        log(f"{kind} {sched} {mode} c={c} n={n} (round {rnd + 1}/{args.repeat})")
                        cells.setdefault((sched, mode, c), []).append(load_test(servers[sched], asked, c, n,
                                                                                args.tokens))
        first = servers[schedules[0][0]]
        rt_name = first.metrics()["runtime"]
        # scheduled like the resident-adapter servers (the CLI's default)
        sw = switch_test(first, names[:EXPORT_ADAPTERS], min(args.switches, EXPORT_ADAPTERS - 1))
        resident = _resident_row(kind, rt_name, EXPORT_ADAPTERS, first, first.baseline_rss, sw, first.baseline_rss)
    finally:
        for srv in servers.values():
            srv.close()
    rows, rps = [], {}
    for sched, _ in schedules + llama:
        ours = sched not in dict(llama)
        for mode, _ in modes if ours else modes[:1]:
            for c in levels:
                runs = cells[(sched, mode, c)]
                lat = [x for r in runs for x in r["lat"]]
                rps[(kind, sched, mode, c)] = r_s = statistics.median(r["rps"] for r in runs)
                rows.append({"export": f"{kind} ({rt_name})" if ours else f"{kind} (llama-server)",
                             "scheduling": sched, "adapters": mode if ours else "single (base)", "clients": c,
                             "requests": len(lat), "req/s": f"{r_s:.2f}", "tok/s": f"{r_s * args.tokens:.0f}",
                             "p50 latency": f"{1000 * pct(lat, 0.5):.0f} ms",
                             "p99 latency": f"{1000 * pct(lat, 0.99):.0f} ms",
                             "rows per step": f"{statistics.mean(r['rows'] for r in runs):.1f}" if ours else "-",
                             "adapter swaps": sum(r["swaps"] for r in runs) if ours else "-"})
    return rows, rps, resident, rt_name, first.baseline_rss


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
    ap.add_argument("--max-batch", type=int, default=16, help="rows of the batched servers")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the throughput cells (req/s: the median)")
    ap.add_argument("--resident", default="100,1000", help="resident adapter counts ('' to skip)")
    ap.add_argument("--switches", type=int, default=20)
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="also serve one at a time from this checkout of edgeia3 (e.g. `git archive` of an older "
                         "commit), its cells interleaved with the others")
    ap.add_argument("--llama-server", type=Path, default=None, metavar="PATH",
                    help="also serve the GGUF export's model file with this llama-server binary "
                         "(scripts/build_llama_server.sh), --max-batch slots and 1 slot, single-adapter cells")
    ap.add_argument("--llama-server-args", default="", help="more llama-server arguments (split on spaces)")
    ap.add_argument("--llama-server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable for llama-server only (repeatable), e.g. OMP_WAIT_POLICY=passive "
                         "on a shared machine (module docstring)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    resident = [int(n) for n in args.resident.split(",") if n]
    if args.llama_server is not None:
        args.llama_server = args.llama_server.expanduser().resolve()
        if not os.access(args.llama_server, os.X_OK) or args.llama_server.is_dir():
            ap.error(f"--llama-server {args.llama_server}: not an executable (scripts/build_llama_server.sh)")
        if "gguf" not in kinds:
            ap.error("--llama-server needs the gguf kind (--kinds)")
    if any("=" not in kv for kv in args.llama_server_env):
        ap.error("--llama-server-env takes KEY=VALUE")
    args.llama_server_env = dict(kv.split("=", 1) for kv in args.llama_server_env)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    header("edgeia3 serve: SmolLM2-135M-Instruct (embedded), one server process, one worker")
    t_all = time.perf_counter()
    prep = prepare(args.work, kinds, EXPORT_ADAPTERS + max(resident, default=0))
    names = prep["names"]
    results: dict = {"throughput": [], "goals": [], "resident": []}
    for kind in kinds:
        export = prep["exports"][kind]
        rows, rps, row, rt_name, baseline_rss = throughput(kind, export, names, args, levels)
        results["throughput"] += rows
        results["resident"].append(row)
        results["goals"] += _goals(kind, rps, max(levels), args.max_batch)
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
          f"mixed: requests cycle over the base and {EXPORT_ADAPTERS - 1} adapters. batched: up to "
          f"{args.max_batch} requests decode together (GGUF: for one adapter at a time); one at a time: the "
          "onnxruntime-genai / llama.cpp path. "
          f"req/s: the median of {args.repeat} interleaved round(s); latency percentiles over all of them.")
    if args.llama_server:
        print()
        print(f"llama-server: llama.cpp's own server ({llama_version(args.llama_server)}) on the GGUF export's "
              f"model file, {args.max_batch} slots (continuous batching) or 1, the base model (no adapter), "
              "-fa off --no-repack, -t CPU count, every slot a full context, no prompt cache"
              f"{', ' + args.llama_server_args if args.llama_server_args else ''}"
              f"{''.join(f', {k}={v}' for k, v in args.llama_server_env.items())}; its cells interleaved with "
              "edgeia3's.")
    print()
    print(table(results["throughput"]))
    print()
    if results["goals"]:
        print(table(results["goals"]))
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


def _goals(kind: str, rps: dict, c: int, max_batch: int) -> list[dict]:
    """The serving goals at ``c`` clients, from the measured requests/s; with llama-server cells, the
    ratios to it (no goal: a reference)."""
    rows = []
    pairs = ((f"mixed / single-adapter req/s, batched, {c} clients", (kind, "batched", "mixed", c),
              (kind, "batched", "single", c), 0.9),
             (f"batched / one-at-a-time req/s, single-adapter, {c} clients", (kind, "batched", "single", c),
              (kind, "one at a time", "single", c), 2.0),
             (f"batched / one-at-a-time req/s, mixed-adapter, {c} clients", (kind, "batched", "mixed", c),
              (kind, "one at a time", "mixed", c), 2.0))
    pairs += ((f"edgeia3 batched / llama-server {max_batch} slots req/s, single-adapter, {c} clients",
               (kind, "batched", "single", c), (kind, f"llama-server, {max_batch} slots", "single", c), None),
              ("edgeia3 one at a time / llama-server 1 slot req/s, single-adapter, 1 client",
               (kind, "one at a time", "single", 1), (kind, "llama-server, 1 slot", "single", 1), None))
    for what, num, den, goal in pairs:
        if num in rps and den in rps:
            ratio = rps[num] / rps[den]
            rows.append({"export": kind, "figure": what, "measured": f"{ratio:.2f}x",
                         "goal": "-" if goal is None else f">= {goal}x: {'met' if ratio >= goal else 'not met'}"})
    return rows


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
