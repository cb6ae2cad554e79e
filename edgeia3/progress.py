"""A rich progress bar for training (loss, tokens/s), silent in quiet mode."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, quiet: bool = False):
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("|grad| {task.fields[gnorm]:.2e}"),
            TextColumn("{task.fields[tps]:.0f} tok/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), disable=quiet,
        )
        self.task = self.progress.add_task("train", total=total, loss=float("nan"), tps=0.0, gnorm=float("nan"))

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, tokens_per_s: float, grad_norm: float = float("nan")) -> None:
        self.progress.update(self.task, completed=step, loss=loss, tps=tokens_per_s, gnorm=grad_norm)

    def warn(self, text: str) -> None:
        if not self.quiet:
            self.progress.console.print(f"[yellow]warning:[/] {text}", highlight=False)
