"""GGUF / llama.cpp benchmark on the embedded SmolLM2-135M-Instruct Q4_1, in one run.

    python bench/bench_gguf.py [--switches 30] [--runs 5] [--tokens 64]

Measures: in-place adapter switch vs a full reload, exact merge time per
adapter, decode tok/s of a merged GGUF vs the stock base GGUF, and adapter
file size vs model size; prints each against the project's goals.
Adapters are random IA3 vectors (1 + 0.2 N(0,1)) on PEFT's llama default
sites (k, v, down): timing does not depend on their values.
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

from edgeia3.converters.gguf.adapter_file import write_ia3_gguf  # noqa: E402
from edgeia3.converters.gguf.base_gguf import GGUFBase  # noqa: E402
from edgeia3.converters.gguf.merge import merge_into_file  # noqa: E402
from edgeia3.steps.gguf_merge import merge_gguf  # noqa: E402
from edgeia3.validate import adapter_for_base  # noqa: E402
from edgeia3.base import default_gguf  # noqa: E402
from edgeia3.runtimes.llama_runtime import RELOAD, LlamaCppRuntime  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def decode_tok_s(rt: LlamaCppRuntime, prompt_ids: list[int], n: int) -> float:
    """Greedy single-token decode speed after the prompt (no EOS stop, prefill not timed)."""
    rt._clear_kv()
    rt._decode(prompt_ids, 0, all_logits=False)
    pos, tok = len(prompt_ids), int(np.argmax(np.ctypeslib.as_array(rt._ctx.get_logits_ith(-1), shape=(rt.n_vocab,))))
    t0 = time.perf_counter()
    for _ in range(n):
        rt._decode([tok], pos, all_logits=False)
        pos += 1
        tok = int(np.argmax(np.ctypeslib.as_array(rt._ctx.get_logits_ith(-1), shape=(rt.n_vocab,))))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switches", type=int, default=30)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    print("command:", " ".join([Path(sys.executable).name] + sys.argv))
    print(f"machine: {machine()}")
    src = default_gguf()
    base = GGUFBase(src)
    model_mb = src.stat().st_size / 1e6
    print(f"model: {src.name} ({model_mb:.1f} MB)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {}
        for name, seed in (("A", 1), ("B", 2)):
            ad = adapter_for_base(base, seed=seed)
            paths[name] = write_ia3_gguf(ad, tmp / f"{name}.ia3.gguf", base, name)
        adapter_kb = paths["A"].stat().st_size / 1e3

        # Exact merge: whole command path (validate + copy + patch) and the patch alone.
        total, patch = [], []
        for i in range(args.runs):
            t0 = time.perf_counter()
            merge_gguf(src, paths["A"], tmp / "merged_A.gguf")
            total.append(time.perf_counter() - t0)
            patch.append(merge_into_file(src, base.load_adapter(paths["A"]), tmp / "m.gguf", base))
        merge_gguf(src, paths["B"], tmp / "merged_B.gguf")

        # Switch: in place vs reload (each followed by the first eval, the reload's real cost).
        probe = [1]
        inplace = LlamaCppRuntime(src, paths)
        print(f"runtime swap mode: {inplace.swap_mode} ({inplace.swap_reason})")
        sw, sw_eval = [], []
        for i in range(args.switches):
            name = "AB"[i % 2]
            t0 = time.perf_counter()
            inplace.use_adapter(name)
            sw.append(time.perf_counter() - t0)
            inplace.logits(probe)
            sw_eval.append(time.perf_counter() - t0)
        reload_rt = LlamaCppRuntime(src, paths, swap=RELOAD)
        rl = []
        for i in range(max(5, args.switches // 5)):
            t0 = time.perf_counter()
            reload_rt.use_adapter("AB"[i % 2])
            reload_rt.logits(probe)
            rl.append(time.perf_counter() - t0)
        reload_rt.close()
        inplace.close()

        # Decode speed: merged vs stock, alternating runs after one warm-up each.
        stock, merged = LlamaCppRuntime(src), LlamaCppRuntime(tmp / "merged_A.gguf")
        ids = stock.prompt_ids(PROMPT)
        for rt in (stock, merged):
            decode_tok_s(rt, ids, 8)
        s_runs, m_runs = [], []
        for _ in range(args.runs):
            s_runs.append(decode_tok_s(stock, ids, args.tokens))
            m_runs.append(decode_tok_s(merged, ids, args.tokens))
        stock.close()
        merged.close()

    s_ms, e_ms, r_ms = median_ms(sw), median_ms(sw_eval), median_ms(rl)
    s_tok, m_tok = statistics.median(s_runs), statistics.median(m_runs)
    print()
    print(f"in-place switch (use_adapter), median of {len(sw)}: {s_ms:.1f} ms   goal <= 20 ms: "
          f"{'met' if s_ms <= 20 else 'MISSED'}")
    print(f"in-place switch + first eval:                 {e_ms:.1f} ms")
    print(f"full reload (patch, load, first eval), median of {len(rl)}: {r_ms:.1f} ms")
    print(f"reload / in-place switch: {r_ms / s_ms:.1f}x   goal >= 10x: {'met' if r_ms / s_ms >= 10 else 'MISSED'}")
    print(f"merge per adapter (validate + copy + patch), median of {len(total)}: {median_ms(total):.0f} ms; "
          f"patch alone {median_ms(patch):.0f} ms   goal <= 500 ms: {'met' if median_ms(total) <= 500 else 'MISSED'}")
    print(f"decode, {args.tokens} tokens, median of {args.runs}: stock {s_tok:.1f} tok/s, merged {m_tok:.1f} tok/s, "
          f"ratio {m_tok / s_tok:.3f}   goal >= 0.98: {'met' if m_tok / s_tok >= 0.98 else 'MISSED'}")
    print(f"adapter file: {adapter_kb:.1f} kB ({adapter_kb / 1e3 / model_mb * 100:.2f}% of the {model_mb:.1f} MB model)")


if __name__ == "__main__":
    main()
