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

from edgeia3.converters.gguf.file_types import EXPORT_QUANTS, choices

from .errors import EdgeIA3Error
from .schedule import DEFAULT_LR, DEFAULT_SCHEDULE, DEFAULT_WARMUP

app = typer.Typer(
    help="edgeia3: train, merge, convert (ONNX, GGUF) and hot-swap IA3 adapters for on-device LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
export_app = typer.Typer(help="Convert a base (+ IA3 adapters) to ONNX, GGUF or a browser folder.", no_args_is_help=True)
app.add_typer(export_app, name="export")
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
    import logging
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers/peft
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # gguf-py's writer logs every file at INFO
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


CHAT_TEMPLATE_HELP = ("chat template for chat rows/messages: 'chatml' or a Jinja file (default: the adapter's "
                      "recorded one, else the model's own)")


@app.command()
@user_errors
def train(
    data: Path = typer.Option(..., help="training JSONL (messages | prompt/completion | text rows)"),
    out: Path = typer.Option(..., help="output adapter directory"),
    base: str = typer.Option("default", help="'default' (SmolLM2), 'gemma3-270m' (Gemma 3 270M), a model dir, a .gguf or a hub id"),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="eval JSONL (loss, exact-match accuracy)"),
    quant: str = typer.Option(
        "auto", help="auto (a GGUF base: its own quantized tensors; a transformers base: q4_0), gguf, "
        "a llama.cpp type (q4_0, q8_0, q4_k_m, ...: quantized once, deployed as is), nf4 or none; "
        "T5 / Flan-T5 (encoder-decoder: prompt -> encoder, completion -> decoder) trains on none only"),
    epochs: Optional[float] = typer.Option(None, help="passes over the training data (default: from the row "
                                           "count, at least 100 steps and 1 epoch)"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many optimizer steps (wins over --epochs)"),
    batch_size: int = typer.Option(8, help="rows per step (per process)"),
    max_length: int = typer.Option(256, help="truncate rows to this many tokens"),
    lr: float = typer.Option(DEFAULT_LR, help="AdamW learning rate (the peak, after warm-up)"),
    schedule: str = typer.Option(DEFAULT_SCHEDULE, help="learning-rate shape after warm-up: constant, constant-decay "
                                 "(constant, then linear to 0 over the last 20% of steps), cosine (to 0) or "
                                 "linear (to 10% of --lr)"),
    warmup: float = typer.Option(DEFAULT_WARMUP, help="warm-up: this fraction of the steps (at least 1 step), lr rising "
                                 "linearly to --lr"),
    seed: int = typer.Option(0, help="random seed"),
    targets: Optional[str] = typer.Option(None, help="comma-separated IA3 sites, e.g. k,v,down (default: registry)"),
    max_eval: Optional[int] = typer.Option(None, help="use only the first N eval rows"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast for the matmuls (default: "
                                        "on where the hardware has bf16 arithmetic, e.g. AVX512-BF16)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    force: bool = typer.Option(False, "--force", help="replace --out if it already exists (atomically, once done)"),
    chat_template: Optional[str] = typer.Option(None, help=CHAT_TEMPLATE_HELP + "; recorded in the adapter"),
) -> None:
    """Train an IA3 adapter on a frozen (4-bit by default) base."""
    from .train import TrainConfig, train as train_fn

    _quiet_libraries()
    cfg = TrainConfig(lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, max_length=max_length,
                      seed=seed, targets=targets.split(",") if targets else None, max_eval=max_eval,
                      bf16=bf16, schedule=schedule, warmup_ratio=warmup)
    res = train_fn(base=base, data=data, out=out, eval_data=eval_data, quant=quant, config=cfg, quiet=quiet,
                   force=force, chat_template=chat_template)
    if not quiet and res.main_process:
        console.print(f"trained {res.adapter.num_params:,} IA3 parameters in {res.steps} steps, "
                      f"{res.seconds:.0f} s ({res.tokens_per_s:.0f} tok/s); loss "
                      f"{res.loss_curve[0]:.3f} -> {res.loss_curve[-1]:.3f} -> [bold]{res.out}[/]")
        for label, ev in (("before", res.eval_before), ("after", res.eval_after)):
            if ev:
                acc = f", accuracy {ev['accuracy']:.1%}" if "accuracy" in ev else ""
                console.print(f"eval {label}: loss {ev['loss']:.3f}{acc}")
        if res.early_signal:
            console.print(f"early signal: {res.early_signal['message']}", highlight=False)


@app.command()
@user_errors
def merge(
    base: str = typer.Option("default", help="'default' (SmolLM2), 'gemma3-270m' (Gemma 3 270M), a model dir, a .gguf or a hub id"),
    adapter: Path = typer.Option(..., help="IA3 adapter: edgeia3 dir/file or a PEFT IA3 dir"),
    out: Path = typer.Option(..., help="output transformers model directory"),
    into: str = typer.Option("auto", help="auto (follow the adapter's training quantization), full, nf4 or gguf (the dequantized GGUF blocks it was trained on)"),
    force: bool = typer.Option(False, "--force", help="replace --out if it already exists (atomically, once done)"),
) -> None:
    """Fold an IA3 adapter into the base weights and save a transformers model."""
    from .merge import merge as merge_fn

    _quiet_libraries()
    with console.status("merging..."):
        res = merge_fn(base=base, adapter=adapter, out=out, into=into, force=force)
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


@app.command()
@user_errors
def report(
    exports: list[Path] = typer.Argument(..., help="export directories (ONNX, GGUF, web: run in headless Chromium)"),
    out: Path = typer.Option(..., help="report directory (report.md, report.json, PNG charts)"),
    eval_data: Optional[list[str]] = typer.Option(None, "--eval", help="ADAPTER=data.jsonl: task accuracy"),
    runs: int = typer.Option(5, help="timed runs per latency figure (after one warm-up)"),
    eval_rows: int = typer.Option(50, help="eval rows per adapter for accuracy"),
    force: bool = typer.Option(False, "--force", help="replace --out if it already exists (atomically, once done)"),
) -> None:
    """Measure sizes, latencies and drift of exports against PyTorch; write a report."""
    from .atomic import atomic_dir, check_out
    from .report import ReportOptions, report as report_fn

    check_out(out, force)  # before measuring: refuse a non-empty --out unless --force
    _quiet_libraries()
    # report() writes its directory (atomically) into our empty temp one; ours then
    # replaces --out, so --force swaps the old report out only once the new one is complete.
    with console.status("measuring..."), atomic_dir(out, force=force) as tmp:
        report_fn(exports, tmp, parse_named(eval_data, "--eval"), ReportOptions(runs=runs, eval_rows=eval_rows))
    console.print(f"wrote {out / 'report.md'}, {out / 'report.json'} and charts")


def parse_named(pairs: list[str] | None, what: str) -> dict[str, str]:
    """``NAME=PATH`` options into a dict, with one clear error for a bad pair."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise EdgeIA3Error(f"{what} must look like NAME=PATH, got '{pair}'")
        out[name] = value
    return out


@app.command()
@user_errors
def run(
    model: Path = typer.Option(..., help="transformers dir, ONNX export dir or GGUF export dir"),
    prompt: str = typer.Option(..., help="the user message (rendered with the chat template)"),
    adapter: Optional[str] = typer.Option(None, help="name of the adapter to activate (default: base)"),
    attach: Optional[list[str]] = typer.Option(None, "--with", help="NAME=ADAPTER_PATH to attach (torch)"),
    max_tokens: int = typer.Option(64, help="maximum new tokens"),
    raw: bool = typer.Option(False, help="send the prompt as plain text, without the chat template"),
    chat_template: Optional[str] = typer.Option(None, help=CHAT_TEMPLATE_HELP),
) -> None:
    """Answer a prompt with an adapter active (greedy decoding)."""
    from .run import run as run_fn

    _quiet_libraries()
    res = run_fn(model, prompt, adapter=adapter, max_tokens=max_tokens, chat=not raw,
                 adapters=parse_named(attach, "--with"), chat_template=chat_template)
    err_console.print(f"[dim]{res.runtime}, adapter {res.adapter or '(none: base)'}: {res.how}[/]",
                      highlight=False)
    # the answer as is on stdout: one trailing newline, never re-wrapped to the terminal width
    sys.stderr.flush()
    sys.stdout.write(res.text + "\n")
    sys.stdout.flush()


@export_app.command("onnx")
@user_errors
def export_onnx(
    base: str = typer.Option("default", help="'default', 'gemma3-270m', a model dir, a .gguf or a hub id"),
    out: Path = typer.Option(..., help="output directory (opens with onnxruntime_genai.Model)"),
    precision: str = typer.Option("int4", help="int4, int8, fp16 or fp32"),
    adapter: Optional[list[str]] = typer.Option(None, help="NAME=ADAPTER_DIR, repeatable"),
    merge: Optional[str] = typer.Option(None, help="fold adapter NAME into the weights"),
    provider: str = typer.Option("cpu", help="cpu or cuda"),
    mobile: bool = typer.Option(False, help="also convert to ORT format and check mobile op coverage"),
    fuse_qkv: bool = typer.Option(True, help="keep the builder's fused q/k/v projection (one IA3 input per layer)"),
    accuracy_level: Optional[int] = typer.Option(None, help="int4/int8 compute: 4 = int8 activations (builder "
                                                 "default), 1 = fp32"),
    weights: str = typer.Option("auto", help="int4/int8 weights: auto (a GGUF's own blocks when the base or the "
                                "adapters' training has one), builder (its own int4) or a llama.cpp type (q4_0, ...)"),
    strict: bool = typer.Option(False, help="refuse adapters trained on other weights than the export runs"),
    force: bool = typer.Option(False, "--force", help="replace --out if it already exists (atomically, once done)"),
) -> None:
    """Export to ONNX (onnxruntime-genai) with IA3 side-tensors or a merged adapter."""
    from .export import export_onnx as fn

    _quiet_libraries()
    res = fn(base=base, out=out, precision=precision, adapters=parse_named(adapter, "--adapter"),
             merge=merge, provider=provider, mobile=mobile, fuse_qkv=fuse_qkv, accuracy_level=accuracy_level,
             force=force, weights=weights, strict=strict)
    console.print(str(res))


@export_app.command("gguf")
@user_errors
def export_gguf(
    base: str = typer.Option("default", help="'default', 'gemma3-270m', a model dir or a .gguf"),
    out: Path = typer.Option(..., help="output directory"),
    quant: Optional[str] = typer.Option(None, help=f"{choices(EXPORT_QUANTS)}; default: what the adapters were "
                                        "trained on (a .gguf base: the file as is; else q4_0)"),
    adapter: Optional[list[str]] = typer.Option(None, help="NAME=ADAPTER_DIR, repeatable"),
    merge: Optional[str] = typer.Option(None, help="fold adapter NAME into the quantized weights"),
    strict: bool = typer.Option(False, help="refuse adapters trained on other weights than the export runs"),
    force: bool = typer.Option(False, "--force", help="replace --out if it already exists (atomically, once done)"),
) -> None:
    """Export to GGUF (llama.cpp) with IA3 adapter files or an exact merge."""
    from .export import export_gguf as fn

    _quiet_libraries()
    res = fn(base=base, out=out, quant=quant, adapters=parse_named(adapter, "--adapter"), merge=merge, force=force,
             strict=strict)
    console.print(str(res))


@export_app.command("web")
@user_errors
def export_web(
    base: str = typer.Option("default", help="'default', 'gemma3-270m', a model dir, a .gguf or a hub id"),
    out: Path = typer.Option(..., help="output directory: a static folder to serve (index.html, edgeia3.js)"),
    adapter: Optional[list[str]] = typer.Option(None, help="NAME=ADAPTER_DIR, repeatable"),
    precision: str = typer.Option("int4", help="int4, int8 or fp32"),
    matmul: str = typer.Option("dequantize", help="int4/int8 matmuls in the browser: dequantize (DequantizeLinear + "
                               "MatMul folded to fp32 at load: the exact weights, fast, more memory), int8 (re-rounded "
                               "to int8 per column: faster, half the memory, but not the trained grid - measured 94% "
                               "-> 46% on a sentiment adapter), nbits "
                               "(MatMulNBits: small, slow) or dequantize-fold"),
    weights: str = typer.Option("auto", help="as `export onnx --weights`"),
    accuracy_level: Optional[int] = typer.Option(None, help="as `export onnx --accuracy-level` (nbits only)"),
    strict: bool = typer.Option(False, help="refuse adapters trained on other weights than the export runs"),
    force: bool = typer.Option(False, "--force", help="replace --out if it already exists (atomically, once done)"),
) -> None:
    """Export for the browser (onnxruntime-web): model, adapters, tokenizer, JS runtime and a demo page."""
    from .web import export_web as fn

    _quiet_libraries()
    res = fn(base=base, out=out, adapters=parse_named(adapter, "--adapter"), precision=precision, matmul=matmul,
             weights=weights, accuracy_level=accuracy_level, strict=strict, force=force)
    console.print(str(res))


@app.command()
@user_errors
def serve(
    model: Path = typer.Option(..., help="ONNX or GGUF export dir (a transformers dir also works)"),
    host: str = typer.Option("127.0.0.1", help="address to bind (default: this machine only)"),
    port: int = typer.Option(8000, help="TCP port"),
    api_key: Optional[str] = typer.Option(None, envvar="EDGEIA3_API_KEY",
                                          help="require 'Authorization: Bearer KEY' (or set EDGEIA3_API_KEY)"),
    adapters_dir: Optional[Path] = typer.Option(None, help="load every adapter in DIR at start (NAME/, "
                                                "NAME.ia3.gguf, NAME.onnx_adapter, NAME.safetensors); "
                                                "POST /v1/adapters then only accepts paths inside DIR "
                                                "(without DIR it refuses every path)"),
    insecure: bool = typer.Option(False, "--insecure", help="allow a --host beyond this machine without "
                                  "--api-key"),
    max_adapters: int = typer.Option(64, help="adapters served at once (the export's and DIR's included); "
                                     "POST /v1/adapters beyond it gets 400"),
    max_queue: int = typer.Option(64, help="requests that may wait; more get 429"),
    max_tokens: int = typer.Option(1024, help="cap on a request's max_tokens (and the chat default)"),
    max_prompt_tokens: int = typer.Option(4096, help="cap on prompt tokens (the model's context caps too)"),
    max_body_bytes: int = typer.Option(1 << 20, help="cap on a request body; more get 413"),
    max_group_wait: float = typer.Option(1.0, help="seconds a request for another adapter may wait while "
                                         "requests for the active adapter are served first"),
    max_batch: int = typer.Option(16, help="requests decoded together in one batch (ONNX: each with its own "
                                  "adapter; GGUF: requests for one adapter, KV for a full context per "
                                  "row allocated up front); 1: one at a time"),
    max_failures: int = typer.Option(8, help="requests failing inside the server in a row (500s, none "
                                     "completing) after which the runtime counts as unusable: /health and "
                                     "every request get 503"),
    threads: Optional[int] = typer.Option(None, help="compute threads (ONNX: the batched session's intra-op "
                                          "threads, default half the cores as onnxruntime-genai; GGUF: llama.cpp's, "
                                          "default every core)"),
    provider: Optional[str] = typer.Option(None, help="onnxruntime execution provider (ONNX exports)"),
    log_level: str = typer.Option("warning", help="uvicorn log level (info shows each request)"),
    chat_template: Optional[str] = typer.Option(None, help=CHAT_TEMPLATE_HELP + "; for every adapter"),
) -> None:
    """Serve an export over a local OpenAI-compatible HTTP API; the request's model picks the adapter."""
    from .serve import Limits
    from .serve import serve as serve_fn

    _quiet_libraries()
    for name, value in (("--max-queue", max_queue), ("--max-tokens", max_tokens),
                        ("--max-prompt-tokens", max_prompt_tokens), ("--max-body-bytes", max_body_bytes),
                        ("--max-batch", max_batch), ("--max-adapters", max_adapters),
                        ("--max-failures", max_failures), ("--threads", 1 if threads is None else threads)):
        if value < 1:
            raise EdgeIA3Error(f"{name} must be at least 1")
    limits = Limits(max_queue=max_queue, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
                    max_body_bytes=max_body_bytes, max_group_wait=max_group_wait, max_batch=max_batch,
                    max_adapters=max_adapters, max_failures=max_failures)
    serve_fn(model, host=host, port=port, api_key=api_key, adapters_dir=adapters_dir, limits=limits,
             provider=provider, log_level=log_level, chat_template=chat_template, insecure=insecure, threads=threads,
             announce=lambda msg: err_console.print(msg, highlight=False, markup=False, soft_wrap=True))


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
