"""Training recipes, measured: accuracy of `edgeia3 train` recipes vs the plain PEFT loop.

For every task x budget x recipe x seed: `edgeia3 train --eval` on the example task
(examples/tasks/<task>), scored by exact match on the first --rows eval rows in PyTorch on the
model as trained (training.json's ``eval_after``: for a 4-bit base, the twin holding its
dequantized blocks); and the plain PEFT loop (bench/peft_loop.py: AdamW, constant lr, random
batches, fp32) at the same budget, scored by the same function. Budgets are optimizer steps
(``--max-steps``) or ``auto`` (the automatic schedule from the row count). Prints one table
(mean accuracy over seeds, [min-max] the spread) and writes every cell to <out>/sweep.json.
The stock-runtime check of a deployed recipe is bench/bench_deploy_accuracy.py.

    python bench/bench_sweep.py --out bench-out/sweep --budgets 60 --seeds 2 \\
        --recipe defaults --recipe "lr=6e-3,schedule=constant-decay" --recipe "lr=1e-2,schedule=constant-decay"
    python bench/bench_sweep.py --grid "lr=3e-3,6e-3,1e-2;schedule=linear,constant-decay,cosine;bf16=on,off"
    python bench/bench_sweep.py --base gemma3-270m --prompt-rows   # a base model: prompt/completion rows

Recipe keys: lr, schedule (constant, constant-decay, cosine, linear), warmup (fraction of the
steps), batch (rows per step), bf16 (on, off, auto); ``defaults`` is `edgeia3 train` with no
option (whatever its defaults are). Finished cells under --out are reused (delete to rerun);
``--report`` only prints the table of what is there. Seeds: ``2`` or ``2,100=1,auto=1`` (per
budget). ``--prompt-rows`` trains and scores every recipe on the tasks' rows as prompt/completion
rows (common.prompt_row, written under <out>/data), for a base model with no chat template of its
own, as bench_deploy_accuracy.py does. On a shared 2-core CPU, ``--jobs 2 --threads 1`` runs two
cells side by side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import header, prompt_rows, table

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"lr": "--lr", "schedule": "--schedule", "warmup": "--warmup", "batch": "--batch-size", "bf16": None}
PEFT = "peft-loop"


def parse_recipe(text: str) -> dict:
    """'lr=6e-3,schedule=constant-decay' -> {'lr': '6e-3', ...}; 'defaults' -> {}."""
    if text.strip() in ("", "defaults", "default"):
        return {}
    recipe = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key not in KEYS or not value:
            raise SystemExit(f"bad recipe part {part!r}: keys are {', '.join(KEYS)} (key=value)")
        if key == "bf16" and value not in ("on", "off", "auto"):
            raise SystemExit(f"bf16 must be on, off or auto (got {value})")
        recipe[key] = value
    return recipe


def parse_grid(text: str) -> list[dict]:
    """'lr=3e-3,6e-3;schedule=linear,cosine' -> the cartesian product of the listed values."""
    axes = []
    for axis in text.split(";"):
        key, _, values = axis.partition("=")
        axes.append([f"{key.strip()}={v.strip()}" for v in values.split(",")])
    return [parse_recipe(",".join(combo)) for combo in itertools.product(*axes)]


def recipe_name(recipe: dict) -> str:
    return "defaults" if not recipe else " ".join(f"{k}={v}" for k, v in recipe.items())


def recipe_args(recipe: dict) -> list[str]:
    args = []
    for key, value in recipe.items():
        if key == "bf16":
            args += [] if value == "auto" else ["--bf16" if value == "on" else "--no-bf16"]
        else:
            args += [KEYS[key], value]
    return args


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def seeds_for(spec: str, budget: str) -> int:
    """'2' -> 2 everywhere; '2,100=1,auto=1' -> 1 at 100 steps and auto, else 2."""
    default, per = 2, {}
    for part in spec.split(","):
        if "=" in part:
            b, n = part.split("=")
            per[b.strip()] = int(n)
        else:
            default = int(part)
    return per.get(budget, default)


def task_data(args, task: str) -> Path:
    """The folder of the task's train/eval.jsonl that every recipe trains on (with --prompt-rows,
    main writes it once before any cell starts)."""
    return Path(args.out) / "data" / task if args.prompt_rows else ROOT / "examples" / "tasks" / task


def auto_steps(data: Path, batch: int) -> int:
    from edgeia3.schedule import plan

    rows = sum(1 for line in (data / "train.jsonl").open() if line.strip())
    return plan(rows, batch).steps


def run(cmd: list[str], log: Path, threads: int | None) -> bool:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with log.open("w") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return proc.returncode == 0


def cell_dir(out: Path, task: str, budget: str, name: str, seed: int) -> Path:
    return out / "cells" / task / budget / slug(name) / f"seed{seed}"


def cell_command(args, task: str, budget: str, name: str, recipe: dict | None, seed: int, d: Path) -> list[str]:
    data = task_data(args, task)
    if recipe is None:  # the plain PEFT loop
        steps = auto_steps(data, 8) if budget == "auto" else int(budget)
        extra = shlex.split(args.train_args)
        template = extra[extra.index("--chat-template") + 1] if "--chat-template" in extra else None
        return [sys.executable, str(ROOT / "bench" / "peft_loop.py"), "--base", args.base, "--data-dir", str(data),
                "--steps", str(steps), "--lr", str(args.peft_lr), "--seed", str(seed), "--eval-rows",
                str(args.rows), "--out", str(d / "peft.json"), *(["--chat-template", template] if template else [])]
    budget_args = [] if budget == "auto" else ["--max-steps", budget]
    return [sys.executable, "-m", "edgeia3.cli", "train", "--base", args.base, "--data", str(data / "train.jsonl"),
            "--eval", str(data / "eval.jsonl"), "--max-eval", str(args.rows), "--out", str(d / "adapter"),
            "--seed", str(seed), "--quiet", *budget_args, *recipe_args(recipe), *shlex.split(args.train_args)]


def read_cell(d: Path) -> dict | None:
    """accuracy, eval loss, steps, seconds (training loop), early signal of a finished cell."""
    for f in (d / "adapter" / "training.json", d / "peft.json"):
        if f.exists():
            r = json.loads(f.read_text())
            ev = r.get("eval_after") or {}
            signal = r.get("early_signal")
            if signal:  # judged again from its recorded points, by this checkout's rule
                from edgeia3.schedule import early_signal

                signal = early_signal([tuple(x) for x in signal["points"]], r["steps"], signal["source"])
            return {"accuracy": ev.get("accuracy"), "eval_loss": ev.get("loss"), "steps": r["steps"],
                    "seconds": r["wall_seconds"], "s_per_step": round(r["wall_seconds"] / r["steps"], 3),
                    "final_loss": r["loss_curve"][-1], "early_signal": signal,
                    "bf16": r.get("bf16_autocast"), "config": r.get("config")}
    return None


def summarize(cells: list[dict], tasks: list[str], budgets: list[str], names: list[str]) -> list[dict]:
    rows = []
    for budget in budgets:
        loop_s = [c["s_per_step"] for c in cells if c["budget"] == budget and c["recipe"] == PEFT]
        for name in names:
            mine = [c for c in cells if c["budget"] == budget and c["recipe"] == name]
            if not mine:
                continue
            row = {"budget": budget, "recipe": name}
            means = []
            for task in tasks:
                accs = [100 * c["accuracy"] for c in mine if c["task"] == task and c["accuracy"] is not None]
                if accs:
                    means.append(statistics.mean(accs))
                    spread = f" [{min(accs):.0f}-{max(accs):.0f}]" if len(accs) > 1 else ""
                    row[task] = f"{means[-1]:.1f}{spread}"
                else:
                    row[task] = "-"
            row["mean"] = f"{statistics.mean(means):.1f}" if len(means) == len(tasks) else "-"
            row["seeds"] = "/".join(str(sum(1 for c in mine if c["task"] == t)) for t in tasks)
            sps = statistics.mean(c["s_per_step"] for c in mine)
            row["s/step"] = f"{sps:.2f}"
            row["loop s/step ÷"] = f"{statistics.mean(loop_s) / sps:.2f}x" if loop_s and name != PEFT else "-"
            signals = [c["early_signal"]["verdict"] for c in mine if c.get("early_signal")]
            row["early signal"] = ", ".join(f"{v} {signals.count(v)}" for v in sorted(set(signals))) or "-"
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench-out/sweep")
    ap.add_argument("--base", default="default", help="'default' (embedded SmolLM2), gemma3-270m, a dir or .gguf")
    ap.add_argument("--tasks", default="sentiment,intent,extract")
    ap.add_argument("--budgets", default="30,60,100,auto", help="optimizer steps, or auto")
    ap.add_argument("--recipe", action="append", default=[], help="lr=...,schedule=...,warmup=...,batch=...,bf16=...")
    ap.add_argument("--grid", default=None, help="'lr=a,b;schedule=c,d;...': every combination")
    ap.add_argument("--seeds", default="2", help="seeds per cell: N, or N,BUDGET=M,...")
    ap.add_argument("--rows", type=int, default=100, help="eval rows scored (the first N)")
    ap.add_argument("--no-peft", action="store_true", help="leave out the plain PEFT loop rows")
    ap.add_argument("--peft-lr", type=float, default=3e-3)
    ap.add_argument("--prompt-rows", action="store_true", help="train and score prompt/completion rows (a base model)")
    ap.add_argument("--train-args", default="", help="extra `edgeia3 train` options for every recipe")
    ap.add_argument("--jobs", type=int, default=1, help="cells run side by side")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each cell")
    ap.add_argument("--report", action="store_true", help="only print the table of the finished cells")
    ap.add_argument("--retry", action="store_true", help="rerun cells that were started but left no result")
    ap.add_argument("--reverse", action="store_true", help="run the cells in reverse order (a second sweep)")
    args = ap.parse_args()
    header("training recipes vs the plain PEFT loop")

    out = Path(args.out)
    tasks, budgets = args.tasks.split(","), args.budgets.split(",")
    recipes = [parse_recipe(r) for r in args.recipe] + (parse_grid(args.grid) if args.grid else [])
    recipes = recipes or [{}]
    named = {recipe_name(r): r for r in recipes}
    if not args.no_peft:
        named[PEFT] = None
    from edgeia3.schedule import DEFAULT_LR, DEFAULT_SCHEDULE, DEFAULT_WARMUP

    print(f"defaults: lr={DEFAULT_LR:g} schedule={DEFAULT_SCHEDULE} warmup={DEFAULT_WARMUP:g} batch=8 bf16=auto; "
          f"{PEFT}: AdamW lr={args.peft_lr:g} constant, random batches, fp32, batch 8\n", flush=True)
    # seed-major: a first full pass over every cell before the second seed
    todo = [(task, budget, name, seed) for seed in range(max(seeds_for(args.seeds, b) for b in budgets))
            for budget in budgets if seed < seeds_for(args.seeds, budget) for task in tasks for name in named]

    def do(cell) -> None:
        task, budget, name, seed = cell
        d = cell_dir(out, task, budget, name, seed)
        if read_cell(d) is not None or ((d / "log.txt").exists() and not args.retry):
            return  # done, or started by another sweep (running or failed: --retry reruns it)
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ok = run(cell_command(args, task, budget, name, named[name], seed, d), d / "log.txt", args.threads)
        got = read_cell(d) if ok else None
        acc = f"{got['accuracy']:.1%}" if got and got["accuracy"] is not None else "failed (see log.txt)"
        print(f"{task} {budget} {name} seed {seed}: {acc} in {time.perf_counter() - t0:.0f} s "
              f"({time.strftime('%H:%M:%S')})", flush=True)

    if not args.report:
        for task in tasks if args.prompt_rows else []:
            prompt_rows(ROOT / "examples" / "tasks" / task, task_data(args, task))
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(do, todo[::-1] if args.reverse else todo))
    cells = []
    for task, budget, name, seed in todo:
        got = read_cell(cell_dir(out, task, budget, name, seed))
        if got:
            cells.append({"task": task, "budget": budget, "recipe": name, "seed": seed, **got})
    rows = summarize(cells, tasks, budgets, list(named))
    (out / "sweep.json").write_text(json.dumps({"command": sys.argv, "base": args.base, "rows": args.rows,
                                                "cells": cells, "table": rows}, indent=1) + "\n")
    print(f"\nexact match on the first {args.rows} eval rows, %, mean over seeds [min-max]; "
          f"s/step: training loop only; loop s/step ÷: the PEFT loop's s/step over the recipe's (same budget)")
    if rows:
        print(table(rows))


if __name__ == "__main__":
    main()
