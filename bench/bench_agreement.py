"""Does the deployed model answer like the trained one, row by row?

For a task already run by bench_deploy_accuracy.py (its --out directory), compare each
merged export's greedy answer on every eval row with the answer of the model the adapter
was trained as (PyTorch), and the mean |Δlogit| at the last prompt token.

    python bench/bench_agreement.py --task intent --out bench-out/qwen2deploy [--rows 100]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXPORTS = ("gguf-merged", "onnx-int4-merged")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    from edgeia3.data import read_jsonl
    from edgeia3.export import read_export
    from edgeia3.report import reference_base, trained_as
    from edgeia3.runtimes import open_runtime
    from edgeia3.runtimes.torch_runtime import TorchRuntime

    rows = read_jsonl(ROOT / "examples" / "tasks" / args.task / "eval.jsonl")[: args.rows]
    adapter = read_export(args.out / f"{args.task}-gguf-side").adapters()[args.task]
    base, _ = reference_base(read_export(args.out / f"{args.task}-gguf-merged").base_spec, trained_as(adapter))
    ref = TorchRuntime(base, {args.task: adapter})
    ref.use_adapter(args.task)
    runtimes = {k: open_runtime(args.out / f"{args.task}-{k}") for k in EXPORTS}
    same = {k: 0 for k in EXPORTS}
    drift: dict[str, list[float]] = {k: [] for k in EXPORTS}
    for row in rows:
        msgs = row["messages"][:-1]
        ids = ref.prompt_ids(msgs)
        want = ref.detokenize(list(ref.generate_ids(ids, args.tokens))).strip()
        last = ref.logits(ids)[-1]
        for k, rt in runtimes.items():
            got = rt.detokenize(list(rt.generate_ids(rt.prompt_ids(msgs), args.tokens))).strip()
            same[k] += got == want
            drift[k].append(float(np.abs(rt.logits(ids)[-1] - last).mean()))
    for k in EXPORTS:
        print(f"{k}: same answer as the trained model on {same[k]}/{len(rows)} rows, "
              f"mean |dlogit| at the last prompt token {np.mean(drift[k]):.3f}")


if __name__ == "__main__":
    main()
