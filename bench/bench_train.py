"""Training throughput and peak memory: NF4 vs fp32 base, measured in one run.

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--task", default="sentiment")
    args = ap.parse_args()
    header("IA3 training on SmolLM2-135M-Instruct: NF4 vs fp32 base")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("nf4", "none"):
            r = run(quant, args.task, args.steps, args.batch_size, Path(tmp) / quant)
            rows[quant] = {"base": "NF4 (bitsandbytes)" if quant == "nf4" else "fp32",
                           "steps": r["steps"], "wall s": r["wall_seconds"],
                           "s/step": round(r["wall_seconds"] / r["steps"], 2),
                           "tokens/s": r["tokens_per_second"], "base weights MB": r["base_weights_mb"],
                           "RSS at loop start MB": r["rss_at_loop_start_mb"], "peak RSS MB": r["peak_rss_mb"],
                           "final loss": r["loss_curve"][-1]}
    print(table(list(rows.values())))
    nf4, fp = rows["nf4"], rows["none"]
    print(f"\nNF4 / fp32: tokens/s {nf4['tokens/s'] / fp['tokens/s']:.2f}x; base weights "
          f"{nf4['base weights MB'] / fp['base weights MB']:.2f}x; peak RSS {nf4['peak RSS MB'] / fp['peak RSS MB']:.2f}x")
    print("(peak RSS includes loading: NF4 quantizes from the fp32 checkpoint while loading)")


if __name__ == "__main__":
    main()
