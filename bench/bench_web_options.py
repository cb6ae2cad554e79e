"""One `export web` folder under onnxruntime session options: the page's peak memory and decode speed.

Each variant is a copy of the folder (model files hard-linked) whose manifest sets or removes
onnxruntime session config entries; the copy is run in headless Chromium through edgeia3's web
runtime (the page's own module, 1 thread): load time, decode tok/s by the page's clock (greedy,
--tokens new tokens, median of --runs), the renderer's peak resident memory (VmHWM), and whether the
greedy tokens equal the folder's as exported. The variants: the folder as exported, and each
``--set KEY=VALUE`` / ``--unset KEY`` given (one variant per flag).

    .venv/bin/python bench/bench_web_options.py --folder WEB_DIR --unset session.disable_prepacking

Needs playwright (pip) and Chromium at /usr/bin/chromium (or $EDGEIA3_CHROMIUM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_web import PROMPT, renderer_peaks  # noqa: E402
from common import header, table  # noqa: E402


def variant(folder: Path, out: Path, key: str, value: str | None) -> Path:
    """A copy of ``folder`` with one session config entry set (value) or removed (None)."""
    # every file hard-linked but the manifest, which the copy writes anew: the folder's stays as it is
    shutil.copytree(folder, out, copy_function=os.link, ignore=shutil.ignore_patterns("edgeia3.json"))
    doc = json.loads((folder / "edgeia3.json").read_text())
    options = doc["graph"]["session_options"]
    if value is None:
        options.pop(key, None)
    else:
        options[key] = value
    (out / "edgeia3.json").write_text(json.dumps(doc))
    return out


def measure(folder: Path, tokens: int, runs: int) -> dict:
    from edgeia3.runtimes.web_runtime import WebRuntime

    t0 = time.perf_counter()
    rt = WebRuntime(folder, threads=1)
    load_s = time.perf_counter() - t0
    try:
        ids = rt.prompt_ids([{"role": "user", "content": PROMPT}])
        speeds, out = [], []
        for _ in range(runs):
            out = list(rt.generate_ids(ids, tokens, ignore_eos=True))
            speeds.append(rt.last_timing["decode_tok_s"])
        peak = max(renderer_peaks())
    finally:
        rt.close()
    return {"load s": round(load_s, 1), "decode tok/s": round(statistics.median(speeds), 1),
            "peak MB": round(peak / 1e6), "ids": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", type=Path, required=True, help="an `edgeia3 export web` folder")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE: a variant with this entry set")
    ap.add_argument("--unset", action="append", default=[], help="KEY: a variant without this entry")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    header("web export: session options vs peak memory and decode speed (Chromium, WASM, 1 thread)")
    changes = [tuple(kv.split("=", 1)) for kv in args.set] + [(k, None) for k in args.unset]
    rows, first = [], None
    with tempfile.TemporaryDirectory(dir=args.folder.parent) as tmp:  # same filesystem: hard links
        for change in [None, *changes]:
            folder = args.folder if change is None else variant(args.folder, Path(tmp) / f"v{len(rows)}", *change)
            got = measure(folder, args.tokens, args.runs)
            first = first or got["ids"]
            label = "as exported" if change is None else (f"{change[0]}={change[1]}" if change[1] else f"without {change[0]}")
            rows.append({"variant": label, **{k: v for k, v in got.items() if k != "ids"},
                         "same tokens": got["ids"] == first})
            print(json.dumps(rows[-1]), flush=True)
    files_mb = sum(f.stat().st_size for f in args.folder.glob("model.onnx*")) / 1e6
    print(f"\nmodel files: {files_mb:.1f} MB")
    print(table(rows))


if __name__ == "__main__":
    main()
