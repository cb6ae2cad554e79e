"""End-to-end demo on the embedded SmolLM2-135M-Instruct, offline.

Each step writes its output under --out and is skipped on a second run when
its output already exists, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent
TASKS = {  # task -> (demo prompt, training epochs for the short demo run)
    "sentiment": ("The battery life of this phone was not bad at all.", 1.0),
    "intent": ("Could you switch off the lights in the bedroom?", 1.0),
}
console = Console()


def step(title: str, done: Path, fn) -> None:
    """Run ``fn`` unless ``done`` exists; say which."""
    if done.exists():
        console.print(f"[green]✓[/] {title} [dim](reused {done})[/]")
        return
    console.rule(f"[bold]{title}")
    t0 = time.perf_counter()
    fn()
    console.print(f"[green]✓[/] {title} [dim]({time.perf_counter() - t0:.0f} s)[/]")


def system_prompt(task: str) -> str:
    first = json.loads((ROOT / "tasks" / task / "eval.jsonl").read_text().splitlines()[0])
    return first["messages"][0]["content"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo-out"))
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    import transformers

    from edgeia3 import load_adapter_for, load_base
    from edgeia3.merge import merge
    from edgeia3.runtimes import generate
    from edgeia3.runtimes.torch_runtime import TorchRuntime
    from edgeia3.train import TrainConfig, train

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    for task, (_, epochs) in TASKS.items():
        data = ROOT / "tasks" / task
        step(f"train IA3 '{task}' on the NF4 base", out / "adapters" / task,
             lambda: train("default", data / "train.jsonl", out / "adapters" / task,
                           eval_data=data / "eval.jsonl", quant="nf4",
                           config=TrainConfig(epochs=epochs, max_eval=50)))
        report = json.loads((out / "adapters" / task / "training.json").read_text())
        before, after = report["eval_before"], report["eval_after"]
        console.print(f"  {task}: exact match {before['accuracy']:.0%} -> {after['accuracy']:.0%} "
                      f"({report['steps']} steps, {report['wall_seconds']:.0f} s)")

    first = next(iter(TASKS))
    step(f"merge '{first}' into the dequantized NF4 weights", out / f"merged-{first}",
         lambda: merge("default", out / "adapters" / first, out / f"merged-{first}"))

    console.rule("[bold]answer one prompt per task, switching adapters without reloading")
    base = load_base("default")
    rt = TorchRuntime(base, {t: load_adapter_for(out / "adapters" / t, base) for t in TASKS})
    for task, (prompt, _) in TASKS.items():
        rt.use_adapter(task)
        msgs = [{"role": "system", "content": system_prompt(task)}, {"role": "user", "content": prompt}]
        console.print(f"  [bold]{task}[/] torch   : {prompt!r} -> {generate(rt, msgs, 24)!r}")


if __name__ == "__main__":
    main()
