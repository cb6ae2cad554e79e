"""Few-shot: IA3 trained on 16, 32 and 64 rows vs 8-shot in-context prompting of the same base.

For each example task and size N: `edgeia3 train` with its defaults (the embedded base,
its own Q4_1 blocks, the automatic schedule) on the first N rows of train.jsonl; then
exact-match accuracy on the first --rows eval rows, with the adapter in PyTorch on the
weights it was trained on. The baseline is that same base without an adapter, prompted
with the first 8 train rows as earlier user/assistant turns (the same 8 for every eval
row; the system prompt once, first). Latency: mean wall ms per request of greedy
generation of the answer, prompt processing included, one request at a time; IA3 both
as a PEFT adapter (unmerged) and folded into a copy of the base (as `edgeia3 merge` does).

    python bench/bench_fewshot.py --out bench-out/fewshot [--tasks sentiment,intent,extract]
        [--sizes 16,32,64] [--rows 100] [--shots 8] [--train-args "--lr 1e-2"] [--no-icl]
        [--runtime llama.cpp]   # score and time on the deployed GGUF instead of PyTorch
        [--jobs 2 --train-threads 1] [--eval-threads 1]   # on a busy shared CPU

Trained adapters under --out are reused on a second run (delete them to retrain).

``--runtime llama.cpp``: what a device runs. All adapters are exported side by side on
the weights they were trained on (`edgeia3 export gguf`); the baseline is the same
file with no adapter active; each request swaps in place to its adapter first.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import header, table

ROOT = Path(__file__).resolve().parents[1]


def edgeia3(*args: str, threads: int | None = None) -> None:
    cmd = [sys.executable, "-m", "edgeia3.cli", *args]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")


def few_shot_rows(rows: list[dict], shots: list[dict]) -> list[dict]:
    """Each eval row with the shots as earlier turns: system once, then user/assistant pairs."""
    system = [m for m in shots[0]["messages"] if m["role"] == "system"][:1]
    turns = [m for s in shots for m in s["messages"] if m["role"] != "system"]
    out = []
    for row in rows:
        own = [m for m in row["messages"] if m["role"] != "system"]
        out.append({"messages": system + turns + own})
    return out


def timed(rt, tok, row: dict) -> tuple[float, float]:
    """(1.0 for an exact match else 0.0, seconds) of one request, scored by report.accuracy."""
    from edgeia3.report import accuracy

    t0 = time.perf_counter()
    hit = accuracy(rt, tok, [row])
    return hit, time.perf_counter() - t0


def _gguf_runtime(base: str, out: Path, trained: dict):
    """One `edgeia3 export gguf` of every adapter (side, on the weights they trained on), opened."""
    from edgeia3.runtimes import open_runtime

    export = out / "gguf-export"
    if not export.exists():
        edgeia3("export", "gguf", "--base", base, "--out", str(export),
                *[a for (t, n), d in trained.items() for a in ("--adapter", f"{t}-{n}={d}")])
    return open_runtime(export)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out/fewshot")
    ap.add_argument("--tasks", default="sentiment,intent,extract")
    ap.add_argument("--sizes", default="16,32,64")
    ap.add_argument("--rows", type=int, default=100, help="eval rows per task (the first N)")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--base", default="default")
    ap.add_argument("--train-args", default="", help="extra `edgeia3 train` options (default: none)")
    ap.add_argument("--no-icl", action="store_true", help="skip the in-context baseline")
    ap.add_argument("--no-merged", action="store_true", help="skip the adapters folded into the base")
    # On a shared CPU, two-thread torch runs stall each other at every barrier (20 s/step seen
    # for ~1 s/step of work); one thread per run, runs side by side, keeps going.
    ap.add_argument("--jobs", type=int, default=1, help="trainings run side by side")
    ap.add_argument("--train-threads", type=int, default=None, help="OMP_NUM_THREADS of each training")
    ap.add_argument("--eval-threads", type=int, default=None, help="torch threads while scoring")
    ap.add_argument("--runtime", choices=("torch", "llama.cpp"), default="torch",
                    help="score on PyTorch (the trained weights) or on the deployed GGUF")
    args = ap.parse_args()
    header(f"few-shot: IA3 on N rows vs {args.shots}-shot in-context prompting")
    from edgeia3.data import read_jsonl
    from edgeia3.formats import load_adapter
    from edgeia3.merge import fold_into_model
    from edgeia3.report import reference_base, trained_as
    from edgeia3.runtimes.torch_runtime import TorchRuntime

    if args.eval_threads:
        import torch

        torch.set_num_threads(args.eval_threads)
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    tasks, sizes = args.tasks.split(","), [int(n) for n in args.sizes.split(",")]
    trained, todo = {}, []  # (task, size) -> adapter dir; all trained first, then scored
    for task in tasks:
        rows = read_jsonl(ROOT / "examples" / "tasks" / task / "train.jsonl")
        for n in sizes:
            data, ad = out / "data" / f"{task}-{n}.jsonl", out / f"{task}-{n}"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
            if not ad.exists():
                todo.append(["train", "--base", args.base, "--data", str(data), "--out", str(ad), "--quiet",
                             *shlex.split(args.train_args)])
            trained[task, n] = ad
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda cmd: edgeia3(*cmd, threads=args.train_threads), todo))

    adapters = {f"{t}-{n}": load_adapter(d) for (t, n), d in trained.items()}
    quant = {trained_as(a) for a in adapters.values()}
    assert len(quant) == 1, f"adapters trained on different weights: {quant}"
    weights = quant.pop()
    ref_base, _ = reference_base(args.base, weights)
    tok = lambda s: ref_base.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if args.runtime == "llama.cpp":
        ia3, plain, folded = _gguf_runtime(args.base, out, trained), None, None
        plain = None if args.no_icl else ia3  # the same file, no adapter active
        args.no_merged = True  # an in-place swap is the merged model (bit-identical block scales)
    else:
        ia3 = TorchRuntime(ref_base, adapters)
        # the same weights loaded again, no adapter (PEFT wrapped ref_base's model in place): the
        # in-context baseline, and each adapter folded into a copy (`edgeia3 merge`: no per-token cost)
        plain_base = reference_base(args.base, weights)[0]
        plain = None if args.no_icl else TorchRuntime(plain_base)

        def folded(adapter) -> TorchRuntime:
            model = copy.deepcopy(plain_base.model)
            fold_into_model(model, adapter, plain_base.family)
            return TorchRuntime(dataclasses.replace(plain_base, model=model))

    results, prompt_tokens = [], {}
    for task in tasks:
        d = ROOT / "examples" / "tasks" / task
        evals = read_jsonl(d / "eval.jsonl")[: args.rows]
        prompted = few_shot_rows(evals, read_jsonl(d / "train.jsonl")[: args.shots])
        # Requests interleaved row by row (in-context, then each adapter), so a busy machine
        # slows every column alike; one untimed warm-up request each first.
        runs = ([] if plain is None else [("icl", plain, None, prompted)]) + \
               [(n, ia3, f"{task}-{n}", evals) for n in sizes] + \
               ([] if args.no_merged else [(f"m{n}", folded(adapters[f"{task}-{n}"]), None, evals) for n in sizes])
        score = {key: [0.0, 0.0] for key, *_ in runs}
        for i in range(-1, len(evals)):
            for key, rt, adapter, rows in runs:
                rt.use_adapter(adapter)
                hit, sec = timed(rt, tok, rows[max(i, 0)])
                if i >= 0:
                    score[key][0] += hit
                    score[key][1] += sec
        mean = {key: (hit / len(evals), sec * 1000 / len(evals)) for key, (hit, sec) in score.items()}
        prompt_tokens[task] = {key: round(sum(len(rt.prompt_ids(r["messages"][:-1])) for r in rows) / len(rows))
                               for key, rt, _, rows in runs[:2]}
        for n in sizes:
            (acc, ms), tr = mean[n], json.loads((trained[task, n] / "training.json").read_text())
            row = {"task": task, "train rows": n, "steps": tr["steps"], "train s": round(tr["wall_seconds"]),
                   "IA3 acc": f"{acc:.1%}", "IA3 ms/req": round(ms)}
            if f"m{n}" in mean:
                row |= {"merged acc": f"{mean[f'm{n}'][0]:.1%}", "merged ms/req": round(mean[f"m{n}"][1])}
            if "icl" in mean:
                icl_acc, icl_ms = mean["icl"]
                row |= {f"{args.shots}-shot acc": f"{icl_acc:.1%}", f"{args.shots}-shot ms/req": round(icl_ms),
                        "gap (points)": f"{(acc - icl_acc) * 100:+.1f}", "latency ratio": f"{icl_ms / ms:.1f}x"}
                if f"m{n}" in mean:
                    row["latency ratio, merged"] = f"{icl_ms / mean[f'm{n}'][1]:.1f}x"
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\neval rows per task: {min(args.rows, len(evals))}; IA3 trained on the first N train rows; "
          f"{args.shots}-shot: the first {args.shots} train rows as prior turns")
    print(f"mean prompt tokens (icl: {args.shots}-shot; a row count: IA3): {json.dumps(prompt_tokens)}")
    print("IA3: PEFT adapter on the base, unmerged; merged: the adapter folded into a copy of the base"
          if args.runtime == "torch" else "llama.cpp: one GGUF export, each adapter swapped in place per request")
    print(table(results))


if __name__ == "__main__":
    main()
