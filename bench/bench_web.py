"""The browser export on SmolLM2-135M: headless Chromium (onnxruntime-web, WASM) next to native.

For each matmul form of `edgeia3 export web` (dequantize: DequantizeLinear + MatMul folded to fp32 at
load; int8: int8 weights per column + onnxruntime's integer kernels; nbits: MatMulNBits as exported;
dequantize-fold) and each thread count, in a fresh browser: load time,
time to first token, decode tok/s (greedy, --tokens new tokens, median of --runs), adapter load,
and the renderer's peak resident memory (VmHWM of the page's renderer process). Native figures on
the same machine in the same run: onnxruntime on the browser graph and on the ONNX export's own
graph (MatMulNBits, accuracy_level 4), 1 and 2 threads. With --task NAME=EVAL.jsonl: every eval row
answered in the page with adapter NAME, checked token for token against native onnxruntime on the
same graph, and exact-match accuracy (as `edgeia3 train --eval` scores it).

    .venv/bin/python bench/bench_web.py --work bench-out/web --adapter sentiment=ADAPTER_DIR \\
        --task sentiment=examples/tasks/sentiment/eval.jsonl [--modes dequantize,nbits] [--threads 1,2]

Needs playwright (pip) and Chromium at /usr/bin/chromium (or $EDGEIA3_CHROMIUM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, table  # noqa: E402

CHROMIUM = os.environ.get("EDGEIA3_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "Write a long story about a dragon who learns to cook."


def renderer_peaks() -> list[int]:
    """VmHWM (peak resident bytes) of every Chromium renderer under this process."""
    import psutil

    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "--type=renderer" in " ".join(p.cmdline()):
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        out.append(int(line.split()[1]) * 1024)
        except (psutil.Error, OSError):
            continue
    return out


def open_page(pw, url: str):
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#answer[data-state=ready], #answer[data-state=error]", timeout=600_000)
    if page.locator("#answer").get_attribute("data-state") == "error":
        raise RuntimeError(page.locator("#answer").text_content())
    return browser, page


def generate(page, **request) -> dict:
    return page.evaluate("""async (r) => {
        const res = await window.edgeia3Model.generate(r);
        return {text: res.text, ids: res.ids, prompt_ids: res.promptIds, stats: res.stats};
    }""", request)


def native_decode(session, decoder: dict, feeds: dict, ids: list[int], tokens: int) -> tuple[float, float, list[int]]:
    """(ttft s, decode tok/s, ids) of greedy decoding ``tokens`` new tokens (EOS ignored)."""
    past = {}
    for i in range(decoder["num_layers"]):
        for kind in ("key", "value"):
            past[decoder["past_names"][kind] % i] = np.zeros((1, decoder["kv_heads"], 0, decoder["head_size"]), np.float32)
    names = [o.name for o in session.get_outputs()]
    out, total, step, t0, t1 = [], 0, list(ids), time.perf_counter(), 0.0
    while len(out) < tokens:
        total += len(step)
        res = dict(zip(names, session.run(None, {**feeds, **past, "input_ids": np.array([step], np.int64),
                                                 "attention_mask": np.ones((1, total), np.int64)})))
        for i in range(decoder["num_layers"]):
            for kind in ("key", "value"):
                past[decoder["past_names"][kind] % i] = res[decoder["present_names"][kind] % i]
        out.append(int(np.argmax(res["logits"][0, -1])))
        if len(out) == 1:
            t1 = time.perf_counter()
        step = [out[-1]]
    return t1 - t0, (len(out) - 1) / (time.perf_counter() - t1), out


def native_session(path: Path, threads: int, options: dict):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    for k, v in options.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("bench-out/web"))
    ap.add_argument("--base", default="default")
    ap.add_argument("--adapter", action="append", default=[], help="NAME=ADAPTER_DIR")
    ap.add_argument("--task", action="append", default=[], help="NAME=EVAL.jsonl (NAME: an adapter)")
    ap.add_argument("--modes", default="dequantize,int8,nbits")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--task-modes", default="dequantize,int8", help="matmul forms the eval rows run on")
    args = ap.parse_args()
    header("edgeia3 export web: SmolLM2-135M in headless Chromium (onnxruntime-web) vs native onnxruntime")
    from playwright.sync_api import sync_playwright

    from edgeia3.export import export_onnx
    from edgeia3.web import NativeWeb, export_web, make_server

    adapters = dict(a.split("=", 1) for a in args.adapter)
    modes, threads = args.modes.split(","), [int(t) for t in args.threads.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        out = args.work / f"web-{mode}"
        if not (out / "edgeia3.json").exists():
            t = time.perf_counter()
            export_web(args.base, out, adapters=adapters, matmul=mode)
            print(f"exported {out} in {time.perf_counter() - t:.1f} s")
    onnx_dir = args.work / "onnx"
    if not (onnx_dir / "edgeia3.json").exists():
        export_onnx(args.base, onnx_dir, adapters=adapters)
    srv = make_server(args.work, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{srv.server_address[1]}"
    first = next(iter(adapters), None)
    rows = []
    with sync_playwright() as pw:
        for mode in modes:
            folder = args.work / f"web-{mode}"
            m = json.loads((folder / "edgeia3.json").read_text())
            files = sum((folder / f).stat().st_size for f in [m["graph"]["file"], *m["graph"]["external_data"]])
            for n in threads:
                browser = None
                try:
                    browser, page = open_page(pw, f"{root}/web-{mode}/index.html?threads={n}")
                    runs = [generate(page, prompt=PROMPT, adapter=first, maxTokens=args.tokens, ignoreEos=True)["stats"]
                            for _ in range(args.runs)]
                    peak = max(renderer_peaks())
                except Exception as e:  # a renderer that runs out of memory crashes the page
                    rows.append({"runtime": f"Chromium onnxruntime-web, {mode}", "threads": n, "load ms": "-",
                                 "ttft ms": "-", "decode tok/s": f"failed: {str(e).splitlines()[0][:60]}",
                                 "adapter load ms": "-", "peak MB": "-", "model files MB": "-", "tokens": "-"})
                    print(rows[-1], flush=True)
                    continue
                finally:
                    if browser is not None:
                        browser.close()
                rows.append({"runtime": f"Chromium onnxruntime-web, {mode}", "threads": n,
                             "load ms": round(runs[0]["load_ms"]),
                             "ttft ms": round(statistics.median(r["ttft_ms"] for r in runs)),
                             "decode tok/s": round(statistics.median(r["decode_tok_s"] for r in runs), 1),
                             "adapter load ms": round(runs[0]["adapter_load_ms"], 1),
                             "peak MB": round(peak / 1e6), "model files MB": round(files / 1e6, 1),
                             "tokens": runs[0]["new_tokens"]})
                print(rows[-1], flush=True)
        # native, same machine, same run
        nw = NativeWeb(args.work / f"web-{modes[0]}")
        ids = nw.prompt_ids(PROMPT, first)
        feeds = nw.adapter_tensors(first)
        om = json.loads((onnx_dir / "edgeia3.json").read_text())
        for label, path, opts in ([(f"native onnxruntime, browser graph ({mode})", args.work / f"web-{mode}" / "model.onnx",
                                    json.loads((args.work / f"web-{mode}" / "edgeia3.json").read_text())["graph"]["session_options"])
                                   for mode in modes]
                                  + [("native onnxruntime, ONNX export (MatMulNBits, level 4)", onnx_dir / om["model_file"], {})]):
            for n in threads:
                s = native_session(path, n, opts)
                res = [native_decode(s, nw.manifest.extra["decoder"], feeds, ids, args.tokens) for _ in range(args.runs)]
                rows.append({"runtime": label, "threads": n, "load ms": "-",
                             "ttft ms": round(statistics.median(r[0] for r in res) * 1000),
                             "decode tok/s": round(statistics.median(r[1] for r in res), 1),
                             "adapter load ms": "-", "peak MB": "-", "model files MB": "-", "tokens": args.tokens})
                print(rows[-1], flush=True)
        print()
        print(table(rows))
        # accuracy: every eval row in the page vs native on the same graph
        for spec in args.task:
            name, path = spec.split("=", 1)
            evals = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:args.rows]
            for mode in [m for m in args.task_modes.split(",") if m in modes]:
                nw = NativeWeb(args.work / f"web-{mode}")
                browser, page = open_page(pw, f"{root}/web-{mode}/index.html")
                same = hits = native_hits = 0
                t = time.perf_counter()
                try:
                    for row in evals:
                        msgs = [m for m in row["messages"] if m["role"] != "assistant"]
                        target = row["messages"][-1]["content"].strip()
                        # the reference answer's length + 4, as bench_deploy_accuracy scores (extract's JSON is ~33 tokens)
                        budget = len(nw.tokenizer(target, add_special_tokens=False)["input_ids"]) + 4
                        got = generate(page, messages=msgs, adapter=name, maxTokens=budget)
                        ids = nw.prompt_ids(msgs, name)
                        want = nw.generate(ids, name, budget)
                        same += got["ids"] == want and got["prompt_ids"] == ids
                        hits += got["text"].strip() == target
                        native_hits += nw.detokenize(want).strip() == target
                finally:
                    browser.close()
                print(f"\ntask {name} ({mode}): {len(evals)} eval rows in {time.perf_counter() - t:.0f} s; page answers "
                      f"token-identical to native onnxruntime on the same graph: {same}/{len(evals)}; exact match: "
                      f"Chromium {100 * hits / len(evals):.1f}%, native (same graph) {100 * native_hits / len(evals):.1f}%",
                      flush=True)
    srv.shutdown()


if __name__ == "__main__":
    main()
