"""ONNX export of the other families onnxruntime-genai's builder supports, against PEFT.

Each tiny base turns on what the builder could get wrong for its family
(verified against transformers' logits, not assumed): a sliding window shorter
than the prompt, Gemma 2's soft-capping and query_pre_attn_scalar (256, not
head_dim 16), Gemma 3's two RoPE bases, phi3's fused qkv_proj/gate_up_proj.
Every export is built once per module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeia3 import EdgeIA3Error, load_base
from edgeia3.steps.onnx_export import export
from edgeia3.registry import family_for_config
from edgeia3.runtimes import open_runtime
from test_onnx_export import IDS, Tiny
from tiny_models import make_tiny_model, make_tiny_tokenizer

CASES = {
    "mistral": {"sliding_window": 4},  # the builder windows only layers that layer_types marks sliding
    "qwen3": {},
    "gemma2": {"sliding_window": 4},  # + its defaults: soft-capping 50/30, query_pre_attn_scalar 256
    "gemma3_text": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    # 2 KV heads would give qkv_proj 128 = vocab rows, which the builder takes for the LM head (refused below)
    "phi3": {"num_key_value_heads": 1},
}


def _base(tmp, family, **overrides):
    """tiny_dir cannot cache list-valued overrides (layer_types), so build the base here."""
    out = make_tiny_model(family, tmp / f"base_{family}", **overrides)
    make_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module", params=list(CASES))
def tiny(request, tmp_path_factory):
    family, tmp = request.param, tmp_path_factory.mktemp(f"onnx_{request.param}")
    base = _base(tmp, family, **CASES[family])
    registered = family_for_config(json.loads((base / "config.json").read_text())).name  # mistral: llama
    return Tiny(registered, lambda _family, **_kw: base, tmp)


def test_side_fp32_matches_peft(tiny):
    rt = open_runtime(tiny.side().out)
    with torch.no_grad():
        plain = tiny.base.model(input_ids=torch.tensor([IDS])).logits[0].numpy()
    for name in ("a", "b"):
        rt.use_adapter(name)
        ref = tiny.peft_logits(name)
        assert np.abs(rt.logits(IDS) - ref).max() <= 1e-4
        assert np.abs(ref - plain).max() > 1e-2  # the adapter really changes the model
    rt.use_adapter(None)
    assert np.abs(rt.logits(IDS) - plain).max() <= 1e-4


def test_merged_fp32_matches_peft(tiny):
    res = tiny.export("merged_fp32", precision="fp32", adapters={"a": tiny.adapter_dirs["a"]}, merge="a")
    assert res.manifest.mode == "merged"
    assert np.abs(open_runtime(res.out).logits(IDS) - tiny.peft_logits("a")).max() <= 1e-4


def test_int4_merged_matches_int4_side(tiny):
    side = open_runtime(tiny.side("int4").out)
    merged = open_runtime(tiny.export("merged_int4", precision="int4", adapters={"a": tiny.adapter_dirs["a"]},
                                      merge="a").out)
    assert "scale rows" in merged.manifest.merged.method
    side.use_adapter("a")
    ls, lm = side.logits(IDS), merged.logits(IDS)
    assert np.abs(ls - lm).max() <= 1e-3 * (ls.max() - ls.min())
    side.use_adapter(None)
    assert np.abs(side.logits(IDS) - lm).max() > 1e-2  # the merge changed the weights


def test_gpt2_is_refused_by_name(tiny_dir, tmp_path):
    with pytest.raises(EdgeIA3Error, match=r"does not support the 'gpt2' family.*supported families: .*phi3"):
        export(base=str(tiny_dir("gpt2", tokenizer=True)), out=tmp_path / "gpt2", precision="fp32")


def test_vocab_sized_linear_is_refused(tiny_dir, tmp_path):
    with pytest.raises(EdgeIA3Error, match=r"model\.layers\.0\.self_attn\.qkv_proj has vocab_size=128 outputs"):
        export(base=str(tiny_dir("phi3", tokenizer=True)), out=tmp_path / "phi3", precision="fp32")


def test_gemma3_scaled_full_rope_with_sliding_layers_is_refused(tmp_path):
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    base = _base(tmp_path, "gemma3_text", rope_parameters=rope)  # both tiny layers slide
    with pytest.raises(EdgeIA3Error, match=r"rope_parameters\.full_attention\.rope_type='linear'"):
        export(base=str(base), out=tmp_path / "g3", precision="fp32")


def test_gemma3_old_config_names_build(tmp_path):
    """A hub Gemma 3 config.json (rope_theta, rope_local_base_freq, rope_scaling), which transformers 5
    reads as per-layer-type rope_parameters; the builder failed on it with KeyError 'rope_type'."""
    base = _base(tmp_path, "gemma3_text", layer_types=["sliding_attention", "full_attention"])
    cfg = json.loads((base / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rope_theta=rope["full_attention"]["rope_theta"], rope_scaling=None,
               rope_local_base_freq=rope["sliding_attention"]["rope_theta"])
    (base / "config.json").write_text(json.dumps(cfg))
    lb = load_base(str(base))
    with torch.no_grad():
        ref = lb.model(input_ids=torch.tensor([IDS])).logits[0].numpy()
    res = export(base=str(base), out=tmp_path / "fp32", precision="fp32")
    assert np.abs(open_runtime(res.out).logits(IDS) - ref).max() <= 1e-4
    assert json.loads((base / "config.json").read_text()) == cfg  # the base folder is left as it was
    export(base=str(base), out=tmp_path / "int4", precision="int4")  # the reported build


def test_phi3_gguf_weights_are_refused(tmp_path):
    """llama.cpp keeps phi3's gate_up_proj fused (ffn_up), the builder splits it: no transcode."""
    base = _base(tmp_path, "phi3", **CASES["phi3"])
    with pytest.raises(EdgeIA3Error, match="phi3 family's fused GGUF tensors"):
        export(base=str(base), out=tmp_path / "q4", precision="int4", weights="q4_0")
