"""The deployed model is the trained model: training on a GGUF's own blocks, the same
blocks transcoded into ONNX MatMulNBits, and the warnings when weights differ.

Oracles from outside edgeia3: gguf-py's ``quants.dequantize`` for block decoding,
transformers' own GGUF loader (dequantize + its q/k un-permutation) for which rows
each weight holds, onnxruntime for what the transcoded graph computes.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, quants
from onnx import helper, numpy_helper
from transformers import AutoModelForCausalLM

from edgeia3.converters.gguf.blocks import SCALE_FIELDS
from edgeia3.converters.gguf.decompose import SUPPORTED, decompose, float_values
from edgeia3.converters.gguf.torch_weights import GGUFLinear, PackedWeight
from edgeia3.steps.onnx_export import export as export_onnx
from edgeia3 import load_base
from edgeia3.base import quantized_gguf, resolve_base
from tiny_models import random_peft_adapter

IDS = [5, 17, 99, 3, 42, 77, 8, 120, 64, 33, 11, 90]
# llama.cpp ftypes whose mixes cover every block family: 4/8-bit without minimum,
# with minimum (Q4_1, K-quants), 16-value sub-blocks (Q2_K/Q3_K/Q6_K), 5-bit
TRAIN_QUANTS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k"]
ONNX_QUANTS = ["q4_0", "q4_1", "q4_k_m", "q6_k", "q8_0"]


@pytest.mark.parametrize("qt", SUPPORTED, ids=lambda t: t.name)
def test_block_decoding_equals_gguf_py(qt):
    """Random blocks (sane fp16 scales): decompose and the torch weights equal gguf-py bit for bit."""
    rng = np.random.default_rng(int(qt))
    values, size = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(5, 3, size), dtype=np.uint8)
    for off in SCALE_FIELDS[qt]:
        raw[:, :, off:off + 2] = (0.05 * rng.standard_normal((5, 3, 1))).astype(np.float16).view(np.uint8)
    want = quants.dequantize(raw.reshape(5, -1), qt)
    d = decompose(raw, qt, 3 * values)
    assert np.array_equal(d.dequantize(), want)
    assert np.array_equal(PackedWeight(d).dequantize().numpy(), want)
    assert d.q.max() < 2 ** d.bits


@pytest.mark.parametrize("qt,dtype", [(T.F32, np.float32), (T.F16, np.float16)])
def test_float_tensors_equal_gguf_py(qt, dtype):
    w = np.random.default_rng(0).standard_normal((4, 32)).astype(dtype)
    raw = w.view(np.uint8).reshape(4, -1)
    assert np.array_equal(float_values(raw, qt, 32), quants.dequantize(raw, qt).astype(np.float32))


def test_bf16_tensor_equals_gguf_py():
    bits = np.random.default_rng(1).integers(0, 2 ** 15, size=(4, 32), dtype=np.uint16)  # positive, finite
    raw = bits.view(np.uint8).reshape(4, -1)
    assert np.array_equal(float_values(raw, T.BF16, 32), quants.dequantize(raw, T.BF16))


@pytest.fixture(scope="module")
def tiny256(tiny_dir):
    """A tiny llama with rows of 256/512 (K-quant super-blocks) and a tokenizer."""
    return tiny_dir("llama", hidden_size=256, intermediate_size=512, tokenizer="bpe")


def _transformers_weights(gguf_path) -> dict[str, torch.Tensor]:
    """What transformers' GGUF loader makes of the file (dequantized, q/k rows un-permuted)."""
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("quant", TRAIN_QUANTS)
def test_training_weights_are_the_gguf_blocks(tiny256, quant):
    """load_base(--quant Q) runs llama.cpp's Q quantization of the base, value for value,
    with embeddings and LM head from the same file; norms untouched."""
    lb = load_base(tiny256, quant=quant)
    assert lb.quant == "gguf" and lb.weights["quant"] == quant
    path = quantized_gguf(resolve_base(tiny256), quant)
    want = _transformers_weights(path)
    linears = {n: m for n, m in lb.model.named_modules() if isinstance(m, GGUFLinear)}
    assert len(linears) == 2 * 7
    for name, module in linears.items():
        assert torch.equal(module.dequantized_weight(), want[name + ".weight"]), name
    emb = lb.model.get_input_embeddings().weight
    assert torch.equal(emb, want["model.embed_tokens.weight"])
    # one quantization, once: a second load reuses the cached file
    assert quantized_gguf(resolve_base(tiny256), quant) == path


def test_gguf_training_steps_learn_and_keep_memory_small(tiny256, tmp_path):
    """Gradients reach the IA3 vectors through the packed layers (no fp32 weight kept)."""
    from tiny_models import write_label_task

    from edgeia3.train import TrainConfig, train

    task = write_label_task(tmp_path / "t.jsonl", 24)
    res = train(str(tiny256), task, tmp_path / "ad", quant="q4_k_m", quiet=True,
                config=TrainConfig(max_steps=6, batch_size=4, lr=3e-2))
    assert res.adapter.quant == "gguf" and res.adapter.trained_on["quant"] == "q4_k_m"
    assert res.loss_curve[-1] < res.loss_curve[0]
    assert any(np.abs(v.values - 1).max() > 1e-3 for v in res.adapter.vectors)


def _nbits_weight(graph: onnx.GraphProto, inits: dict, node: onnx.NodeProto) -> np.ndarray:
    """Independent decoding of a MatMulNBits node (+ edgeia3's block-minimum term) to W [N, K]."""
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    n, k, bits, block = a["N"], a["K"], a["bits"], a["block_size"]
    b = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1)
    if bits == 4:
        q = np.stack([b & 15, b >> 4], axis=-1).reshape(n, -1)[:, :k].astype(np.float32)
    else:
        q = b[:, :k].astype(np.float32)
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1)
    zp = np.full(scales.shape, 2 ** (bits - 1), np.float32)
    if len(node.input) > 3 and node.input[3]:
        z = numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1)
        zp = (np.stack([z & 15, z >> 4], -1).reshape(n, -1) if bits == 4 else z)[:, :scales.shape[1]]
    w = (q.reshape(n, -1, block) - zp[:, :, None].astype(np.float32)) * scales[:, :, None]
    users = [u for u in graph.node if node.output[0] in u.input]
    if len(users) == 1 and users[0].name.endswith("/gguf_min/Add"):
        table = next(numpy_helper.to_array(inits[i]) for u in graph.node if u.output[0] in users[0].input
                     and u.name.endswith("/gguf_min/MatMul") for i in u.input if i in inits)
        w = w + table.T[:, :, None]
    return w.reshape(n, k)


@pytest.mark.parametrize("quant", ONNX_QUANTS)
def test_onnx_int4_runs_the_gguf_blocks(tiny256, tmp_path, quant):
    """The transcoded int4 export holds exactly the GGUF's dequantized weights, and at
    accuracy_level 1 (fp32 compute) its logits equal PyTorch on the same blocks."""
    res = export_onnx(str(tiny256), tmp_path / "o", "int4", weights=quant, accuracy_level=1)
    assert res.manifest.weights["quant"] == quant and res.manifest.extra["transcoded"]
    want = _transformers_weights(quantized_gguf(resolve_base(tiny256), quant))
    model = onnx.load(str(tmp_path / "o" / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    checked = 0
    for i in range(2):
        for onnx_name, hf in (("attn/qkv_proj", ("q_proj", "k_proj", "v_proj")), ("attn/q_proj", ("q_proj",)),
                              ("attn/k_proj", ("k_proj",)), ("attn/v_proj", ("v_proj",)),
                              ("attn/o_proj", ("o_proj",)), ("mlp/gate_proj", ("gate_proj",)),
                              ("mlp/up_proj", ("up_proj",)), ("mlp/down_proj", ("down_proj",))):
            node = next((n for name, n in nodes.items() if name.startswith(f"/model/layers.{i}/{onnx_name}/")), None)
            if node is None:
                continue
            group = "self_attn" if onnx_name.startswith("attn") else "mlp"
            w = torch.cat([want[f"model.layers.{i}.{group}.{m}.weight"] for m in hf]).numpy()
            got = _nbits_weight(model.graph, inits, node)
            np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)
            checked += 1
    assert checked == 2 * 5 or checked == 2 * 7  # fused or separate q/k/v
    lb = load_base(tiny256, quant=quant)
    with torch.no_grad():
        ref = lb.model(input_ids=torch.tensor([IDS])).logits[0].numpy()
    from edgeia3.runtimes import open_runtime

    rt = open_runtime(tmp_path / "o")
    assert np.abs(rt.logits(IDS) - ref).max() < 1e-3


def test_export_warns_and_strict_refuses_other_weights(tiny256, tmp_path):
    """An adapter trained in full precision, deployed on a 4-bit grid: a note with the cost;
    --strict refuses; an adapter trained on the deployed blocks gets no note."""
    from cli_checks import invoke

    base = load_base(tiny256)
    random_peft_adapter(copy.deepcopy(base.model), "llama", tmp_path / "full", seed=1)
    res = export_onnx(str(tiny256), tmp_path / "o1", "int4", adapters={"a": tmp_path / "full"}, weights="q4_0")
    assert any("expect its accuracy to drop" in n for n in res.notes)
    assert res.manifest.adapters["a"].same_weights is False
    out = tmp_path / "o2"
    r = invoke("export", "onnx", "--base", tiny256, "--out", out, "--adapter", f"a={tmp_path / 'full'}",
               "--weights", "q4_0", "--strict")
    assert r.exit_code == 2 and "--strict" in r.output and not out.exists()

    from tiny_models import write_label_task

    from edgeia3.train import TrainConfig, train

    task = write_label_task(tmp_path / "t.jsonl", 8)
    train(str(tiny256), task, tmp_path / "q4", quant="q4_0", quiet=True, config=TrainConfig(max_steps=2, batch_size=4))
    res = export_onnx(str(tiny256), tmp_path / "o3", "int4", adapters={"a": tmp_path / "q4"}, strict=True)
    assert res.manifest.weights["quant"] == "q4_0" and res.manifest.adapters["a"].same_weights
    assert not any("accuracy to drop" in n for n in res.notes)
    from edgeia3.export import export_gguf

    g = export_gguf(str(tiny256), tmp_path / "g", adapters={"a": str(tmp_path / "q4")}, strict=True)
    assert g.quant == "q4_0" and g.adapters["a"].same_weights


@pytest.mark.parametrize("autocast", [False, True])
def test_packed_layers_give_the_dense_gradients(tiny256, autocast):
    """Forward and backward through the GGUF-block layers equal a dense copy of the same
    dequantized weights (fp32 exactly; under bf16 autocast within bf16 rounding)."""
    from edgeia3.converters.gguf.torch_weights import densify
    from edgeia3.peft_model import wrap_with_ia3

    lb = load_base(tiny256, quant="q4_0")
    dense = copy.deepcopy(lb)
    dense = type(lb)(dense.source, densify(dense.model), dense.tokenizer, dense.family, "none")
    ids = torch.tensor([IDS])
    results = []
    for base in (lb, dense):
        model = wrap_with_ia3(base, ["k", "v", "down"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((float(loss), [p.grad.float() for n, p in model.named_parameters() if "ia3_l" in n]))
    tol = 2e-2 if autocast else 1e-5
    assert abs(results[0][0] - results[1][0]) < tol
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=tol, rtol=tol)


def test_auto_quant_picks_the_weights_that_deploy(tiny_dir, tiny256):
    """--quant auto: a GGUF base trains on its own blocks; a transformers base on its llama.cpp
    q4_0 file when edgeia3 can write its GGUF (BPE, SentencePiece or no tokenizer) and train on
    its blocks (Linear layers), else NF4."""
    from edgeia3.base import resolve_quant
    from edgeia3.registry import get_family

    llama = get_family("llama")
    assert resolve_quant("auto", resolve_base("default"), llama) == "gguf"
    assert resolve_quant("auto", resolve_base(tiny256), llama) == "q4_0"
    assert resolve_quant("auto", resolve_base(tiny_dir("llama", tokenizer=True)), llama) == "nf4"  # WordLevel
    assert resolve_quant("auto", resolve_base(tiny_dir("gpt2")), get_family("gpt2")) == "nf4"  # Conv1D layers
    assert resolve_quant("auto", resolve_base(tiny_dir("falcon")), get_family("falcon")) == "q4_0"  # FalconLinear
