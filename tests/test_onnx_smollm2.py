"""ONNX export of the embedded SmolLM2-135M-Instruct: int4 side/merged, fp32 vs PyTorch PEFT.

fp32 tolerance: the ONNX base export alone (no IA3) differs from transformers
by ~1.5e-4 max abs on these logits (range ~60): ORT's GroupQueryAttention and
MLAS kernels round differently over 30 layers (transformers' own sdpa vs eager
attention differ by 5e-5). The IA3 part adds nothing of its own: on the tiny
models side mode matches PEFT to ~2e-7. Here we hold side mode to 1e-3 and
greedy decoding to token equality.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeia3 import load_adapter_for, to_peft_model
from edgeia3.cli import app
from edgeia3.runtimes import open_runtime
from tiny_models import random_peft_adapter

pytestmark = pytest.mark.integration
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def work(smollm2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx_smollm2")
    for name, seed in (("a", 1), ("b", 2)):
        random_peft_adapter(copy.deepcopy(smollm2.model), "llama", tmp / name, seed=seed)
    return tmp


@pytest.fixture(scope="module")
def int4_side(work):
    """The issue's command: int4, two adapters, through the CLI; timed."""
    out = work / "int4_side"
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["export", "onnx", "--base", "default", "--precision", "int4", "--out", str(out),
                                   "--adapter", f"a={work / 'a'}", "--adapter", f"b={work / 'b'}"])
    assert res.exit_code == 0, res.output
    return out, time.perf_counter() - t0


def test_int4_export_time(int4_side):
    _, seconds = int4_side
    assert seconds < 70  # goal: < 60 s + 10 s per extra adapter on 2 cores (shared CI cores: noisy)


def test_int4_merged_matches_side(work):
    """Scale-patched merge == side mode at accuracy_level=1 (fp32 compute on int4 weights).

    At the builder's default accuracy_level=4 the kernel quantizes activations to
    int8 per block; the two graphs round x*l differently in the last bit, some int8
    roundings flip, and this model amplifies that to ~1.7 max abs (its int4 error
    vs fp32 is ~10), so exactness can only be checked with fp32 compute.
    """
    from edgeia3.steps.onnx_export import export

    # the builder's own int4 weights, whose MatMulNBits scale rows the merge patches
    kw = dict(base="default", precision="int4", adapters={"a": work / "a"}, accuracy_level=1, weights="builder")
    side = open_runtime(export(out=work / "int4_side_acc1", **kw).out)
    merged = open_runtime(export(out=work / "int4_merged_acc1", merge="a", **kw).out)
    assert "scale rows" in merged.manifest.merged.method
    ids = side.prompt_ids(MESSAGES)
    side.use_adapter("a")
    ls, lm = side.logits(ids), merged.logits(ids)
    assert np.abs(ls - lm).max() <= 1e-3 * (ls.max() - ls.min())
    side.use_adapter(None)
    assert np.abs(side.logits(ids) - lm).max() > 0.1


def test_int4_switch_a_b_a(int4_side):
    side = open_runtime(int4_side[0])
    ids = side.prompt_ids(MESSAGES)
    seen = []
    for name in ("a", "b", "a"):
        side.use_adapter(name)
        seen.append(side.genai_last_logits(ids))
    np.testing.assert_array_equal(seen[0], seen[2])
    assert np.abs(seen[0] - seen[1]).max() > 1e-2


def test_fp32_side_matches_peft_and_greedy_decoding(smollm2, work):
    from edgeia3.steps.onnx_export import export

    rt = open_runtime(export(base="default", out=work / "fp32_side", precision="fp32",
                             adapters={"a": work / "a"}).out)
    rt.use_adapter("a")
    ids = rt.prompt_ids(MESSAGES)
    peft = to_peft_model(copy.deepcopy(smollm2.model), load_adapter_for(work / "a", smollm2))
    with torch.no_grad():
        ref = peft(input_ids=torch.tensor([ids])).logits[0].numpy()
        want = peft.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    assert np.abs(rt.logits(ids) - ref).max() <= 1e-3
    got = list(rt.generate_ids(ids, 20))
    eos = set(rt.eos_ids())
    assert got == [t for t in want if t not in eos][: len(got)] and len(got) >= min(5, len(want) - 1)
    assert "Paris" in rt.detokenize(got)
