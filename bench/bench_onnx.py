"""ONNX / onnxruntime-genai benchmark on SmolLM2-135M int4, in one run.

Measures: export wall time (stock, side-mode with 2 adapters, merged),
adapter switch time vs re-creating og.Model (goal >= 1000x), decode tok/s of
side-mode vs merged vs the stock builder export without IA3 (goals: side >=
0.97 x merged, merged >= 0.98 x stock), adapter file size vs model size.

    .venv/bin/python bench/bench_onnx.py [--tokens 64] [--runs 5] [--work DIR] [--unfused]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def random_adapters(work: Path, names: list[str]) -> dict[str, Path]:
    """IA3 adapters on PEFT's default llama sites with values 1 + 0.2 N(0, 1)."""
    from edgeia3 import load_base
    from edgeia3.validate import adapter_for_base

    base = load_base("default")
    return {name: adapter_for_base(base, seed=seed).save(work / f"{name}.safetensors")
            for seed, name in enumerate(names, start=1)}


def timed_export(**kw):
    from edgeia3.steps.onnx_export import export

    t0 = time.perf_counter()
    res = export(**kw)
    return res, time.perf_counter() - t0


def decode_once(rt, prompt_ids: list[int], tokens: int) -> float:
    """Decode tokens/s of one greedy run (after the first token, so prefill is excluded)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(rt.model)
    n = len(prompt_ids) + tokens
    params.set_search_options(do_sample=False, max_length=n, min_length=n)  # no early EOS
    gen = og.Generator(rt.model, params)
    if rt._active is not None:
        gen.set_active_adapter(rt._og_adapters, rt._active)
    gen.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
    gen.generate_next_token()
    t0, count = time.perf_counter(), 0
    while not gen.is_done():
        gen.generate_next_token()
        count += 1
    return count / (time.perf_counter() - t0)


def switch_vs_reload(side_dir: Path, runs: int) -> tuple[float, float]:
    """Median seconds: activating another adapter on a new generator vs re-creating og.Model + Adapters."""
    import onnxruntime_genai as og

    from edgeia3.runtimes.onnx_runtime import OnnxRuntime

    rt = OnnxRuntime(side_dir)
    params = og.GeneratorParams(rt.model)
    params.set_search_options(max_length=16)
    switch = []
    for i in range(max(runs, 20)):
        gen = og.Generator(rt.model, params)
        t0 = time.perf_counter()
        rt.use_adapter("ab"[i % 2])
        gen.set_active_adapter(rt._og_adapters, rt._active)
        switch.append(time.perf_counter() - t0)
    reload = []
    for _ in range(max(3, runs // 2)):
        t0 = time.perf_counter()
        OnnxRuntime(side_dir)
        reload.append(time.perf_counter() - t0)
    return statistics.median(switch), statistics.median(reload)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=None, help="keep exports here (default: a temp dir)")
    ap.add_argument("--unfused", action="store_true", help="also measure a side-mode build without qkv fusion")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeia3-bench-onnx-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}")
    import onnxruntime
    import onnxruntime_genai

    print(f"onnxruntime {onnxruntime.__version__}, onnxruntime-genai {onnxruntime_genai.__version__}")

    from edgeia3.runtimes.onnx_runtime import OnnxRuntime

    ads = random_adapters(work, ["a", "b"])
    stock, t_stock = timed_export(base="default", out=work / "stock", precision="int4")
    side, t_side = timed_export(base="default", out=work / "side", precision="int4", adapters=ads)
    merged, t_merged = timed_export(base="default", out=work / "merged", precision="int4",
                                    adapters={"a": ads["a"]}, merge="a")
    print(f"\nexport wall time (int4): stock {t_stock:.1f} s, side-mode 2 adapters {t_side:.1f} s, "
          f"merged {t_merged:.1f} s (goal: side < 60 s + 10 s per extra adapter = 70 s)")

    runtimes = {"stock": OnnxRuntime(stock.out), "side (adapter a)": OnnxRuntime(side.out),
                "merged (a)": OnnxRuntime(merged.out)}
    runtimes["side (adapter a)"].use_adapter("a")
    if args.unfused:
        unf, _ = timed_export(base="default", out=work / "side_unfused", precision="int4", adapters=ads,
                              fuse_qkv=False)
        runtimes["side unfused (a)"] = OnnxRuntime(unf.out)
        runtimes["side unfused (a)"].use_adapter("a")
    prompt_ids = runtimes["stock"].prompt_ids(PROMPT)
    samples: dict[str, list[float]] = {name: [] for name in runtimes}
    for run in range(args.runs + 1):  # run 0 is the warm-up; variants interleaved so drift hits all alike
        for name, rt in runtimes.items():
            v = decode_once(rt, prompt_ids, args.tokens)
            if run:
                samples[name].append(v)
    speed = {name: statistics.median(v) for name, v in samples.items()}
    print(f"\ndecode tok/s (greedy, {args.tokens} tokens, median of {args.runs} interleaved runs after a warm-up):")
    for name, v in speed.items():
        print(f"  {name:20s} {v:8.1f}")
    r1 = speed["side (adapter a)"] / speed["merged (a)"]
    r2 = speed["merged (a)"] / speed["stock"]
    print(f"  side / merged  = {r1:.3f}  (goal >= 0.97: {'met' if r1 >= 0.97 else 'NOT met'})")
    print(f"  merged / stock = {r2:.3f}  (goal >= 0.98: {'met' if r2 >= 0.98 else 'NOT met'})")

    sw, rl = switch_vs_reload(side.out, args.runs)
    print(f"\nadapter switch {sw * 1e6:.1f} us vs re-creating og.Model + Adapters {rl * 1e3:.1f} ms: "
          f"{rl / sw:,.0f}x (goal >= 1000x: {'met' if rl / sw >= 1000 else 'NOT met'})")

    ad_bytes = side.adapters["a"].stat().st_size
    from edgeia3.steps.onnx_export import model_bytes

    mb = model_bytes(stock.out)
    print(f"\nadapter file {ad_bytes / 1e3:.1f} kB vs model {mb / 1e6:.1f} MB: {ad_bytes / mb * 100:.3f}% "
          f"({mb / ad_bytes:,.0f}x smaller)")
    print(f"\nexports kept in {work}")


if __name__ == "__main__":
    main()
