"""The ``edgeia3`` command line: a thin layer over the Python API.

Every command calls the same function a Python user would; user errors
(EdgeIA3Error) print one line and exit with code 2.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import EdgeIA3Error

app = typer.Typer(
    help="edgeia3: train, merge, convert (ONNX, GGUF) and hot-swap IA3 adapters for on-device LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def user_errors(fn: Callable) -> Callable:
    """Turn EdgeIA3Error into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeIA3Error as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _quiet_libraries() -> None:
    """Keep transformers' progress bars and info logs out of CLI output."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command()
@user_errors
def merge(
    base: str = typer.Option("default", help="'default' (embedded SmolLM2), a model dir, a .gguf or a hub id"),
    adapter: Path = typer.Option(..., help="IA3 adapter: edgeia3 dir/file or a PEFT IA3 dir"),
    out: Path = typer.Option(..., help="output transformers model directory"),
    into: str = typer.Option("auto", help="auto (follow the adapter's training quantization), full or nf4"),
) -> None:
    """Fold an IA3 adapter into the base weights and save a transformers model."""
    from .merge import merge as merge_fn

    _quiet_libraries()
    with console.status("merging..."):
        res = merge_fn(base=base, adapter=adapter, out=out, into=into)
    console.print(
        f"merged {res.adapter.num_params:,} IA3 parameters ({', '.join(res.adapter.sites)}) into "
        f"{res.into} -> [bold]{res.out}[/] in {res.seconds:.1f} s"
    )


@app.command()
@user_errors
def inspect(path: Path = typer.Argument(..., help="adapter, model dir, .gguf or ONNX export")) -> None:
    """Describe what an adapter, model directory, GGUF or ONNX export holds."""
    from .inspect import describe

    info = describe(path)
    table = Table(title=str(path), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in info.items():
        if v is not None:
            table.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    console.print(table)


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
