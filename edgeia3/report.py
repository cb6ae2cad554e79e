"""Report step: sizes, latencies and drift of exported artifacts.

For every export directory (ONNX or GGUF) and every adapter in it, measure:
- size: base bytes, adapter bytes, and what a LoRA r=8 on the same modules
  would weigh (computed);
- latency: load, time to first token, decode tokens/s (warm-up, then median of
  several runs, with min/max), adapter switch time, reload time;
- drift vs the PyTorch reference (fp32 base + the same adapter, unmerged):
  max/mean abs logit difference, KL divergence, greedy-token agreement; with
  ``--eval NAME=data.jsonl`` also task accuracy next to PyTorch's.
Writes report.json, report.md and PNG charts.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_dir
from .errors import EdgeIA3Error
from .export import ExportInfo, read_export
from .prompts import OPTION, NoChatTemplate
from .runtimes import Runtime, open_runtime
from .weights import llama_quant

LORA_RANK = 8
PROMPTS = [  # fixed drift prompts (chat), short so drift runs stay quick
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three colors of the rainbow."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]
SPEED_PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


@dataclass
class ReportOptions:
    runs: int = 5  # timed repetitions (after one warm-up)
    decode_tokens: int = 48
    greedy_tokens: int = 20
    eval_rows: int = 50


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _timed_open(path: Path) -> tuple[Runtime, float]:
    t0 = time.perf_counter()
    rt = open_runtime(path)
    return rt, time.perf_counter() - t0


def _close(rt: Any) -> None:
    close = getattr(rt, "close", None)
    if close:
        close()


def measure_speed(rt: Runtime, ids: list[int], opts: ReportOptions) -> dict:
    """Time to first token and decode tokens/s of greedy generation (base or active adapter)."""
    ttft, tps = [], []
    for r in range(opts.runs + 1):
        t0 = time.perf_counter()
        first = last = t0
        n = 0
        for n, _ in enumerate(rt.generate_ids(ids, opts.decode_tokens, ignore_eos=True), start=1):
            last = time.perf_counter()
            if n == 1:
                first = last
        if r == 0:
            continue  # warm-up
        own = rt.last_timing  # the runtime's clock, where arrivals are not when tokens were made
        if own:
            ttft.append(own["ttft_s"])
            if own["decode_tok_s"]:
                tps.append(own["decode_tok_s"])
        else:
            ttft.append(first - t0)
            if n > 1:
                tps.append((n - 1) / (last - first))
    return {"ttft_s": _stats(ttft), "decode_tok_s": _stats(tps) if tps else None}


def measure_switch(rt: Runtime, names: list[str], opts: ReportOptions,
                   ids: list[int] | None = None) -> dict | None:
    """Time of use_adapter() alternating between adapters (or adapter and base);
    with ``ids``, of use_adapter() plus the first generated token - comparable
    with a reload, and fair to runtimes that activate lazily (genai does so
    when the next generator starts)."""
    if not names:
        return None
    cycle = names if len(names) > 1 else [names[0], None]
    times = []
    for k in range(2 * opts.runs + 1):
        t0 = time.perf_counter()
        rt.use_adapter(cycle[k % len(cycle)])
        if ids is not None:
            next(iter(rt.generate_ids(ids, 1, ignore_eos=True)))
        if k:
            times.append(time.perf_counter() - t0)
    return _stats(times)


def drift(rt: Runtime, ref: Runtime, prompt_ids: list[list[int]], greedy_tokens: int) -> dict:
    """Logit and greedy-token differences of ``rt`` against the reference runtime."""
    max_abs, mean_abs, kl, agree = [], [], [], []
    greedy_same, greedy_total = 0, 0
    for ids in prompt_ids:
        a, b = rt.logits(ids).astype(np.float64), ref.logits(ids).astype(np.float64)
        d = np.abs(a - b)
        max_abs.append(float(d.max()))
        mean_abs.append(float(d.mean()))
        pa = np.exp(a - a.max(-1, keepdims=True))
        pa /= pa.sum(-1, keepdims=True)
        pb = np.exp(b - b.max(-1, keepdims=True))
        pb /= pb.sum(-1, keepdims=True)
        kl.append(float(np.mean(np.sum(pb * (np.log(pb + 1e-30) - np.log(pa + 1e-30)), axis=-1))))
        agree.append(float(np.mean(a.argmax(-1) == b.argmax(-1))))
        ga = list(rt.generate_ids(ids, greedy_tokens))
        gb = list(ref.generate_ids(ids, greedy_tokens))
        greedy_total += max(len(ga), len(gb))
        greedy_same += sum(x == y for x, y in zip(ga, gb))
    return {"max_abs_logit_diff": max(max_abs), "mean_abs_logit_diff": float(np.mean(mean_abs)),
            "kl_ref_to_runtime": float(np.mean(kl)), "argmax_agreement": float(np.mean(agree)),
            "greedy_token_agreement": greedy_same / max(1, greedy_total)}


def accuracy(rt: Runtime, ref_tokenizer_ids, rows: list[dict]) -> float:
    """Exact-match accuracy of greedy answers to chat rows (last message = reference)."""
    hits = 0
    for row in rows:
        msgs, target = row["messages"][:-1], row["messages"][-1]["content"]
        n = len(ref_tokenizer_ids(target)) + 4
        answer = rt.detokenize(list(rt.generate_ids(rt.prompt_ids(msgs), n)))
        hits += answer.strip() == target.strip()
    return hits / len(rows)


def lora_equivalent_bytes(adapter: Any, base: Any, rank: int = LORA_RANK, bytes_per_param: int = 4) -> int:
    """Bytes of a LoRA of rank ``rank`` on the same modules as ``adapter`` (fp32)."""
    from .fingerprint import module_shape

    fam = base.family
    modules = {fam.module_path(v.layer, fam.site(v.site)) for v in adapter.vectors}
    params = 0
    for path in modules:
        out, inp = module_shape(base.model.get_submodule(path), fam.conv1d)
        params += rank * (out + inp)
    return params * bytes_per_param


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    versions = {}
    for pkg in ("edgeia3", "torch", "transformers", "peft", "onnxruntime", "onnxruntime-genai",
                "llama_cpp_python", "gguf"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions}


def trained_as(adapter: Any) -> str:
    """The ``load_base`` quant that rebuilds the model an adapter was trained as."""
    t = adapter.trained_on or {}
    if adapter.quant == "gguf":
        return llama_quant(t) or "gguf"
    return "nf4" if adapter.quant == "nf4" else "none"


_REFERENCE_LABELS = {"nf4": "dequantized NF4 base", "none": "fp32 base", "gguf": "the GGUF base's own blocks"}


def reference_base(spec: str, quant: str) -> tuple[Any, str]:
    """The PyTorch model an adapter is compared against: the one it was trained as
    (``trained_as``), with 4-bit weights dequantized exactly for fp32 speed."""
    import dataclasses

    from .base import load_base
    from .merge import merge_loaded

    lb = load_base(spec, quant=quant)
    label = _REFERENCE_LABELS.get(quant, f"the base quantized {quant} by llama.cpp")
    if lb.quant in ("nf4", "gguf"):  # no adapter folded in: just dequantize
        lb = dataclasses.replace(lb, model=merge_loaded(lb, None), quant="none")
    return lb, f"{label} + adapter, unmerged (what it was trained on)"


def report_export(info: ExportInfo, opts: ReportOptions, eval_sets: dict[str, list[dict]]) -> dict:
    """All measurements for one export directory."""
    from .runtimes.torch_runtime import TorchRuntime

    adapters = info.adapters()  # canonical adapters read back from the export's own files
    # One PyTorch reference per training setup: each adapter against the model it was trained as.
    refs: dict[str, tuple[Any, Any, str]] = {}
    for name, ad in adapters.items():
        key = trained_as(ad)
        if key not in refs:
            lb, label = reference_base(info.base_spec, key)
            refs[key] = (lb, TorchRuntime(lb, {n: a for n, a in adapters.items() if trained_as(a) == key}), label)
    if not refs:
        lb, label = reference_base(info.base_spec, "none")
        refs["none"] = (lb, TorchRuntime(lb, {}), label)
    base, first_ref, _ = next(iter(refs.values()))
    sizes = {name: {"bytes": info.adapter_bytes.get(name), "vector_bytes": ad.nbytes,
                    "params": ad.num_params, "lora_r8_bytes": lora_equivalent_bytes(ad, base)}
             for name, ad in adapters.items()}
    rt, load_s = _timed_open(info.path)
    for _, ref, _ in refs.values():  # references render chat exactly as the export does, per adapter
        ref.templates.own, ref.templates.recorded = rt.templates.own, dict(rt.templates.recorded)
    speed_ids = first_ref.prompt_ids(SPEED_PROMPT)
    drift_ids = [first_ref.prompt_ids(p) for p in PROMPTS]
    result: dict[str, Any] = {"path": str(info.path), "label": info.label, "kind": info.kind,
                              "reference": "; ".join(sorted({label for _, _, label in refs.values()})),
                              "precision": info.precision, "merged": info.merged,
                              "model_bytes": info.model_bytes, "adapters": {}}
    rt.use_adapter(None)  # the base, or for a merged export the merged model
    result["speed_base"] = measure_speed(rt, speed_ids, opts)
    result["switch_s"] = None if info.merged else measure_switch(rt, rt.adapters, opts)
    result["switch_first_token_s"] = None if info.merged else measure_switch(rt, rt.adapters, opts, drift_ids[0])
    # A reload = what a switch costs without in-place swapping: open again, first token.
    reloads = []
    for _ in range(max(2, opts.runs // 2)):
        t0 = time.perf_counter()
        fresh = open_runtime(info.path)
        next(iter(fresh.generate_ids(drift_ids[0], 1)), None)
        reloads.append(time.perf_counter() - t0)
        _close(fresh)
    result["load_s"] = load_s
    result["reload_s"] = _stats(reloads)
    # Each adapter: active through use_adapter, or baked in when the export is merged.
    names = [info.merged] if info.merged else rt.adapters
    for name in names:
        rt.use_adapter(name)
        ref_base, ref, label = refs[trained_as(adapters[name])]
        ref.use_adapter(name)
        ids = [ref.prompt_ids(p) for p in PROMPTS]  # with the template this adapter was trained with
        entry = {"size": sizes.get(name), "reference": label,
                 "drift": drift(rt, ref, ids, opts.greedy_tokens),
                 "speed": measure_speed(rt, speed_ids, opts)}
        if name in eval_sets:
            rows = eval_sets[name][: opts.eval_rows]
            tok = lambda s: ref_base.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
            # "trained": the model the adapter was trained as (its own quantization), in PyTorch
            entry["accuracy"] = {"runtime": accuracy(rt, tok, rows), "trained": accuracy(ref, tok, rows),
                                 "rows": len(rows)}
        result["adapters"][name] = entry
    _close(rt)
    return result


def report(exports: list[str | Path], out: str | Path, eval_data: dict[str, str] | None = None,
           options: ReportOptions | None = None) -> dict:
    """Measure every export and write report.json, report.md and charts to ``out``."""
    from .data import read_jsonl
    from .report_render import render_markdown, write_charts

    opts = options or ReportOptions()
    if not exports:
        raise EdgeIA3Error("give at least one export directory")
    infos = [read_export(p) for p in exports]  # validate all before measuring any
    eval_sets = {name: read_jsonl(path) for name, path in (eval_data or {}).items()}
    for name, rows in eval_sets.items():
        if any("messages" not in r for r in rows):
            raise EdgeIA3Error(f"--eval {name}: accuracy needs chat rows ({{\"messages\": [...]}})")
    doc = {"machine": machine(), "options": opts.__dict__, "exports": []}
    for info in infos:
        try:
            doc["exports"].append(report_export(info, opts, eval_sets))
        except NoChatTemplate:  # report has no template option: the export must carry one
            raise NoChatTemplate(f"{info.path}: the export has no chat template for report's chat prompts; "
                                 f"train its adapters with {OPTION} and export again") from None
    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
        charts = write_charts(doc, tmp)
        (tmp / "report.md").write_text(render_markdown(doc, charts))
    return doc
