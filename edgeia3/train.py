"""Train step: IA3 on a frozen (by default 4-bit) base from JSONL data.

Decoder-only and encoder-decoder (T5, full precision) models run the same loop; what
differs (encoding, batches, loss, evaluation) is their ``tasks.Task``, chosen once per run.
train() is setup (``_setup``), the loop (``_fit``), evaluation before and after, and saving.

Runs on CPU or GPU, single process or under ``accelerate launch``. Guards
against the silent failures IA3 training is prone to: missing gradients,
vectors that stop moving (the bitsandbytes CPU repack bug, FACTS.md) and
non-finite loss all stop the run with a message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import seq2seq
from .adapter import IA3Adapter
from .atomic import atomic_dir, check_out
from .base import DEFAULT_BASE, LoadedBase, load_base
from .data import IGNORE, Example
from .errors import EdgeIA3Error
from .formats.peft_dir import write_peft_dir
from .peft_model import EvalTwin, adapter_from_peft, ia3_params, wrap_with_ia3
from .schedule import (DEFAULT_LR, DEFAULT_SCHEDULE, DEFAULT_WARMUP, SCHEDULES, Schedule, checkpoint_steps,
                       early_signal, plan, quarter_means)
from .tasks import Task, task_for



@dataclass
class TrainConfig:
    lr: float = DEFAULT_LR
    # Neither set: steps chosen from the row count (schedule.plan: many epochs of a few dozen
    # rows, ~1 epoch of thousands). --max-steps wins over --epochs.
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0
    grad_clip: float = 1.0
    warmup_ratio: float = DEFAULT_WARMUP
    # The learning-rate shape after warm-up: constant, constant-decay, cosine or linear (schedule.py).
    schedule: str = DEFAULT_SCHEDULE
    targets: list[str] | None = None  # site names; default: the registry's
    eval_accuracy: bool | None = None  # None: when the eval answers are short labels
    max_eval: int | None = None  # cap eval rows (speed)
    # bf16 autocast for the forward/backward matmuls (weights stay the exact dequantized
    # values; only the compute rounds). None: on where the hardware has bf16 arithmetic.
    bf16: bool | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """One EdgeIA3Error for the first out-of-range value, named as the CLI spells it."""
        def bad(option: str, rule: str, value: Any) -> None:
            raise EdgeIA3Error(f"{option} must be {rule} (got {value})")

        def real(x: Any) -> bool:
            return isinstance(x, numbers.Real) and not isinstance(x, bool)

        def whole(x: Any) -> bool:
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        # lr=inf is allowed on purpose: the non-finite-loss guard is tested with it.
        if not real(self.lr) or not self.lr > 0:
            bad("--lr", "> 0", self.lr)
        if self.epochs is not None and (not real(self.epochs) or not 0 < self.epochs < math.inf):
            bad("--epochs", "a finite number > 0", self.epochs)
        if self.max_steps is not None and (not whole(self.max_steps) or self.max_steps < 1):
            bad("--max-steps", ">= 1", self.max_steps)
        if not whole(self.batch_size) or self.batch_size < 1:
            bad("--batch-size", ">= 1", self.batch_size)
        if not whole(self.max_length) or self.max_length < 8:
            bad("--max-length", ">= 8", self.max_length)
        if self.max_eval is not None and (not whole(self.max_eval) or self.max_eval < 1):
            bad("--max-eval", ">= 1", self.max_eval)
        if not real(self.grad_clip) or not self.grad_clip > 0:
            bad("grad_clip", "> 0", self.grad_clip)
        if not real(self.warmup_ratio) or not 0 <= self.warmup_ratio <= 1:
            bad("--warmup", "between 0 and 1", self.warmup_ratio)
        if self.schedule not in SCHEDULES:
            bad("--schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        if self.targets and not all(isinstance(t, str) and t.strip() for t in self.targets):
            bad("--targets", "comma-separated site names", ",".join(map(str, self.targets)))


@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float
    tokens_per_s: float
    loss_curve: list[float]
    eval_before: dict | None
    eval_after: dict | None
    adapter: IA3Adapter = field(repr=False)
    main_process: bool = True  # False on the other ranks of a multi-process run
    memory: dict = field(default_factory=dict)  # MB: base weights, RSS when the loop starts
    grad_norms: list[float] = field(default_factory=list)  # IA3 gradient norm per step (before clipping)
    warnings: list[str] = field(default_factory=list)
    schedule: dict = field(default_factory=dict)  # schedule.Schedule: steps, epochs, warm-up, why
    early_signal: dict | None = None  # schedule.early_signal: still improving / plateaued at step N / ...


# Eval rows whose loss the early signal measures at each checkpoint (schedule.checkpoint_steps).
# Measured cost on SmolLM2 (busy 2-core CPU): 32 rows in fp32 with the full LM head at 5 points
# took a third of a 60-step run; 16 rows with the training's own loss and autocast, a few steps' worth.
PROBE_ROWS = 16

# Healthy band of the IA3 gradient norm (all vectors together, before clipping). Measured on
# SmolLM2 and the tiny test models at the default lr: ~1e-3 .. 10. Outside it training
# stalls (vanishing: e.g. a frozen base path) or diverges (exploding: lr too high, bad data).
GRAD_NORM_BAND = (1e-6, 1e3)


def gradient_trouble(norm: float) -> str | None:
    """"non-finite", "vanishing" or "exploding" when the norm leaves the healthy band, else None."""
    low, high = GRAD_NORM_BAND
    if not math.isfinite(norm):
        return "non-finite"
    return "vanishing" if norm < low else "exploding" if norm > high else None


def gradient_warning(step: int, norm: float) -> str | None:
    """A warning when the IA3 gradient norm leaves the healthy band (None: healthy)."""
    low, high = GRAD_NORM_BAND
    return {
        "non-finite": f"step {step}: IA3 gradient norm is {norm}; updates are skipped or corrupt",
        "vanishing": f"step {step}: IA3 gradient norm {norm:.1e} < {low:.0e} (vanishing): the vectors barely "
                     "move; check that the loss covers the answers and the sites are on the path",
        "exploding": f"step {step}: IA3 gradient norm {norm:.1e} > {high:.0e} (exploding; clipped to "
                     "--grad-clip): lower --lr or check the data",
    }.get(gradient_trouble(norm))


def bf16_supported(device: torch.device) -> bool:
    """bf16 matmuls pay off: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


class _Guard:
    """Fails the run loudly when IA3 training silently stops learning."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.last = {n: p.detach().clone() for n, p in params.items()}

    def check_grads(self, step: int) -> None:
        missing = [n for n, p in self.params.items() if p.grad is None]
        if missing:
            raise EdgeIA3Error(
                f"step {step}: {len(missing)} IA3 vectors received no gradient (e.g. {missing[0]}); "
                "training would silently stall (bitsandbytes CPU repack bug? see FACTS.md)")

    def check_moved(self, step: int) -> None:
        moved = max(float((p.detach() - self.last[n]).abs().max()) for n, p in self.params.items())
        if moved == 0.0:
            raise EdgeIA3Error(f"step {step}: the IA3 vectors did not change since the last check; "
                               "training is frozen")
        self.last = {n: p.detach().clone() for n, p in self.params.items()}


@dataclass
class _Data:
    """The encoded rows of a run and the chat template they were rendered with."""
    train_set: list[Example]
    eval_set: list[Example] | None
    template: str | None  # what chat rows render with
    recorded: str | None  # the template recorded in the adapter (None: none is)
    source: str | None  # where the recorded one came from: the given name or file, "base" or "seq2seq-flat"


def _load_data(task: Task, lb: LoadedBase, cfg: TrainConfig, data: str | Path, eval_data: str | Path | None,
               given: str | None, chat_template: str | Path | None) -> _Data:
    tok = lb.tokenizer
    own = getattr(tok, "chat_template", None)
    template = task.chat_template(given, tok)
    train_set = task.load_examples(data, tok, cfg.max_length, template)
    eval_set = task.load_examples(eval_data, tok, cfg.max_length, template) if eval_data else None
    # Recorded when given, or when the base's own rendered chat rows (it may change or be lost later).
    chat_rows = any(not isinstance(e.prompt, str) for e in train_set + (eval_set or []))
    recorded = template if given or (template and chat_rows) else None
    if eval_set and cfg.max_eval:
        eval_set = eval_set[: cfg.max_eval]
    # Neither given nor the base's own: the encoder-decoder task's flat fallback (seq2seq.FLAT_CHAT).
    source = (str(chat_template) if given else "base" if own else "seq2seq-flat") if recorded else None
    return _Data(train_set, eval_set, template, recorded, source)


@dataclass
class _Run:
    """A run set up to train: the loaded base, its task, data, IA3 model and optimizer."""
    cfg: TrainConfig
    acc: Any  # accelerate.Accelerator
    lb: LoadedBase
    task: Task
    sites: list[str]
    data: _Data
    twin: EvalTwin | None
    model: Any
    params: dict[str, torch.nn.Parameter]
    optim: torch.optim.Optimizer
    schedule: Schedule
    use_bf16: bool
    weights_mb: float

    @property
    def pad(self) -> int:
        tok = self.lb.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def eval_model(self) -> Any:
        """The model as trained so far; on the full-precision twin of a 4-bit base where there is one."""
        trained = self.acc.unwrap_model(self.model)
        return self.twin.sync(trained) if self.twin else trained

    def evaluate(self) -> dict | None:
        """The eval report now (None: no eval rows, or not the main process)."""
        if not self.data.eval_set or not self.acc.is_main_process:
            return None
        return self.task.evaluate(self.eval_model(), self.lb.tokenizer, self.data.eval_set, self.cfg.eval_accuracy,
                                  self.data.template)


def _setup(base: str, quant: str, cfg: TrainConfig, acc: Any, data: str | Path, eval_data: str | Path | None,
           given: str | None, chat_template: str | Path | None) -> _Run:
    """Seed, load the base, pick its task once, encode the rows, wrap the model, plan the steps."""
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    lb = load_base(base, quant=seq2seq.training_quant(base, quant))  # encoder-decoder: fp32 only
    fam = lb.family
    task = task_for(fam, acc.num_processes)
    task.check_loaded(lb)
    sites = list(cfg.targets or fam.default_targets)
    for s in sites:
        fam.site(s)  # unknown site names fail here, with the list of known ones
    ds = _load_data(task, lb, cfg, data, eval_data, given, chat_template)
    packed = sum(m.packed.nbytes for m in lb.model.modules() if hasattr(m, "packed"))  # GGUF blocks
    weights_mb = (lb.model.get_memory_footprint() + packed) / 2**20
    # Built before wrap_with_ia3, which injects IA3 layers into lb.model in place.
    twin = EvalTwin(lb, sites) if lb.quant in ("nf4", "gguf") and ds.eval_set and acc.is_main_process else None
    model = wrap_with_ia3(lb, sites)
    params = ia3_params(model)
    optim = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.0)
    model, optim = acc.prepare(model, optim)
    # Planned from the largest shard, so every process runs the same number of steps.
    schedule = plan(math.ceil(len(ds.train_set) / acc.num_processes), cfg.batch_size, cfg.epochs, cfg.max_steps,
                    cfg.warmup_ratio, cfg.schedule)
    use_bf16 = bf16_supported(acc.device) if cfg.bf16 is None else cfg.bf16
    return _Run(cfg, acc, lb, task, sites, ds, twin, model, params, optim, schedule, use_bf16, weights_mb)


class _Probe:
    """The early signal's eval points: the eval loss of the first PROBE_ROWS eval rows at a few
    checkpoints (a task with a probe, main process); none otherwise, and the early signal reads
    the training loss's quarter means. Not counted as training time."""

    def __init__(self, run: _Run):
        self.run = run
        rows = run.data.eval_set
        self.rows = rows[:PROBE_ROWS] if rows and run.acc.is_main_process and run.task.probe_loss else None
        self.checkpoints = set(checkpoint_steps(run.schedule.steps)) if self.rows else set()
        self.points: list[tuple[int, float]] = []
        self.seconds = 0.0

    def measure(self, at: int) -> None:
        t = time.perf_counter()
        m = self.run.eval_model()
        was = m.training
        m.eval()
        self.points.append((at, self.run.task.probe_loss(m, self.rows, self.run.pad, self.run.acc.device,
                                                         self.run.use_bf16)))
        m.train(was)
        self.seconds += time.perf_counter() - t

    def signal(self, answer_losses: list[float]) -> dict | None:
        """schedule.early_signal on the eval points, else on the training loss."""
        total = self.run.schedule.steps
        if self.points:
            signal = early_signal(self.points, total, "eval loss")
        else:
            signal = early_signal(quarter_means(answer_losses), total, "training loss")
        if signal is not None:
            extra = {"probe_rows": len(self.rows), "probe_seconds": round(self.seconds, 2)} if self.points else {}
            signal = {**signal, **extra}
        return signal


@dataclass
class _Fit:
    """What the training loop measured."""
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    rss_start_mb: float = 0.0
    losses: list[float] = field(default_factory=list)
    answer_losses: list[float] = field(default_factory=list)  # per step: the loss per answer (x labelled/row)
    grad_norms: list[float] = field(default_factory=list)  # IA3 gradient L2 norm per step, before clipping
    warnings: list[str] = field(default_factory=list)
    troubles: set[str] = field(default_factory=set)
    signal: dict | None = None

    def grad_norm(self, step: int, norm: float) -> str | None:
        """Record a step's gradient norm; a warning at the first step of each kind of trouble."""
        self.grad_norms.append(norm)
        trouble = gradient_trouble(norm)
        if trouble and trouble not in self.troubles:
            self.troubles.add(trouble)
            self.warnings.append(gradient_warning(step, norm))
            return self.warnings[-1]
        return None


def _backward(run: _Run, guard: _Guard, step: int, ids: torch.Tensor, mask: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Forward and backward of one batch: its loss and the IA3 gradient norm (then clipped)."""
    acc = run.acc
    run.model.train()
    # DDP syncs gradients only through its own forward: the task's loss there is the plain one
    with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
        loss = run.task.loss(run.model, ids, mask, labels)
    if not torch.isfinite(loss):
        raise EdgeIA3Error(f"step {step}: loss is {loss.item()}; stopping (try a lower --lr or check the data)")
    acc.backward(loss)
    guard.check_grads(step)
    return loss, float(acc.clip_grad_norm_(list(run.params.values()), run.cfg.grad_clip))


def _update(run: _Run, step: int) -> None:
    for g in run.optim.param_groups:
        g["lr"] = run.cfg.lr * run.schedule.lr_factor(step)
    run.optim.step()
    run.optim.zero_grad(set_to_none=True)


def _fit(run: _Run, quiet: bool) -> _Fit:
    """The training loop: the planned steps over this process's shard, guarded, with progress."""
    import psutil

    from .progress import TrainProgress

    acc, cfg, task, total = run.acc, run.cfg, run.task, run.schedule.steps
    probe = _Probe(run)
    if probe.rows:
        probe.measure(0)
    fit = _Fit(rss_start_mb=psutil.Process().memory_info().rss / 2**20)
    shard = run.data.train_set[acc.process_index::acc.num_processes]  # each process its own rows
    rng = random.Random(cfg.seed)
    guard = _Guard(run.params)
    t0 = time.perf_counter()
    with TrainProgress(total, quiet=quiet or not acc.is_main_process) as progress:
        if not progress.quiet:
            progress.progress.console.print(f"schedule: {run.schedule.describe()}", highlight=False)
        while fit.steps < total:
            for ids, labels, mask in task.batches(shard, cfg.batch_size, rng, run.pad):
                if fit.steps >= total:
                    break
                step = fit.steps
                ids, labels, mask = ids.to(acc.device), labels.to(acc.device), mask.to(acc.device)
                loss, grad_norm = _backward(run, guard, step, ids, mask, labels)
                warning = fit.grad_norm(step, grad_norm)
                if warning:
                    progress.warn(warning)
                _update(run, step)
                step_loss = float(acc.reduce(loss.detach(), reduction="mean"))
                fit.losses.append(step_loss)
                fit.answer_losses.append(step_loss * int((labels != IGNORE).sum()) / max(1, labels.shape[0]))
                fit.tokens += task.tokens(mask, labels) * acc.num_processes
                fit.steps = step = step + 1
                if step % 10 == 0 or step == total:
                    guard.check_moved(step)
                if step in probe.checkpoints:
                    probe.measure(step)
                progress.update(step, step_loss, fit.tokens / (time.perf_counter() - t0 - probe.seconds), grad_norm)
    fit.seconds = time.perf_counter() - t0 - probe.seconds
    fit.signal = probe.signal(fit.answer_losses)
    return fit


def _result(run: _Run, fit: _Fit, out: str | Path, data: str | Path, before: dict | None,
            after: dict | None) -> TrainResult:
    """The trained adapter (with what it was trained on and encoded with) and the run's report."""
    from .prompts import RECORD_KEY
    from .tokens import RECORD_KEY as TOKENS_KEY

    lb, recorded = run.lb, run.data.recorded
    adapter = adapter_from_peft(run.acc.unwrap_model(run.model), lb, run.sites, lb.quant)
    extra = {"trained_on": str(data), "steps": fit.steps, **({RECORD_KEY: recorded} if recorded else {}),
             TOKENS_KEY: lb.tokens.to_json()}  # what the rows were encoded with
    memory = {"bf16_autocast": run.use_bf16, "base_weights_mb": round(run.weights_mb, 1),
              "rss_at_loop_start_mb": round(fit.rss_start_mb, 1)}
    return TrainResult(Path(out), fit.steps, fit.seconds, fit.tokens / fit.seconds, fit.losses, before, after,
                       dataclasses.replace(adapter, extra=extra), run.acc.is_main_process, memory,
                       fit.grad_norms, fit.warnings, run.schedule.to_dict(), fit.signal)


def train(base: str = DEFAULT_BASE, data: str | Path = "", out: str | Path = "",
          eval_data: str | Path | None = None, quant: str = "auto", config: TrainConfig | None = None,
          quiet: bool = False, force: bool = False, chat_template: str | Path | None = None) -> TrainResult:
    """Train an IA3 adapter and write it (canonical + PEFT) with training.json to ``out``.

    An existing non-empty ``out`` is refused before training unless ``force``.
    ``chat_template``: "chatml" or a Jinja file, rendering chat rows instead of the base's
    own template (needed when the base has none); the template chat rows were rendered
    with is recorded in the adapter, so every runtime renders its prompts the same way.
    An encoder-decoder base (T5) trains in full precision ("auto": "none"); its task
    (tasks.py, seq2seq.py) says how rows become encoder inputs and decoder targets.
    """
    from accelerate import Accelerator

    from .prompts import resolve_template

    cfg = config or TrainConfig()
    cfg.validate()
    given = resolve_template(chat_template)  # a bad name/file fails before any work
    check_out(out, force)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    run = _setup(base, quant, cfg, acc, data, eval_data, given, chat_template)
    before = run.evaluate()
    fit = _fit(run, quiet)
    after = run.evaluate()
    result = _result(run, fit, out, data, before, after)
    if acc.is_main_process:
        _save(result, run.lb, cfg, run.lb.quant, acc.num_processes, str(acc.state.backend or "none"), force,
              run.data.source)
    acc.wait_for_everyone()
    return result


def _save(res: TrainResult, lb: LoadedBase, cfg: TrainConfig, quant: str, processes: int,
          backend: str, force: bool = False, chat_template: str | None = None) -> None:
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "base": lb.source.name,
        "base_identity": lb.identity.to_dict(),
        "quant": quant,
        "trained_on": lb.weights,
        "family": lb.family.name,
        "sites": res.adapter.sites,
        "scaling": {s: lb.family.site(s).scaling.value for s in res.adapter.sites},
        "parameters": res.adapter.num_params,
        "config": asdict(cfg),
        # where the recorded chat template came from (its text is in the adapter's metadata)
        "chat_template": chat_template,
        "processes": processes,
        "backend": backend,
        "steps": res.steps,
        "schedule": res.schedule,
        "wall_seconds": round(res.seconds, 2),
        "tokens_per_second": round(res.tokens_per_s, 1),
        "peak_rss_mb": round(peak_mb, 1),
        **res.memory,
        "loss_curve": [round(x, 5) for x in res.loss_curve],
        "grad_norms": [float(f"{x:.4g}") for x in res.grad_norms],
        "warnings": res.warnings,
        "eval_before": res.eval_before,
        "eval_after": res.eval_after,
        "early_signal": res.early_signal,
    }
    with atomic_dir(res.out, force=force) as tmp:
        write_peft_dir(res.adapter, tmp, base_model_name_or_path=lb.source.name)
        (tmp / "training.json").write_text(json.dumps(report, indent=2) + "\n")


