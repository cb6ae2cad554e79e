"""Falcon: fused query_key_value layouts, the non-gated GELU MLP, training, inspect, refusals,
and edgeia3's transformers -> GGUF writer against the real llama.cpp.

Merge parity and PEFT round trips on the default tiny Falcon also run in
test_merge_parity.py (FAMILIES); here: the other layouts, and that the
registry's q/k/v rows are the ones the model's own forward computes with.
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from edgeia3 import EdgeIA3Error, load_adapter_for, load_base, merge_loaded, write_peft_dir
from edgeia3.converters.gguf.base_gguf import GGUFBase
from edgeia3.converters.gguf.hf_writer import write_hf_gguf
from edgeia3.fingerprint import identity_of_dir
from edgeia3.formats import load_adapter
from edgeia3.registry import get_family
from edgeia3.runtimes.llama_runtime import LlamaCppRuntime
from edgeia3.validate import adapter_for_base
from cli_checks import assert_refused, invoke, merge_cli
from test_gguf_families import IDS, TOL, assert_deploys
from tiny_models import logits, make_tiny_model, random_peft_adapter, write_label_task

ALL_SITES = ["q", "k", "v", "o", "up", "down"]
# Layouts whose q/k/v rows are contiguous: [q (4 heads); k (1 head); v (1 head)].
SUPPORTED = {
    "multi_query": {},  # FalconConfig's default (Falcon-7B)
    "new_arch_1kv": {"new_decoder_architecture": True, "num_kv_heads": 1},  # two layer norms
    "bias_sequential": {"bias": True, "parallel_attn": False},  # biases scale with their rows
}
# Layouts that interleave q, k, v per head group: refused, naming the config field.
REFUSED = {
    "new_arch_2kv": ({"new_decoder_architecture": True, "num_kv_heads": 2}, "num_kv_heads=2"),
    "multi_head": ({"multi_query": False}, "multi_query=False"),
}


def _with_vectors(adapter, **values):
    """A copy of ``adapter`` whose vectors of the named sites are ``values[site]`` in every layer."""
    vectors = [replace(v, values=np.asarray(values[v.site], np.float32)) for v in adapter.vectors]
    return replace(adapter, vectors=vectors)


def _dense_inputs(model) -> list[torch.Tensor]:
    """What each layer's public ``self_attention.dense`` receives: the heads' outputs, concatenated."""
    seen = []
    hooks = [layer.self_attention.dense.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
             for layer in model.transformer.h]
    try:
        logits(model)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("variant", list(SUPPORTED))
def test_supported_layouts_merge_like_peft(variant, tiny_dir, tmp_path):
    base = load_base(tiny_dir("falcon", **SUPPORTED[variant]))
    assert base.family.name == "falcon"
    hd = 64 // 4
    assert [base.family.site(s).fused_rows(base.config) for s in "qkv"] == [(0, 4 * hd), (4 * hd, 5 * hd),
                                                                              (5 * hd, 6 * hd)]
    pm = random_peft_adapter(copy.deepcopy(base.model), "falcon", tmp_path / "peft", sites=ALL_SITES)
    reference = logits(pm.merge_and_unload())
    assert (reference - logits(base.model)).abs().max() > 1e-3
    adapter = load_adapter_for(tmp_path / "peft", base)
    assert adapter.sites == ALL_SITES and adapter.get(0, "k").values.size == hd
    write_peft_dir(adapter, tmp_path / "ours")  # and it goes back to PEFT unchanged
    again = PeftModel.from_pretrained(load_base(tiny_dir("falcon", **SUPPORTED[variant])).model, tmp_path / "ours")
    assert (logits(again) - reference).abs().max() <= 1e-5
    assert (logits(merge_loaded(base, adapter)) - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", list(SUPPORTED))
def test_qkv_rows_are_what_the_model_computes(variant, tiny_dir):
    """The registry's q/k/v rows, checked only through the model's own forward (no private
    methods): v rows scale every head's attention output by the same per-dim vector; q rows
    scaled by l and k rows by 1/l (l equal on each rotary pair) leave the attention scores,
    hence the logits, unchanged, while q alone changes them."""
    path = tiny_dir("falcon", **SUPPORTED[variant])
    base = load_base(path)
    n_head, hd = base.config.num_attention_heads, 64 // 4
    template = adapter_for_base(base, ["q", "k", "v"])
    rng = np.random.default_rng(3)
    half = (0.5 + 2.5 * rng.random(hd // 2)).astype(np.float32)
    pair = np.concatenate([half, half])  # rotary mixes dims d and d + hd/2: keep them equal
    ones = np.ones(hd, np.float32)
    v_vec = (1 + 0.3 * rng.standard_normal(hd)).astype(np.float32)

    reference = _dense_inputs(base.model)[0]  # the first layer's: later ones see its changed output
    v_only = merge_loaded(load_base(path), _with_vectors(template, q=np.tile(ones, n_head), k=ones, v=v_vec))
    got = _dense_inputs(v_only)[0]
    assert (got - reference * torch.from_numpy(np.tile(v_vec, n_head))).abs().max() <= 1e-5
    assert (got - reference).abs().max() > 1e-3

    base_logits = logits(base.model)
    balanced = merge_loaded(load_base(path), _with_vectors(template, q=np.tile(pair, n_head), k=1 / pair, v=ones))
    unchanged = float((logits(balanced) - base_logits).abs().max())
    assert unchanged <= 1e-4
    q_only = merge_loaded(load_base(path), _with_vectors(template, q=np.tile(pair, n_head), k=ones, v=ones))
    assert float((logits(q_only) - base_logits).abs().max()) > 20 * max(unchanged, 1e-6)


@pytest.mark.parametrize("variant", list(REFUSED))
def test_interleaved_layouts_are_refused(variant, tiny_dir, tmp_path):
    overrides, field = REFUSED[variant]
    path = tiny_dir("falcon", **overrides)
    with pytest.raises(EdgeIA3Error, match=field) as err:
        load_base(path)
    assert "interleaves q, k and v" in str(err.value)
    # a PEFT adapter made on it by transformers directly: the CLI merge refuses, leaves nothing
    from transformers import AutoModelForCausalLM

    random_peft_adapter(AutoModelForCausalLM.from_pretrained(path), "falcon", tmp_path / "peft")
    out = tmp_path / "merged"
    assert_refused(merge_cli(path, tmp_path / "peft", out), out, field, "falcon")
    # inspect still describes the directory (it needs no row ranges)
    res = invoke("inspect", path)
    assert res.exit_code == 0 and "falcon" in res.output


def test_down_folds_only_as_float_columns(tiny_dir, tmp_path):
    """down scales dense_4h_to_h's input: exact as float column scaling (the torch merge),
    impossible as a fold into dense_h_to_4h's rows under GELU, exact under ReLU for l > 0."""
    fam = get_family("falcon")
    assert not fam.gated_mlp and fam.input_fold_site("down") is None
    for act, exact in (("gelu", False), ("relu", True)):
        base = load_base(tiny_dir("falcon", activation=act))
        pm = random_peft_adapter(copy.deepcopy(base.model), "falcon", tmp_path / act, sites=["down"])
        with torch.no_grad():  # positive scales, so the ReLU fold is exact
            for p in (p for n, p in pm.named_parameters() if "ia3_l" in n):
                p.abs_()
        reference = logits(pm)
        adapter = load_adapter_for(tmp_path / act, base)
        assert (logits(merge_loaded(load_base(tiny_dir("falcon", activation=act)), adapter))
                - reference).abs().max() <= 1e-5
        with torch.no_grad():
            for v in adapter.vectors:
                base.model.transformer.h[v.layer].mlp.dense_h_to_4h.weight.mul_(torch.from_numpy(v.values)[:, None])
        assert bool((logits(base.model) - reference).abs().max() <= 1e-5) is exact, act


def _falcon_gguf(path, kv_heads: int = 1):
    """A tiny falcon GGUF in llama.cpp's layout (attn_qkv rows already [q; k; v])."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(kv_heads)
    qkv = 32 + 2 * 8 * kv_heads
    tensors = {"token_embd.weight": (16, 32), "output_norm.weight": (32,), "blk.0.attn_qkv.weight": (qkv, 32),
               "blk.0.attn_output.weight": (32, 32), "blk.0.ffn_up.weight": (64, 32),
               "blk.0.ffn_down.weight": (32, 64)}
    for name, shape in tensors.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_block_merge_refuses_down(tmp_path):
    from edgeia3.converters.gguf.base_gguf import GGUFBase

    path = _falcon_gguf(tmp_path / "falcon.gguf")
    base = GGUFBase(path)
    assert base.family.name == "falcon"
    assert [base.family.site(s).fused_rows(base.config) for s in "qkv"] == [(0, 32), (32, 40), (40, 48)]
    out = tmp_path / "out.gguf"
    down = adapter_for_base(base, ["k", "down"], seed=1).save(tmp_path / "d.safetensors")
    assert_refused(merge_cli(path, down, out), out, "no gated mlp", "ffn_down", "falcon")
    kv = adapter_for_base(base, ["k", "v"], seed=1).save(tmp_path / "kv.safetensors")
    assert merge_cli(path, kv, out).exit_code == 0  # fused qkv rows merge as block scales
    # several KV heads: llama.cpp's [q; k; v] rows are not transformers' (PEFT's) order
    grouped = GGUFBase(_falcon_gguf(tmp_path / "falcon2.gguf", kv_heads=2))
    with pytest.raises(EdgeIA3Error, match="head_count_kv=2"):
        adapter_for_base(grouped, ["k"])


def test_onnx_export_refuses_falcon(tiny_dir, tmp_path):
    from edgeia3.steps.onnx_export import export

    with pytest.raises(EdgeIA3Error, match="does not support the 'falcon' family"):
        export(base=str(tiny_dir("falcon", tokenizer=True)), out=tmp_path / "onnx")
    assert not list(tmp_path.iterdir())


# -- edgeia3's transformers -> GGUF writer, checked against the real llama.cpp -----------

# What llama.cpp's falcon graph computes: parallel attention + MLP, one KV head.
GGUF_LAYOUTS = {
    "multi_query": {},  # Falcon-7B: one input_layernorm (GGUF attn_norm) feeds both
    "new_arch_1kv": SUPPORTED["new_arch_1kv"],  # ln_attn -> attn_norm_2, ln_mlp -> attn_norm
    "new_arch_1kv_one_ln": {**SUPPORTED["new_arch_1kv"], "num_ln_in_parallel_attn": 1},
}
# Configs llama.cpp's falcon graph would compute differently (or not load): refused, naming the field.
GGUF_REFUSED = {
    "alibi": ({"alibi": True}, "alibi=True"),
    "sequential": ({"parallel_attn": False}, "parallel_attn=False"),
    "bias": ({"bias": True}, "bias=True"),
    "relu": ({"activation": "relu"}, "activation=relu"),
    "rope_scaling": ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
                     "RoPE scaling 'linear'"),
    **REFUSED,  # several KV groups: the rows would need llama.cpp's regrouping
}


def _gguf_of(tiny_dir, tmp_path, **overrides):
    d = tiny_dir("falcon", **overrides)
    written = write_hf_gguf(d, tmp_path / "falcon.gguf", dtype="f32")
    assert written.family.name == "falcon"
    return d, written.path


def _hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("layout", list(GGUF_LAYOUTS))
def test_gguf_writer_matches_llama_cpp(layout, tiny_dir, tmp_path):
    """llama.cpp computes transformers' logits from the written file (transformers' erf GELU vs
    llama.cpp's tanh GELU stays within the other families' floor: 1.7e-4 measured here, the
    same as with transformers' tanh GELU); the GGUF read back has the dir's identity."""
    d, path = _gguf_of(tiny_dir, tmp_path, **GGUF_LAYOUTS[layout])
    reader = gguf.GGUFReader(str(path))
    ffn, kv = (int(reader.fields[f"falcon.{k}"].parts[-1][0]) for k in ("feed_forward_length",
                                                                        "attention.head_count_kv"))
    assert (ffn, kv) == (96, 1)  # the true FFN width (llama.cpp's converter writes 4 * hidden) and one KV head
    names = {t.name for t in reader.tensors}
    assert ("blk.0.attn_norm_2.weight" in names) == (layout == "new_arch_1kv")
    assert not any(n.startswith("output.") for n in names)  # tied: llama.cpp reuses token_embd
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    want = _hf_logits(model)
    with LlamaCppRuntime(path) as rt:
        got = rt.logits(IDS)
    assert got.shape == want.shape == (len(IDS), 128)
    assert np.abs(got - want).max() < TOL, np.abs(got - want).max()
    if layout == "new_arch_1kv":  # the two norms are told apart: swapped, the logits differ
        for layer in model.transformer.h:
            layer.ln_attn, layer.ln_mlp = layer.ln_mlp, layer.ln_attn
        assert np.abs(got - _hf_logits(model)).max() > 10 * TOL
    ident = identity_of_dir(d, get_family("falcon"))
    assert GGUFBase(path).identity.matches(ident)


def test_gguf_loads_back_as_a_transformers_base(tiny_dir, tmp_path):
    """The reverse direction (train on the GGUF): transformers' own GGUF reader builds the
    same Falcon-7B-style model. Its falcon reader assumes an FFN of 4 * hidden, as llama.cpp's
    converter writes it, so this layout uses that width."""
    d, path = _gguf_of(tiny_dir, tmp_path, ffn_hidden_size=256)
    from_gguf, from_dir = load_base(str(path), quant="none"), load_base(d)
    assert from_gguf.identity.matches(from_dir.identity)
    assert (logits(from_gguf.model) - logits(from_dir.model)).abs().max() <= 1e-5
    # Falcon-40B's two norms: transformers' reader drops attn_norm_2 and would build another model
    _, two_norms = _gguf_of(tiny_dir, tmp_path / "two", ffn_hidden_size=256, **GGUF_LAYOUTS["new_arch_1kv"])
    with pytest.raises(EdgeIA3Error, match="attn_norm_2"):
        load_base(str(two_norms), quant="none")


@pytest.mark.parametrize("layout", ["multi_query", "new_arch_1kv"])
def test_adapter_for_the_dir_deploys_on_its_gguf(layout, tiny_dir, tmp_path):
    """Side adapter (swapped in and back out in place) and merged export on llama.cpp equal
    PEFT for q, k, v; a ``down`` vector (GELU MLP: no row form) is refused for GGUF."""
    d, path = _gguf_of(tiny_dir, tmp_path, **GGUF_LAYOUTS[layout])
    assert_deploys(d, path, "falcon", tmp_path)


@pytest.mark.parametrize("variant", list(GGUF_REFUSED))
def test_gguf_writer_refuses_what_llama_cpp_computes_differently(variant, tmp_path):
    overrides, field = GGUF_REFUSED[variant]
    d = make_tiny_model("falcon", tmp_path / "m", **overrides)
    with pytest.raises(EdgeIA3Error, match=re.escape(field)):
        write_hf_gguf(d, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_train_lowers_loss_and_loads_back(tiny_dir, tmp_path):
    from edgeia3.train import TrainConfig, train

    base = tiny_dir("falcon", tokenizer=True)
    data = write_label_task(tmp_path / "train.jsonl", 48, seed=0)
    held = write_label_task(tmp_path / "eval.jsonl", 16, seed=1)
    cfg = TrainConfig(max_steps=12, batch_size=8, lr=3e-2)
    res = train(str(base), data, tmp_path / "ad", eval_data=held, quant="none", config=cfg, quiet=True)
    assert res.eval_after["loss"] < res.eval_before["loss"]
    assert np.mean(res.loss_curve[-3:]) < np.mean(res.loss_curve[:3])
    lb = load_base(base)
    adapter = load_adapter_for(tmp_path / "ad", lb)
    assert adapter.family == "falcon" and adapter.sites == ["q", "k", "v", "down"]
    assert max(float(np.abs(v.values - 1).max()) for v in adapter.vectors) > 1e-3
    peft = PeftModel.from_pretrained(load_base(base).model, tmp_path / "ad")  # PEFT reads it too
    assert (logits(peft) - logits(merge_loaded(lb, load_adapter(tmp_path / "ad")))).abs().max() <= 1e-5


def test_inspect_shows_falcon(tiny_dir):
    res = invoke("inspect", tiny_dir("falcon"))
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "falcon" in text and "q, k, v, down" in text
