"""The plain PEFT IA3 loop edgeia3's trainer is measured against (issue 13's baseline):
random batches of the same rows, constant LR, the model's own ``labels=`` loss, fp32 compute,
the base's default IA3 sites (as `edgeia3 train` picks them).

    python bench/peft_loop.py --quant auto|gguf|nf4|none --steps 20 [--task sentiment | --data-dir DIR] [--base default]
        [--lr 3e-3] [--seed 0] [--eval-rows 100] [--chat-template chatml] --out result.json

``--eval-rows N``: afterwards, exact-match accuracy and eval loss on the first N rows of the
task's eval.jsonl, scored as `edgeia3 train --eval` scores (edgeia3.evaluate on the weights
the loop trained on: for a 4-bit base its dequantized twin with the trained vectors).
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
    from edgeia3.evaluate import evaluate
    from edgeia3.formats.peft_dir import peft_target_modules
    from edgeia3.prompts import resolve_template
    from edgeia3.peft_model import EvalTwin

    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="auto")
    ap.add_argument("--base", default="default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", default="sentiment", help="an example task (examples/tasks/NAME)")
    ap.add_argument("--data-dir", default=None, help="a folder with train.jsonl and eval.jsonl (instead of --task)")
    ap.add_argument("--eval-rows", type=int, default=0, help="score on the first N eval rows (0: no eval)")
    ap.add_argument("--chat-template", default=None, help="as `edgeia3 train --chat-template` (a base without one)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    lb = load_base(args.base, quant=args.quant)
    task = Path(args.data_dir) if args.data_dir else ROOT / "examples" / "tasks" / args.task
    template = resolve_template(args.chat_template) or getattr(lb.tokenizer, "chat_template", None)
    rows = load_examples(task / "train.jsonl", lb.tokenizer, 256, template)
    evals = load_examples(task / "eval.jsonl", lb.tokenizer, 256, template)[: args.eval_rows] if args.eval_rows else None
    sites = list(lb.family.default_targets)
    # built before get_peft_model, which injects IA3 layers into lb.model in place
    twin = EvalTwin(lb, sites) if evals and lb.quant in ("nf4", "gguf") else None
    modules, feedforward = peft_target_modules(lb.family, sites)
    model = get_peft_model(lb.model, IA3Config(task_type=lb.family.peft_task_type, target_modules=modules,
                                               feedforward_modules=feedforward))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(args.seed)
    pad = lb.tokenizer.pad_token_id if lb.tokenizer.pad_token_id is not None else lb.tokenizer.eos_token_id
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
    result = {
        "base": args.base, "quant": lb.quant, "task": args.data_dir or args.task, "lr": args.lr, "seed": args.seed,
        "steps": args.steps, "wall_seconds": round(wall, 2), "tokens_per_second": round(tokens / wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loss_curve": [round(x, 5) for x in losses]}
    if evals:
        scored = twin.sync(model) if twin else model
        result["eval_after"] = evaluate(scored, lb.tokenizer, evals, None, template)
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
