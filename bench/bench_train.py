"""Training throughput and peak memory: the GGUF's own blocks vs NF4 vs fp32, in one run.

Each configuration runs `edgeia3 train` in its own process (so peak RSS is its
own) on the same data, batch size and steps.

    .venv/bin/python bench/bench_train.py [--steps 20] [--task sentiment]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import header, table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(quant: str, task: str, steps: int, batch: int, out: Path) -> dict:
    data = ROOT / "examples" / "tasks" / task / "train.jsonl"
    cmd = [sys.executable, "-m", "edgeia3", "train", "--data", str(data), "--out", str(out),
           "--quant", quant, "--max-steps", str(steps), "--batch-size", str(batch), "--quiet"]
    subprocess.run(cmd, check=True)
    return json.loads((out / "training.json").read_text())


def run_plain(quant: str, task: str, steps: int, batch: int, out: Path) -> dict:
    """The plain PEFT loop (bench/peft_loop.py) in its own process."""
    cmd = [sys.executable, str(Path(__file__).parent / "peft_loop.py"), "--quant", quant, "--steps", str(steps),
           "--batch-size", str(batch), "--task", task, "--out", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--task", default="sentiment")
    args = ap.parse_args()
    header("IA3 training on SmolLM2-135M-Instruct: GGUF Q4_1 blocks vs NF4 vs fp32 base")
    rows = {}
    names = {"gguf": "GGUF Q4_1 blocks (default)", "nf4": "NF4 (bitsandbytes)", "none": "fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("gguf", "nf4", "none"):
            r = run(quant, args.task, args.steps, args.batch_size, Path(tmp) / quant)
            rows[quant] = {"base": names[quant],
                           "steps": r["steps"], "wall s": r["wall_seconds"],
                           "s/step": round(r["wall_seconds"] / r["steps"], 2),
                           "tokens/s": r["tokens_per_second"], "base weights MB": r["base_weights_mb"],
                           "RSS at loop start MB": r["rss_at_loop_start_mb"], "peak RSS MB": r["peak_rss_mb"],
                           "bf16 autocast": r.get("bf16_autocast"), "final loss": r["loss_curve"][-1]}
        plain = {}
        for quant in ("gguf", "nf4"):
            r = run_plain(quant, args.task, args.steps, args.batch_size, Path(tmp) / f"plain-{quant}.json")
            plain[quant] = {"loop": f"plain PEFT loop, {names[quant]}", "steps": r["steps"],
                            "wall s": r["wall_seconds"], "s/step": round(r["wall_seconds"] / r["steps"], 2),
                            "peak RSS MB": r["peak_rss_mb"], "final loss": r["loss_curve"][-1]}
    print(table(list(rows.values())))
    print()
    print(table(list(plain.values())))
    print()
    for quant in ("gguf", "nf4"):
        print(f"edgeia3 train / plain PEFT loop, {names[quant]}: {plain[quant]['s/step'] / rows[quant]['s/step']:.2f}x "
              "faster per step (goal >= 1.5x)")
    g, nf4, fp = rows["gguf"], rows["nf4"], rows["none"]
    for name, r in (("GGUF / NF4", nf4), ("GGUF / fp32", fp)):
        print(f"{name}: tokens/s {g['tokens/s'] / r['tokens/s']:.2f}x; base weights "
              f"{g['base weights MB'] / r['base weights MB']:.2f}x; peak RSS {g['peak RSS MB'] / r['peak RSS MB']:.2f}x")
    print("(peak RSS includes loading; goal: GGUF tokens/s >= NF4's, peak RSS <= NF4's)")


if __name__ == "__main__":
    main()
