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
    "sentiment": ("I loved this phone, the battery lasts for days.", 1.0),
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
    ap.add_argument("--eval-rows", type=int, default=20, help="eval rows per task (training eval, report)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    import transformers

    from edgeia3.export import export_gguf, export_onnx
    from edgeia3.merge import merge
    from edgeia3.report import ReportOptions, report
    from edgeia3.run import describe_swap
    from edgeia3.runtimes import generate, open_runtime
    from edgeia3.train import TrainConfig, train

    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers/peft
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("gguf").setLevel(logging.WARNING)

    for task, (_, epochs) in TASKS.items():
        data = ROOT / "tasks" / task
        step(f"train IA3 '{task}' on the GGUF's own Q4_1 blocks", out / "adapters" / task,
             lambda: train("default", data / "train.jsonl", out / "adapters" / task,
                           eval_data=data / "eval.jsonl",
                           config=TrainConfig(epochs=epochs, max_eval=args.eval_rows)))
        tr = json.loads((out / "adapters" / task / "training.json").read_text())
        before, after = tr["eval_before"], tr["eval_after"]
        console.print(f"  {task}: exact match {before['accuracy']:.0%} -> {after['accuracy']:.0%} "
                      f"({tr['steps']} steps, {tr['wall_seconds']:.0f} s)")

    first = next(iter(TASKS))
    adapters = {t: str(out / "adapters" / t) for t in TASKS}
    step(f"merge '{first}' into the dequantized GGUF weights it was trained on (transformers)", out / f"merged-{first}",
         lambda: merge("default", adapters[first], out / f"merged-{first}"))

    exports = {
        "onnx-int4-side": lambda d: export_onnx("default", d, "int4", adapters=adapters),
        f"onnx-int4-merged-{first}": lambda d: export_onnx("default", d, "int4", adapters={first: adapters[first]},
                                                           merge=first),
        "gguf-q4_1-side": lambda d: export_gguf("default", d, adapters=adapters),
        f"gguf-q4_1-merged-{first}": lambda d: export_gguf("default", d, adapters={first: adapters[first]},
                                                           merge=first),
    }
    for name, fn in exports.items():
        step(f"export {name}", out / name, lambda fn=fn, name=name: console.print(f"  {fn(out / name)}"))

    console.rule("[bold]one prompt per task on each runtime, switching adapters without reloading")
    for name in ("onnx-int4-side", "gguf-q4_1-side"):
        rt = open_runtime(out / name)
        for task, (prompt, _) in TASKS.items():
            rt.use_adapter(task)
            msgs = [{"role": "system", "content": system_prompt(task)}, {"role": "user", "content": prompt}]
            console.print(f"  {rt.name:>17} [bold]{task:>9}[/]: {prompt!r} -> {generate(rt, msgs, 24)!r}")
        console.print(f"  [dim]{rt.name}: {describe_swap(rt)}[/]")
        getattr(rt, "close", lambda: None)()

    evals = {t: str(ROOT / "tasks" / t / "eval.jsonl") for t in TASKS}
    step("report: sizes, latency, drift vs PyTorch, accuracy", out / "report",
         lambda: report([out / n for n in exports], out / "report", evals,
                        ReportOptions(runs=3, eval_rows=args.eval_rows)))
    console.print(f"\nreport: [bold]{out / 'report' / 'report.md'}[/]")
    console.print((out / "report" / "report.md").read_text().split("## How to read this")[0])


if __name__ == "__main__":
    main()
