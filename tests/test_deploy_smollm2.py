"""The embedded SmolLM2: an adapter trained a few steps with the defaults (the GGUF's own
Q4_1 blocks) gives the same greedy answers in PyTorch, llama.cpp and onnxruntime-genai.

Compute floors (measured on SmolLM2, base model, same weights everywhere):
- llama.cpp vs PyTorch: mean |dlogit| ~0.2-0.4 (its q8 activation dot products, FACTS.md);
- onnxruntime int4 at accuracy_level 4 (int8 activations) vs PyTorch: mean ~0.5;
  at accuracy_level 1 (fp32 compute) ~3e-5: the transcoded weights are the GGUF's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeia3.export import export_gguf, export_onnx, read_export
from edgeia3.report import reference_base, trained_as
from edgeia3.runtimes import open_runtime
from edgeia3.runtimes.torch_runtime import TorchRuntime
from edgeia3.train import TrainConfig, train

pytestmark = pytest.mark.integration

SYSTEM = "Classify the sentiment of the review. Answer with exactly one word: positive, negative, or neutral."
PROMPTS = ["The battery died after one day, awful.", "Best concert I have been to in years!",
           "The package arrived on Tuesday."]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, smollm2):
    tmp = tmp_path_factory.mktemp("deploy")
    rows = [json.loads(x) for x in open("examples/tasks/sentiment/train.jsonl")][:48]
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = train("default", data, tmp / "ad", quiet=True, config=TrainConfig(max_steps=6))
    assert res.adapter.quant == "gguf" and res.adapter.trained_on["quant"] == "q4_1"
    dirs = {
        "gguf": export_gguf("default", tmp / "gguf", adapters={"s": str(tmp / "ad")}).out,
        "gguf_merged": export_gguf("default", tmp / "ggufm", adapters={"s": str(tmp / "ad")}, merge="s").out,
        "onnx": export_onnx("default", tmp / "onnx", adapters={"s": str(tmp / "ad")}).out,
        "onnx_fp32_compute": export_onnx("default", tmp / "onnx1", adapters={"s": str(tmp / "ad")},
                                         accuracy_level=1).out,
    }
    info = read_export(dirs["gguf"])
    adapter = info.adapters()["s"]
    ref_base, _ = reference_base(info.base_spec, trained_as(adapter))
    ref = TorchRuntime(ref_base, {"s": adapter})
    return dirs, ref


def _answers(rt, name):
    rt.use_adapter(name)
    out = []
    for p in PROMPTS:
        ids = rt.prompt_ids([{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}])
        out.append(list(rt.generate_ids(ids, 4)))
    return out


def test_exports_run_the_trained_weights(deployed):
    dirs, _ = deployed
    for key in ("gguf", "onnx"):
        m = json.loads((dirs[key] / "edgeia3.json").read_text())
        assert m["weights"]["quant"] == "q4_1" and m["adapters"]["s"]["same_weights"] is True
        assert not any("accuracy to drop" in n for n in m["notes"])


def test_same_greedy_answers_everywhere(deployed):
    dirs, ref = deployed
    want = _answers(ref, "s")
    assert len({tuple(a) for a in want}) > 1  # the prompts get different answers
    for key, name in (("gguf", "s"), ("gguf_merged", None), ("onnx", "s")):
        rt = open_runtime(dirs[key])
        assert _answers(rt, name) == want, key
        getattr(rt, "close", lambda: None)()


def test_logits_within_each_runtimes_floor(deployed):
    dirs, ref = deployed
    ref.use_adapter("s")
    ids = ref.prompt_ids([{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[0]}])
    want = ref.logits(ids)
    floors = {"gguf": 1.0, "onnx": 1.0, "onnx_fp32_compute": 1e-3}  # mean |dlogit|
    for key, floor in floors.items():
        rt = open_runtime(dirs[key])
        rt.use_adapter("s")
        got = rt.logits(ids)
        mean = float(np.abs(got - want).mean())
        assert mean < floor, (key, mean)
        assert np.mean(got.argmax(-1) == want.argmax(-1)) > 0.8, key
        getattr(rt, "close", lambda: None)()
