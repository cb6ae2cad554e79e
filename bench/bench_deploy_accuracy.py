"""Task accuracy of the trained model vs every deployed form of it, on the example tasks.

For each task: train with the README's command (defaults: the embedded GGUF's own
Q4_1 blocks), export GGUF (side + merged) and int4 ONNX (side + merged), and score
exact-match accuracy on the full eval split with the stock runtimes
(llama.cpp through llama-cpp-python, onnxruntime-genai) next to PyTorch running
the model the adapter was trained as. One run, one machine.

    python bench/bench_deploy_accuracy.py --out bench-out/deploy [--tasks sentiment,intent,extract]
        [--base DIR]   # another base, e.g. bench/smollm2_as_qwen2.py's second-family model
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import header, table

ROOT = Path(__file__).resolve().parents[1]


def edgeia3(*args: str) -> None:
    cmd = [sys.executable, "-m", "edgeia3.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out/deploy")
    ap.add_argument("--tasks", default="sentiment,intent,extract")
    ap.add_argument("--epochs", default="2")
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--base", default="default")
    args = ap.parse_args()
    header("deployed vs trained task accuracy")
    from edgeia3.data import read_jsonl
    from edgeia3.export import read_export
    from edgeia3.report import accuracy, reference_base, trained_as
    from edgeia3.runtimes import open_runtime
    from edgeia3.runtimes.torch_runtime import TorchRuntime

    out = Path(args.out)
    rows_out = []
    for task in args.tasks.split(","):
        data = ROOT / "examples" / "tasks" / task
        ad = out / task
        if not ad.exists():
            edgeia3("train", "--base", args.base, "--data", str(data / "train.jsonl"), "--eval", str(data / "eval.jsonl"),
                    "--out", str(ad), "--epochs", args.epochs, "--quiet")
        exports = {
            "gguf side": ["export", "gguf", "--base", args.base, "--adapter", f"{task}={ad}"],
            "gguf merged": ["export", "gguf", "--base", args.base, "--adapter", f"{task}={ad}", "--merge", task],
            "onnx int4 side": ["export", "onnx", "--base", args.base, "--adapter", f"{task}={ad}"],
            "onnx int4 merged": ["export", "onnx", "--base", args.base, "--adapter", f"{task}={ad}",
                                 "--merge", task],
        }
        rows = read_jsonl(data / "eval.jsonl")[: args.rows]
        tr = json.loads((ad / "training.json").read_text())
        dirs = {}
        for label, cmd in exports.items():
            d = out / f"{task}-{label.replace(' ', '-')}"
            if not d.exists():
                edgeia3(*cmd, "--out", str(d))
            dirs[label] = d
        first = read_export(dirs["gguf side"])
        adapter = first.adapters()[task]
        ref_base, _ = reference_base(first.base_spec, trained_as(adapter))
        ref = TorchRuntime(ref_base, {task: adapter})
        ref.use_adapter(task)
        tok = lambda s: ref_base.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        row = {"task": task, "trained (training.json)": f"{tr['eval_after']['accuracy']:.1%}",
               "trained (torch, same scorer)": f"{accuracy(ref, tok, rows):.1%}"}
        for label, d in dirs.items():
            rt = open_runtime(d)
            rt.use_adapter(task)
            row[label] = f"{accuracy(rt, tok, rows):.1%}"
            getattr(rt, "close", lambda: None)()
        row["rows"] = len(rows)
        row["train s"] = round(tr["wall_seconds"])
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(table(rows_out))


if __name__ == "__main__":
    main()
