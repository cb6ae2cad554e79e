"""ONNX int4 on the GGUF's own blocks vs the builder's own int4, SmolLM2, in one run.

Three exports of the embedded base, no adapter:
- builder: onnxruntime-genai's int4 re-quantization of the dequantized Q4_1 weights
  (``--weights builder``; a different 4-bit model from the one trained on);
- Q4_1 transcoded (the default for the embedded GGUF): the file's own blocks; Q4_1's
  per-block minimum costs two small MatMuls + an Add per linear, the Q8_0 LM head is 8-bit;
- q4_0 transcoded (``--weights q4_0``, the base quantized once, pure Q4_0): default
  zero points, no extra ops - the grid both runtimes run fastest.

Decode tok/s (greedy, interleaved runs, median), model size, and mean |dlogit| of each
against PyTorch running the weights an adapter trained for that export would have seen.

    .venv/bin/python bench/bench_transcode.py [--tokens 64] [--runs 5]
    .venv/bin/python bench/bench_transcode.py --base gemma3-270m   # a K-quant mixture

``--base gemma3-270m``: the Gemma 3 270M Q4_K_M file (Q4_K, Q5_0, Q6_K and Q8_0 tensors)
transcoded as it is, against the builder's int4 of the same dequantized weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx import PROMPT, decode_once  # noqa: E402
from common import header, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--base", default="default", help="'default' (embedded SmolLM2) or gemma3-270m")
    args = ap.parse_args()
    header(f"ONNX int4: GGUF blocks transcoded vs the builder's own int4 ({args.base})")
    from edgeia3.steps.onnx_export import export
    from edgeia3.base import load_base
    from edgeia3.runtimes.onnx_runtime import OnnxRuntime

    configs = {"builder int4": ("builder", "gguf"), "Q4_1 blocks (default)": ("auto", "gguf"),
               "q4_0 blocks (--weights q4_0)": ("q4_0", "q4_0")}
    if args.base != "default":  # a K-quant file: its own mixture is the default route
        configs = {"builder int4": ("builder", "gguf"), "its GGUF blocks (default)": ("auto", "gguf")}
    # a base model has no chat template: its prompt is the message's text as it stands
    prompt = PROMPT if args.base == "default" else PROMPT[0]["content"]
    with tempfile.TemporaryDirectory() as tmp:
        rts, rows = {}, {}
        for label, (weights, trained_as) in configs.items():
            res = export(base=args.base, out=Path(tmp) / weights, weights=weights)
            rts[label] = OnnxRuntime(res.out)
            rows[label] = {"export": label, "model MB": round(res.manifest.model_bytes / 1e6, 1)}
            ref = load_base(args.base, quant=trained_as)
            ids = rts[label].prompt_ids(prompt)
            with torch.no_grad():
                want = ref.model(input_ids=torch.tensor([ids])).logits[0].numpy()
            got = rts[label].logits(ids)
            rows[label]["mean |dlogit| vs trained-as"] = round(float(np.abs(got - want).mean()), 3)
            rows[label]["argmax agree"] = f"{np.mean(got.argmax(-1) == want.argmax(-1)):.0%}"
            del ref
        ids = next(iter(rts.values())).prompt_ids(prompt)
        speeds: dict[str, list[float]] = {k: [] for k in rts}
        for label, rt in rts.items():
            decode_once(rt, ids, 8)  # warm-up
        for _ in range(args.runs):  # interleaved, so drift of the machine's speed hits all alike
            for label, rt in rts.items():
                speeds[label].append(decode_once(rt, ids, args.tokens))
        for label in rts:
            rows[label]["decode tok/s"] = round(statistics.median(speeds[label]), 1)
    print(table(list(rows.values())))
    b = rows["builder int4"]["decode tok/s"]
    for label in list(rows)[1:]:
        print(f"{label} / builder int4 decode: {rows[label]['decode tok/s'] / b:.2f}x (goal >= 0.95)")


if __name__ == "__main__":
    main()
