"""Train step: IA3 on a frozen (by default 4-bit) base from JSONL data.

Decoder-only and encoder-decoder (T5, full precision) models run the same loop; what
differs for the latter (encoding, batches, loss, evaluation) is in seq2seq.py.

Runs on CPU or GPU, single process or under ``accelerate launch``. Guards
against the silent failures IA3 training is prone to: missing gradients,
vectors that stop moving (the bitsandbytes CPU repack bug, FACTS.md) and
non-finite loss all stop the run with a message.
"""

from __future__ import annotations

import copy
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
from .adapter import IA3Adapter, IA3Vector, fused_layout_for
from .atomic import atomic_dir, check_out
from .base import DEFAULT_BASE, LoadedBase, load_base
from .data import IGNORE, Example, length_batches, load_examples
from .errors import EdgeIA3Error
from .evaluate import evaluate
from .formats.peft_dir import peft_target_modules, write_peft_dir
from .schedule import (DEFAULT_LR, DEFAULT_SCHEDULE, DEFAULT_WARMUP, SCHEDULES, checkpoint_steps, early_signal,
                       plan, quarter_means)



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


def _ia3_params(model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "ia3_l" in n}


def wrap_with_ia3(base: LoadedBase, sites: list[str]) -> Any:
    """A PEFT IA3 model on ``base`` targeting ``sites``; fused slices not targeted stay at 1."""
    from peft import IA3Config, get_peft_model

    fam = base.family
    modules, feedforward = peft_target_modules(fam, sites)
    cfg = IA3Config(task_type=fam.peft_task_type, target_modules=modules, feedforward_modules=feedforward,
                    fan_in_fan_out=fam.conv1d)
    model = get_peft_model(base.model, cfg)
    # A fused module (phi3 qkv_proj) holds several sites in one vector: mask the
    # gradient of slices that were not asked for, so they stay exactly 1.
    for s in fam.sites:
        if s.fused_rows is not None and s.name not in sites and s.module in modules:
            a, b = s.fused_rows(base.config)
            for name, p in _ia3_params(model).items():
                if f".{s.module}." in name:
                    mask = torch.ones_like(p)
                    mask[a:b] = 0
                    p.register_hook(lambda g, m=mask: g * m)
    return model


class _EvalTwin:
    """A full-precision twin of a 4-bit (NF4 or GGUF-block) base for evaluation.

    4-bit layers dequantize every weight on every forward, which makes greedy
    generation minutes slower (and bitsandbytes' fast CPU eval path is the repack
    that breaks training, FACTS.md). The twin holds the *dequantized* 4-bit
    weights, so with the current IA3 vectors copied in it computes the same
    function as the 4-bit model (exactness tested), at fp32 speed.
    """

    def __init__(self, lb: LoadedBase, sites: list[str]):
        from .merge import dequantize_model

        if lb.quant == "gguf":
            from edgeia3.converters.gguf.torch_weights import densify

            twin = densify(copy.deepcopy(lb.model))
        else:
            twin = dequantize_model(copy.deepcopy(lb.model))
        self.model = wrap_with_ia3(dataclasses.replace(lb, model=twin, quant="none"), sites)

    def sync(self, trained: Any) -> Any:
        src = _ia3_params(trained)
        with torch.no_grad():
            for name, p in _ia3_params(self.model).items():
                p.copy_(src[name])
        return self.model


def adapter_from_peft(model: Any, base: LoadedBase, sites: list[str], quant: str) -> IA3Adapter:
    """Read the trained vectors out of a PEFT model into the canonical adapter."""
    fam = base.family
    layout = fused_layout_for(fam, base.config)
    params = {n.replace(".default", ""): p.detach().float().cpu().numpy().ravel()
              for n, p in _ia3_params(model).items()}
    vectors = []
    for name, values in params.items():
        path = name.split("base_model.model.", 1)[-1].rsplit(".ia3_l", 1)[0]
        layer, located = fam.locate(path)
        for s in located:
            if s.name not in sites:
                continue
            part = values[layout[s.name][0]:layout[s.name][1]] if s.name in layout else values
            vectors.append(IA3Vector(layer, s.name, s.scaling, part.copy()))
    return IA3Adapter(fam.name, vectors, base=base.identity, quant=quant, fused_layout=layout,
                      trained_on=dict(base.weights or {}))


def _batches(examples: list[Example], batch_size: int, rng: random.Random, pad_id: int):
    for rows in length_batches([_labelled_len(e) for e in examples], batch_size, rng):
        chunk = [examples[j] for j in rows]
        # Tokens after a row's last labelled one cannot change the (causal) loss: cut them.
        width = max(_labelled_len(e) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            n = min(len(e.input_ids), width)
            ids[r, :n] = torch.tensor(e.input_ids[:n])
            labels[r, :n] = torch.tensor(e.labels[:n])
            mask[r, :n] = 1
        yield ids, labels, mask


def _labelled_len(e: Example) -> int:
    """Length up to and including the last labelled token (all of it when nothing is labelled)."""
    last = max((i for i, x in enumerate(e.labels) if x != IGNORE), default=len(e.labels) - 1)
    return last + 1


def bf16_supported(device: torch.device) -> bool:
    """bf16 matmuls pay off: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def labelled_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, with the LM head applied at
    those positions only (on label-style rows nearly every other position is wasted work;
    the head is ~20% of SmolLM2's FLOPs). Same value as the model's own ``labels=`` loss."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)  # gemma2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits, target[keep])


def _probe_loss(model: Any, rows: list[Example], pad: int, device: torch.device, bf16: bool) -> float:
    """Loss per answer of ``rows`` (labelled-token loss summed per row, averaged over rows),
    computed as training computes its loss (labelled_loss, the same autocast): the early
    signal's eval points."""
    total = 0.0
    with torch.no_grad():
        for ids, labels, mask in _batches(rows, len(rows), random.Random(0), pad):
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            n = int((labels[:, 1:] != IGNORE).sum())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                total += float(labelled_loss(model, ids, mask, labels)) * n
    return total / max(1, len(rows))


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


def train(base: str = DEFAULT_BASE, data: str | Path = "", out: str | Path = "",
          eval_data: str | Path | None = None, quant: str = "auto", config: TrainConfig | None = None,
          quiet: bool = False, force: bool = False, chat_template: str | Path | None = None) -> TrainResult:
    """Train an IA3 adapter and write it (canonical + PEFT) with training.json to ``out``.

    An existing non-empty ``out`` is refused before training unless ``force``.
    ``chat_template``: "chatml" or a Jinja file, rendering chat rows instead of the base's
    own template (needed when the base has none); the template chat rows were rendered
    with is recorded in the adapter, so every runtime renders its prompts the same way.
    An encoder-decoder base (T5) trains in full precision ("auto": "none"); seq2seq.py says
    how rows become encoder inputs and decoder targets.
    """
    from accelerate import Accelerator

    from .progress import TrainProgress
    from .prompts import RECORD_KEY, resolve_template
    from .tokens import RECORD_KEY as TOKENS_KEY

    cfg = config or TrainConfig()
    cfg.validate()
    given = resolve_template(chat_template)  # a bad name/file fails before any work
    check_out(out, force)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    lb = load_base(base, quant=seq2seq.training_quant(base, quant))  # encoder-decoder: fp32 only
    quant = lb.quant  # "auto" and llama.cpp type names resolve to gguf / nf4 / none
    fam = lb.family
    s2s = fam.encoder_decoder  # encoder-decoder (T5): its own encoding, batches, loss and eval
    if s2s:
        seq2seq.check_loaded(lb)
    sites = list(cfg.targets or fam.default_targets)
    for s in sites:
        fam.site(s)  # unknown site names fail here, with the list of known ones
    own = getattr(lb.tokenizer, "chat_template", None)
    template = seq2seq.chat_template(given, lb.tokenizer) if s2s else given or own
    load = seq2seq.load_examples if s2s else load_examples
    train_set = load(data, lb.tokenizer, cfg.max_length, template)
    eval_set = load(eval_data, lb.tokenizer, cfg.max_length, template) if eval_data else None
    # Recorded when given, or when the base's own rendered chat rows (it may change or be lost later).
    chat_rows = any(not isinstance(e.prompt, str) for e in train_set + (eval_set or []))
    recorded = template if given or (template and chat_rows) else None
    if eval_set and cfg.max_eval:
        eval_set = eval_set[: cfg.max_eval]

    packed = sum(m.packed.nbytes for m in lb.model.modules() if hasattr(m, "packed"))  # GGUF blocks
    weights_mb = (lb.model.get_memory_footprint() + packed) / 2**20
    # Built before wrap_with_ia3, which injects IA3 layers into lb.model in place.
    twin = _EvalTwin(lb, sites) if quant in ("nf4", "gguf") and eval_set and acc.is_main_process else None
    model = wrap_with_ia3(lb, sites)
    params = _ia3_params(model)
    optim = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.0)
    model, optim = acc.prepare(model, optim)
    shard = train_set[acc.process_index::acc.num_processes]  # each process its own rows
    # Planned from the largest shard, so every process runs the same number of steps.
    schedule = plan(math.ceil(len(train_set) / acc.num_processes), cfg.batch_size, cfg.epochs, cfg.max_steps,
                    cfg.warmup_ratio, cfg.schedule)
    total = schedule.steps
    want_acc = cfg.eval_accuracy
    use_bf16 = bf16_supported(acc.device) if cfg.bf16 is None else cfg.bf16

    def run_eval() -> dict | None:
        if not eval_set or not acc.is_main_process:
            return None
        trained = acc.unwrap_model(model)
        return (seq2seq.evaluate if s2s else evaluate)(twin.sync(trained) if twin else trained, lb.tokenizer,
                                                       eval_set, want_acc, template)

    before = run_eval()
    pad = lb.tokenizer.pad_token_id if lb.tokenizer.pad_token_id is not None else lb.tokenizer.eos_token_id
    # Early signal: the eval loss of the first PROBE_ROWS eval rows at a few checkpoints (decoder
    # models, main process); otherwise the training loss's quarter means. Not counted as training time.
    probe = eval_set[:PROBE_ROWS] if eval_set and acc.is_main_process and not s2s else None
    checkpoints = set(checkpoint_steps(total)) if probe else set()
    points: list[tuple[int, float]] = []
    probe_s = 0.0

    def probe_loss(at: int) -> None:
        nonlocal probe_s
        t = time.perf_counter()
        trained = acc.unwrap_model(model)
        m = twin.sync(trained) if twin else trained
        was = m.training
        m.eval()
        points.append((at, _probe_loss(m, probe, pad, acc.device, use_bf16)))
        m.train(was)
        probe_s += time.perf_counter() - t

    if probe:
        probe_loss(0)
    import psutil

    rss_start_mb = psutil.Process().memory_info().rss / 2**20
    rng = random.Random(cfg.seed)
    guard = _Guard(params)
    losses: list[float] = []
    answer_losses: list[float] = []  # per step: the loss per answer (labelled tokens per row x loss)
    grad_norms: list[float] = []  # IA3 gradient L2 norm per step, before clipping
    warnings: list[str] = []
    troubles: set[str] = set()
    tokens = 0
    t0 = time.perf_counter()
    step = 0
    with TrainProgress(total, quiet=quiet or not acc.is_main_process) as progress:
        if not progress.quiet:
            progress.progress.console.print(f"schedule: {schedule.describe()}", highlight=False)
        while step < total:
            for ids, labels, mask in (seq2seq.batches if s2s else _batches)(shard, cfg.batch_size, rng, pad):
                if step >= total:
                    break
                model.train()
                ids, labels, mask = ids.to(acc.device), labels.to(acc.device), mask.to(acc.device)
                # DDP syncs gradients only through its own forward: the plain loss there
                with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = (seq2seq.loss(model, ids, mask, labels) if s2s
                            else labelled_loss(model, ids, mask, labels) if acc.num_processes == 1
                            else model(input_ids=ids, attention_mask=mask, labels=labels).loss)
                if not torch.isfinite(loss):
                    raise EdgeIA3Error(f"step {step}: loss is {loss.item()}; stopping "
                                       "(try a lower --lr or check the data)")
                acc.backward(loss)
                guard.check_grads(step)
                grad_norm = float(acc.clip_grad_norm_(list(params.values()), cfg.grad_clip))
                grad_norms.append(grad_norm)
                trouble = gradient_trouble(grad_norm)
                if trouble and trouble not in troubles:  # warn at the first step of each kind
                    troubles.add(trouble)
                    warnings.append(gradient_warning(step, grad_norm))
                    progress.warn(warnings[-1])
                for g in optim.param_groups:
                    g["lr"] = cfg.lr * schedule.lr_factor(step)
                optim.step()
                optim.zero_grad(set_to_none=True)
                step_loss = float(acc.reduce(loss.detach(), reduction="mean"))
                losses.append(step_loss)
                answer_losses.append(step_loss * int((labels != IGNORE).sum()) / max(1, labels.shape[0]))
                tokens += (seq2seq.tokens(mask, labels) if s2s else int(mask.sum())) * acc.num_processes
                step += 1
                if step % 10 == 0 or step == total:
                    guard.check_moved(step)
                if step in checkpoints:
                    probe_loss(step)
                progress.update(step, step_loss, tokens / (time.perf_counter() - t0 - probe_s), grad_norm)
    seconds = time.perf_counter() - t0 - probe_s
    if points:
        signal = early_signal(points, total, "eval loss")
    else:
        signal = early_signal(quarter_means(answer_losses), total, "training loss")
    if signal is not None:
        signal = {**signal, **({"probe_rows": len(probe), "probe_seconds": round(probe_s, 2)} if points else {})}
    after = run_eval()
    model = acc.unwrap_model(model)
    adapter = adapter_from_peft(model, lb, sites, quant)
    extra = {"trained_on": str(data), "steps": step, **({RECORD_KEY: recorded} if recorded else {}),
             TOKENS_KEY: lb.tokens.to_json()}  # what the rows were encoded with
    adapter = dataclasses.replace(adapter, extra=extra)
    result = TrainResult(Path(out), step, seconds, tokens / seconds, losses, before, after, adapter,
                         acc.is_main_process, {"bf16_autocast": use_bf16,
                                               "base_weights_mb": round(weights_mb, 1),
                                               "rss_at_loop_start_mb": round(rss_start_mb, 1)},
                         grad_norms, warnings, schedule.to_dict(), signal)
    if acc.is_main_process:
        source = (str(chat_template) if given else "base" if own else "seq2seq-flat") if recorded else None
        _save(result, lb, cfg, quant, acc.num_processes, str(acc.state.backend or "none"), force, source)
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


