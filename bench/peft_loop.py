"""The plain PEFT IA3 loop edgeia3's trainer is measured against (issue 13's baseline):
random batches of the same rows, constant LR, the model's own ``labels=`` loss, fp32 compute.

    python bench/peft_loop.py --quant gguf|nf4|none --steps 20 [--task sentiment] --out result.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from peft import IA3Config, get_peft_model

    from edgeia3.base import load_base
    from edgeia3.data import IGNORE, load_examples

    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="gguf")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lb = load_base("default", quant=args.quant)
    rows = load_examples(ROOT / "examples" / "tasks" / args.task / "train.jsonl", lb.tokenizer, 256)
    model = get_peft_model(lb.model, IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                               feedforward_modules=["down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    rng, pad = random.Random(0), lb.tokenizer.pad_token_id
    model.train()
    losses, tokens, t0 = [], 0, time.perf_counter()
    for _ in range(args.steps):
        chunk = rng.sample(rows, args.batch_size)
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad)
        labels = torch.full((len(chunk), width), IGNORE)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
        tokens += int(mask.sum())
    wall = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps({
        "steps": args.steps, "wall_seconds": round(wall, 2), "tokens_per_second": round(tokens / wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loss_curve": [round(x, 5) for x in losses]}))


if __name__ == "__main__":
    main()
