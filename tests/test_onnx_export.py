"""ONNX export + onnxruntime(-genai) runtime on tiny random llama and qwen2 models.

Every export is built once per module (the genai builder takes ~0.5 s on
these models) and checked against PyTorch PEFT, the torch runtime, or
another export.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from edgeia3.converters.onnx.adapter_file import read_onnx_adapter
from edgeia3.converters.onnx.graph import plans_of
from edgeia3.steps.onnx_export import export
from edgeia3 import load_adapter_for, load_base, to_peft_model
from edgeia3.runtimes import open_runtime
from edgeia3.runtimes.torch_runtime import TorchRuntime
from tiny_models import VOCAB, random_peft_adapter

FAMILIES = ["llama", "qwen2"]
IDS = [int(x) for x in np.random.RandomState(0).randint(3, VOCAB, 12)]


class Tiny:
    """One family's base, two PEFT adapters and the exports built from them."""

    def __init__(self, family, tiny_dir, tmp):
        self.family, self.tmp = family, tmp
        self.base_dir = tiny_dir(family, tokenizer=True)
        self.base = load_base(self.base_dir)
        self.adapter_dirs = {}
        for name, seed in (("a", 1), ("b", 2)):
            random_peft_adapter(copy.deepcopy(self.base.model), family, tmp / f"peft_{name}", seed=seed)
            self.adapter_dirs[name] = tmp / f"peft_{name}"
        self._exports = {}

    def export(self, key, **kw):
        if key not in self._exports:
            self._exports[key] = export(base=str(self.base_dir), out=self.tmp / key, **kw)
        return self._exports[key]

    def side(self, precision="fp32", **kw):
        return self.export(f"side_{precision}{'_'.join(map(str, kw.values()))}", precision=precision,
                           adapters=self.adapter_dirs, **kw)

    def peft_logits(self, name, ids=IDS):
        ad = load_adapter_for(self.adapter_dirs[name], self.base)
        with torch.no_grad():
            return to_peft_model(copy.deepcopy(self.base.model), ad)(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tiny_dir, tmp_path_factory):
    return Tiny(request.param, tiny_dir, tmp_path_factory.mktemp(f"onnx_{request.param}"))


@pytest.fixture(scope="module")
def tiny_llama(tiny_dir, tmp_path_factory):
    """One family is enough for the ORT-format and CUDA-build checks."""
    return Tiny("llama", tiny_dir, tmp_path_factory.mktemp("onnx_llama_only"))


def test_side_fp32_matches_peft_and_no_adapter_is_base(tiny):
    rt = open_runtime(tiny.side().out)
    assert sorted(rt.adapters) == ["a", "b"]
    for name in ("a", "b"):
        rt.use_adapter(name)
        ref = tiny.peft_logits(name)
        assert np.abs(rt.logits(IDS) - ref).max() <= 1e-4
    with torch.no_grad():
        plain = tiny.base.model(input_ids=torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(ref - plain).max() > 1e-2  # the adapter really changes the model
    stock = open_runtime(tiny.export("stock_fp32", precision="fp32").out)
    rt.use_adapter(None)
    np.testing.assert_allclose(rt.logits(IDS), stock.logits(IDS), atol=1e-6, rtol=0)


def test_manifest_and_inputs(tiny):
    res = tiny.side()
    m = json.loads((res.out / "edgeia3.json").read_text())
    assert m["family"] == tiny.family and m["mode"] == "side" and m["precision"] == "fp32"
    assert m["fingerprint"] == f"{tiny.base.identity.fingerprint}/{tiny.base.identity.content}"
    names = {p["name"] for p in m["ia3_inputs"]}
    assert {"ia3.layers.0.qkv", "ia3.layers.1.qkv", "ia3.layers.0.down", "ia3.layers.1.down"} == names
    assert (res.out / "adapters" / "a.onnx_adapter").stat().st_size < 4000
    assert (res.out / "chat_template.jinja").exists()
    assert "side-tensors" in str(res)


def test_onnx_adapter_reads_back_to_canonical(tiny):
    res = tiny.side()
    m = res.manifest
    back = read_onnx_adapter(res.adapters["a"], plans_of(m), tiny.family, m.adapters["a"].sites)
    orig = load_adapter_for(tiny.adapter_dirs["a"], tiny.base)
    assert back.sites == orig.sites
    for v in orig.vectors:
        np.testing.assert_array_equal(back.get(v.layer, v.site).values, v.values)


def test_int4_merged_scale_patch_matches_int4_side(tiny):
    side = open_runtime(tiny.side("int4").out)
    merged = open_runtime(tiny.export("merged_int4", precision="int4", adapters={"a": tiny.adapter_dirs["a"]},
                                      merge="a").out)
    assert "scale rows" in merged.manifest.merged.method
    assert merged.manifest.ia3_inputs == [] and merged.adapters == []
    side.use_adapter("a")
    ls, lm = side.logits(IDS), merged.logits(IDS)
    assert np.abs(ls - lm).max() <= 1e-3 * (ls.max() - ls.min())
    side.use_adapter(None)
    assert np.abs(side.logits(IDS) - lm).max() > 1e-2  # the merge changed the weights


def test_genai_switch_a_b_a_reproduces_a(tiny):
    rt = open_runtime(tiny.side().out)
    out = {}
    for step, name in enumerate(["a", "b", "a", None]):
        rt.use_adapter(name)
        out[step] = rt.genai_last_logits(IDS)
    np.testing.assert_array_equal(out[0], out[2])
    assert np.abs(out[0] - out[1]).max() > 1e-3
    rt.use_adapter(None)
    np.testing.assert_allclose(out[3], rt.logits(IDS)[-1], atol=1e-5, rtol=0)  # genai == plain session


def test_mixed_batch_equals_per_row_runs(tiny):
    rt = open_runtime(tiny.side().out)
    rows = [IDS, IDS[:7], IDS[2:], IDS[:10]]
    names = ["a", None, "b", "a"]
    mixed = rt.forward_mixed(rows, names)
    for row, name, got in zip(rows, names, mixed):
        rt.use_adapter(name)
        assert got.shape == (len(row), VOCAB)
        np.testing.assert_allclose(got, rt.logits(row), atol=1e-5, rtol=0)
    assert np.abs(mixed[0][:7] - mixed[1]).max() > 1e-3  # rows really got different adapters


def test_greedy_20_tokens_match_torch(tiny):
    rt = open_runtime(tiny.side().out)
    ref = TorchRuntime(load_base(tiny.base_dir), {"a": load_adapter_for(tiny.adapter_dirs["a"], tiny.base)})
    for r in (rt, ref):
        r.use_adapter("a")
    got = list(rt.generate_ids(IDS, 20))
    assert got == list(ref.generate_ids(IDS, 20))
    assert len(got) > 0


def test_unfused_qkv_build_matches_fused(tiny):
    fused = open_runtime(tiny.side().out)
    unfused = open_runtime(tiny.side(fuse_qkv=False).out)
    assert any(p["name"].endswith(".v") for p in unfused.manifest.ia3_inputs)
    for name in ("a", None):
        fused.use_adapter(name)
        unfused.use_adapter(name)
        np.testing.assert_allclose(unfused.logits(IDS), fused.logits(IDS), atol=1e-5, rtol=0)


def test_mobile_ort_format_loads_and_matches(tiny_llama):
    tiny = tiny_llama
    res = tiny.export("mobile_int4", precision="int4", adapters={"a": tiny.adapter_dirs["a"]}, mobile=True)
    mob = res.manifest.extra["mobile"]
    assert mob["ort_loads"] and (res.out / "model.ort").exists()
    assert "com.microsoft:MatMulNBits" in mob["unsupported_ops"]["NNAPI"]
    assert "ai.onnx:Mul" not in mob["unsupported_ops"]["NNAPI"]  # the IA3 op itself is mobile-friendly
    rt = open_runtime(res.out)
    rt.use_adapter("a")
    ref = rt.logits(IDS)
    rt._session, rt.manifest.model_file = None, "model.ort"
    np.testing.assert_allclose(rt.logits(IDS), ref, atol=1e-6, rtol=0)


def test_cuda_targeted_build_runs_on_cpu(tiny_llama):
    tiny = tiny_llama
    res = tiny.export("cuda_int4", precision="int4", provider="cuda", adapters=tiny.adapter_dirs)
    cfg = json.loads((res.out / "genai_config.json").read_text())
    assert "cuda" in json.dumps(cfg["model"]["decoder"]["session_options"]["provider_options"])
    cuda = open_runtime(res.out, provider="cpu")  # no GPU here: run the CUDA build on the CPU EP
    cpu = open_runtime(tiny.side("int4").out)
    for r in (cuda, cpu):
        r.use_adapter("a")
    lc, lp = cuda.logits(IDS), cpu.logits(IDS)
    assert np.abs(lc - lp).max() <= 2e-2 * (lp.max() - lp.min())  # fp16 activations on the CUDA build
