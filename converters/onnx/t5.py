"""T5 / Flan-T5 ONNX export for onnxruntime with edgeia3's own generation loop
(onnxruntime-genai's builder has no T5).

Two fp32 graphs, exported by torch.onnx's torch.export-based exporter (opset 17) from a
small functional re-statement of T5's forward pass that reads the transformers model's own
modules (weights, norms, activation, relative bias):

- ``encoder.onnx``: ``input_ids`` [b, s] int64, ``attention_mask`` [b, s] int64 and the
  IA3 inputs of the encoder sites and of ``cross_k`` / ``cross_v`` ->
  ``encoder_hidden_states`` [b, s, d] and, per decoder layer i, ``cross_key.{i}`` /
  ``cross_value.{i}`` [b, heads, s, d_kv] (cross-attention K/V computed once).
- ``decoder.onnx`` (with past): ``decoder_input_ids`` [b, t] int64,
  ``encoder_attention_mask`` [b, s] int64, ``past_key.{i}`` / ``past_value.{i}``
  [b, heads, p, d_kv] (p may be 0), ``cross_key.{i}`` / ``cross_value.{i}`` and the IA3
  inputs of the decoder self-attention, ``cross_q`` / ``cross_o`` and ``dec_wo`` ->
  ``logits`` [b, t, vocab], ``present_key.{i}`` / ``present_value.{i}`` [b, heads, p+t, d_kv].

IA3 inputs are named ``ia3.layers.{i}.{site}``, shape [1|b, 1, N]: output sites multiply
the module's output, input sites (``enc_wo``, ``dec_wo``) multiply ``wo``'s input.
Side mode: each adapter is ``adapters/NAME.safetensors`` holding one [1, 1, N] tensor per
IA3 input (ones where the adapter leaves a site alone); no adapter = feed ones.
Merged mode: the adapter folded with ``merge_loaded``, graphs without IA3 inputs.

This module builds the graphs and the adapter files; ``edgeia3.steps.t5_export`` loads the
base, validates and merges the adapters and writes the manifest.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeia3.adapter import IA3Adapter
from edgeia3.errors import EdgeIA3Error
from edgeia3.registry import Scaling

KIND = "onnx-t5"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
ADAPTER_DIR = "adapters"
OPSET = 17  # the graphs' opset (IR version 8), as the legacy TorchScript exporter wrote them
EXPORT_OPSET = 18  # torch.onnx's torchlib opset: exported at it, converted to OPSET once optimized
IA3_BATCH = "ia3_batch"
ENCODER_SITES = {"enc_q", "enc_k", "enc_v", "enc_o", "enc_wo", "cross_k", "cross_v"}


def ia3_name(layer: int, site: str) -> str:
    return f"ia3.layers.{layer}.{site}"


def _bias(attn: Any, q_len: Any, k_len: Any, past: Any, bidirectional: bool) -> torch.Tensor:
    """T5's relative position bias [1, heads, q_len, k_len] for queries at past..past+q_len."""
    ctx = torch.arange(q_len, dtype=torch.long)[:, None] + past
    mem = torch.arange(k_len, dtype=torch.long)[None, :]
    buckets = attn._relative_position_bucket(mem - ctx, bidirectional=bidirectional,
                                             num_buckets=attn.relative_attention_num_buckets,
                                             max_distance=attn.relative_attention_max_distance)
    return attn.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)


class _T5Part(nn.Module):
    """Shared pieces: IA3 scaling by graph input, attention, feed-forward."""

    def __init__(self, model: Any, sites: list[tuple[int, str]]):
        super().__init__()
        self.model = model
        self.cfg = model.config
        self.index = {key: n for n, key in enumerate(sites)}

    def scale(self, ia3: list, x: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        n = self.index.get((layer, site))
        return x if n is None else x * ia3[n]

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[0], x.shape[1]
        return x.view(b, s, self.cfg.num_heads, self.cfg.d_kv).transpose(1, 2)

    def attend(self, q, k, v, bias) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias  # T5: no 1/sqrt(d) scaling
        a = torch.matmul(torch.softmax(scores.float(), dim=-1).type_as(scores), v)
        b, t = a.shape[0], a.shape[2]
        return a.transpose(1, 2).reshape(b, t, self.cfg.num_heads * self.cfg.d_kv)

    def ff(self, ia3: list, dense: Any, h: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        if hasattr(dense, "wi_0"):
            x = dense.act(dense.wi_0(h)) * dense.wi_1(h)
        else:
            x = dense.act(dense.wi(h))
        return dense.wo(self.scale(ia3, x, layer, site))

    @staticmethod
    def mask_bias(mask: torch.Tensor) -> torch.Tensor:
        return (1.0 - mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min


class T5EncoderGraph(_T5Part):
    def forward(self, input_ids, attention_mask, ia3: list):
        enc, m = self.model.encoder, self.model
        x = m.shared(input_ids)
        s = input_ids.shape[1]
        bias = _bias(enc.block[0].layer[0].SelfAttention, s, s, 0, True) + self.mask_bias(attention_mask)
        for i, blk in enumerate(enc.block):
            at = blk.layer[0].SelfAttention
            h = blk.layer[0].layer_norm(x)
            q = self.heads(self.scale(ia3, at.q(h), i, "enc_q"))
            k = self.heads(self.scale(ia3, at.k(h), i, "enc_k"))
            v = self.heads(self.scale(ia3, at.v(h), i, "enc_v"))
            x = x + self.scale(ia3, at.o(self.attend(q, k, v, bias)), i, "enc_o")
            x = x + self.ff(ia3, blk.layer[1].DenseReluDense, blk.layer[1].layer_norm(x), i, "enc_wo")
        x = enc.final_layer_norm(x)
        cross = []
        for i, blk in enumerate(m.decoder.block):
            ca = blk.layer[1].EncDecAttention
            cross += [self.heads(self.scale(ia3, ca.k(x), i, "cross_k")),
                      self.heads(self.scale(ia3, ca.v(x), i, "cross_v"))]
        return (x, *cross)


class T5DecoderGraph(_T5Part):
    def forward(self, decoder_input_ids, encoder_attention_mask, past: list, cross: list, ia3: list):
        dec, m = self.model.decoder, self.model
        x = m.shared(decoder_input_ids)
        t, p = decoder_input_ids.shape[1], past[0].shape[2]
        qpos = torch.arange(t, dtype=torch.long)[:, None] + p
        kpos = torch.arange(p + t, dtype=torch.long)[None, :]
        causal = (kpos > qpos).to(torch.float32) * torch.finfo(torch.float32).min
        self_bias = _bias(dec.block[0].layer[0].SelfAttention, t, p + t, p, False) + causal
        cross_bias = self.mask_bias(encoder_attention_mask)
        present = []
        for i, blk in enumerate(dec.block):
            at = blk.layer[0].SelfAttention
            h = blk.layer[0].layer_norm(x)
            q = self.heads(self.scale(ia3, at.q(h), i, "dec_q"))
            k = torch.cat([past[2 * i], self.heads(self.scale(ia3, at.k(h), i, "dec_k"))], dim=2)
            v = torch.cat([past[2 * i + 1], self.heads(self.scale(ia3, at.v(h), i, "dec_v"))], dim=2)
            present += [k, v]
            x = x + self.scale(ia3, at.o(self.attend(q, k, v, self_bias)), i, "dec_o")
            ca = blk.layer[1].EncDecAttention
            h = blk.layer[1].layer_norm(x)
            q = self.heads(self.scale(ia3, ca.q(h), i, "cross_q"))
            a = self.attend(q, cross[2 * i], cross[2 * i + 1], cross_bias)
            x = x + self.scale(ia3, ca.o(a), i, "cross_o")
            x = x + self.ff(ia3, blk.layer[2].DenseReluDense, blk.layer[2].layer_norm(x), i, "dec_wo")
        x = dec.final_layer_norm(x)
        if getattr(self.cfg, "scale_decoder_outputs", self.cfg.tie_word_embeddings):
            x = x * (self.cfg.d_model ** -0.5)
        return (m.lm_head(x), *present)


def plan_sites(adapters: dict[str, IA3Adapter], family: Any, num_layers: int) -> list[tuple[int, str]]:
    """(layer, site) of every IA3 input: the union over the adapters, else the family's
    default targets in every layer; in the family's site order."""
    keys = {(v.layer, v.site) for a in adapters.values() for v in a.vectors}
    if not keys:
        keys = {(i, s) for i in range(num_layers) for s in family.default_targets}
    order = [s.name for s in family.sites]
    return sorted(keys, key=lambda k: (order.index(k[1]), k[0]))


def adapter_tensors(adapter: IA3Adapter | None, sites: list[tuple[int, str]], sizes: dict) -> dict[str, np.ndarray]:
    """The [1, 1, N] IA3 input tensors that apply ``adapter`` (None: ones)."""
    out = {}
    for layer, site in sites:
        vec = np.ones(sizes[(layer, site)], dtype=np.float32)
        v = adapter.get(layer, site) if adapter is not None else None
        if v is not None:
            if v.values.size != vec.size:
                raise EdgeIA3Error(f"adapter vector {v.key} has {v.values.size} values, the export expects {vec.size}")
            vec = v.values.astype(np.float32)
        out[ia3_name(layer, site)] = vec.reshape(1, 1, -1)
    if adapter is not None:
        missing = [v.key for v in adapter.vectors if (v.layer, v.site) not in set(sites)]
        if missing:
            raise EdgeIA3Error(f"this export has no IA3 input for adapter vectors {', '.join(missing[:4])}")
    return out


def _site_size(base: Any, layer: int, site: str) -> int:
    s = base.family.site(site)
    out, inp = base.module_shape(layer, s)
    return out if s.scaling is Scaling.OUTPUT else inp


def site_sizes(base: Any, sites: list[tuple[int, str]]) -> dict[tuple[int, str], int]:
    """Length of each IA3 input: the site's output or input size in ``base`` (anything with
    ``family`` and ``module_shape``, ``edgeia3.validate.BaseShape``)."""
    return {k: _site_size(base, *k) for k in sites}


def ia3_inputs(sites: list[tuple[int, str]], sizes: dict) -> list[dict]:
    """The manifest's ``ia3_inputs``: name, layer, site, size and graph of each IA3 input."""
    return [{"name": ia3_name(*k), "layer": k[0], "site": k[1], "size": sizes[k],
             "graph": "encoder" if k[1] in ENCODER_SITES else "decoder"} for k in sites]


def save_adapter(adapter: IA3Adapter, sites: list[tuple[int, str]], sizes: dict, path: Path) -> None:
    """An adapter's side-mode file: its IA3 input tensors (``adapter_tensors``) as safetensors."""
    from safetensors.numpy import save_file

    save_file(adapter_tensors(adapter, sites, sizes), str(path), metadata={"format": "edgeia3-onnx-t5-ia3"})


def _dims(x: Any, names: list[str], axes: dict) -> Any:
    """torch.export's ``dynamic_shapes`` for the example arguments ``x``: Dim.DYNAMIC for each axis
    ``axes`` names on each tensor (``names`` in flattened order), but IA3_BATCH stays static (see
    _export). Lists, not tuples: torch.onnx takes a tuple of None (or an empty one) for one
    tensor's axes. Dims, not names: torch.onnx's own renaming of named axes gives up (with a
    UserWarning) on such a spec; _name_axes names them instead."""
    if isinstance(x, torch.Tensor):
        dims = axes.get(names.pop(0), {})
        return {a: torch.export.Dim.DYNAMIC for a, d in dims.items() if d != IA3_BATCH} or None
    return [_dims(v, names, axes) for v in x]


def _name_axes(graph: Any, axes: dict) -> None:
    """The contract's axis names in ``graph`` (onnx_ir): torch.export's symbols (s0, ...) renamed
    wherever they occur, in sums too (s1 + s5 -> past + tgt), then each graph input's and output's
    axes exactly as ``axes`` names them (present_*: total, IA3 inputs: IA3_BATCH)."""
    import onnx_ir as ir

    names: dict[str, str] = {}
    for v in graph.inputs:
        for i, name in axes.get(v.name, {}).items():
            if isinstance(v.shape[i], ir.SymbolicDim) and v.shape[i].value:
                names.setdefault(v.shape[i].value, name)

    def rename(d: Any) -> Any:
        if not isinstance(d, ir.SymbolicDim) or not d.value:
            return d
        return ir.SymbolicDim(re.sub(r"\b[a-z]+\d+\b", lambda m: names.get(m.group(), m.group()), d.value))

    for v in [*graph.inputs, *(o for node in graph.all_nodes() for o in node.outputs)]:
        if v.shape is not None:
            v.shape = ir.Shape([rename(d) for d in v.shape])
    for v in [*graph.inputs, *graph.outputs]:
        named = axes.get(v.name, {})
        v.shape = ir.Shape([ir.SymbolicDim(named[i]) if i in named else d for i, d in enumerate(v.shape)])


@contextlib.contextmanager
def _quiet_exporter():
    """Mute what the exporter says that the user can do nothing about: its notes on skipped
    torchvision ops and on the fallback to onnx's version converter (the opset is checked after),
    and torch.export's own FutureWarning on LeafSpec (raised inside run_decompositions)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter._registration",
                                               "onnxscript.version_converter")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    """torch.onnx's torch.export-based exporter (``dynamo=True``) at its own opset (EXPORT_OPSET),
    optimized, then converted down to OPSET (onnx's converter: torch.onnx's own conversion runs
    before optimizing and fails on ReduceMean's computed axes); then the contract's axis names.

    The IA3 inputs are traced [1, 1, N] with a static first dim and only named IA3_BATCH after:
    a dynamic one is unified with batch by torch.export (x * ia3 broadcasts), and the graph then
    reads batch off the IA3 input's shape (wrong for [1, 1, N] fed with batch > 1), while a
    dynamic size-1 example fails in run_decompositions. The graph only uses them as a Mul operand,
    which broadcasts [1|b, 1, N] either way. Node metadata (FX nodes, stack traces with source
    paths) is dropped: debugging aid, a fifth of the tiny test model's bytes, and IR version 10."""
    import onnx
    from onnxscript.version_converter import convert_version

    with torch.no_grad(), _quiet_exporter():
        prog = torch.onnx.export(module.eval(), args, dynamo=True, input_names=inputs, output_names=outputs,
                                 dynamic_shapes=_dims(args, list(inputs), axes), opset_version=EXPORT_OPSET,
                                 verbose=False)
        model = prog.model
        convert_version(model, OPSET, fallback=True)
    if model.opset_imports.get("") != OPSET or model.functions:
        raise EdgeIA3Error(f"the ONNX exporter gave opset {model.opset_imports.get('')} "
                           f"({len(model.functions)} functions); {path.name} needs opset {OPSET}")
    model.ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", OPSET)])
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        # onnx's 18 -> 17 adapter moves Reduce*'s axes to the attribute but keeps opset 18's
        # noop_with_empty_axes; 0 (the default) is opset 17's behaviour
        noop = node.attributes.get("noop_with_empty_axes")
        if node.op_type.startswith("Reduce") and noop is not None:
            if noop.as_int() != 0:
                raise EdgeIA3Error(f"{node.op_type} with noop_with_empty_axes has no opset {OPSET} form")
            del node.attributes["noop_with_empty_axes"]
    _name_axes(model.graph, axes)
    model.graph.metadata_props.clear()
    prog.save(str(path), external_data=False)  # one file (onnx's 2 GB limit aside)
    onnx.checker.check_model(str(path), full_check=True)


PRECISIONS = ("fp32", "int4")
INT4_BLOCK = 32  # weights per quantization block (onnxruntime's MatMulNBits, symmetric)


def quantize_int4(path: Path) -> None:
    """Rewrite the graph at ``path`` with every constant-weight MatMul as onnxruntime's 4-bit
    MatMulNBits (its own quantizer: symmetric, blocks of INT4_BLOCK along the input). The IA3
    side inputs are Mul nodes beside the MatMuls, so they stay exact on the int4 weights."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(path)), bits=4, block_size=INT4_BLOCK, is_symmetric=True)
    q.process()
    onnx.save_model(q.model.model, str(path))


def write_graphs(out: Path, model: Any, sites: list[tuple[int, str]], sizes: dict, precision: str) -> None:
    """``encoder.onnx`` and ``decoder.onnx`` of ``model`` (a transformers T5, fp32, eval; a merged
    adapter already folded in) in ``out``, with one IA3 input per (layer, site) of ``sites``;
    ``precision`` int4: then quantized (``quantize_int4``)."""
    cfg = model.config
    n, heads, dkv = cfg.num_layers, cfg.num_heads, cfg.d_kv
    enc_sites = [k for k in sites if k[1] in ENCODER_SITES]
    dec_sites = [k for k in sites if k[1] not in ENCODER_SITES]

    def ones(keys: list) -> list:
        return [torch.ones(1, 1, sizes[k]) for k in keys]

    ia3_axes = {ia3_name(*k): {0: IA3_BATCH} for k in sites}

    b, s, t, p = 2, 7, 3, 2  # >= 2: torch.export would specialize a dynamic axis seen at 0 or 1
    ids = torch.randint(2, cfg.vocab_size, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    cross_names = [f"cross_{kv}.{i}" for i in range(n) for kv in ("key", "value")]
    enc_in = ["input_ids", "attention_mask", *(ia3_name(*k) for k in enc_sites)]
    enc_out = ["encoder_hidden_states", *cross_names]
    axes = {"input_ids": {0: "batch", 1: "src"}, "attention_mask": {0: "batch", 1: "src"},
            "encoder_hidden_states": {0: "batch", 1: "src"},
            **{c: {0: "batch", 2: "src"} for c in cross_names}, **ia3_axes}
    _export(T5EncoderGraph(model, enc_sites), (ids, mask, ones(enc_sites)), out / ENCODER_FILE,
            enc_in, enc_out, {k: v for k, v in axes.items() if k in enc_in + enc_out})

    past_names = [f"past_{kv}.{i}" for i in range(n) for kv in ("key", "value")]
    present_names = [f"present_{kv}.{i}" for i in range(n) for kv in ("key", "value")]
    dec_in = ["decoder_input_ids", "encoder_attention_mask", *past_names, *cross_names,
              *(ia3_name(*k) for k in dec_sites)]
    dec_out = ["logits", *present_names]
    axes.update({"decoder_input_ids": {0: "batch", 1: "tgt"}, "encoder_attention_mask": {0: "batch", 1: "src"},
                 "logits": {0: "batch", 1: "tgt"}, **{x: {0: "batch", 2: "past"} for x in past_names},
                 **{x: {0: "batch", 2: "total"} for x in present_names}})
    dargs = (torch.randint(2, cfg.vocab_size, (b, t)), mask, [torch.randn(b, heads, p, dkv) for _ in past_names],
             [torch.randn(b, heads, s, dkv) for _ in cross_names], ones(dec_sites))
    _export(T5DecoderGraph(model, dec_sites), dargs, out / DECODER_FILE, dec_in, dec_out,
            {k: v for k, v in axes.items() if k in dec_in + dec_out})

    if precision == "int4":  # a merged adapter is folded in before its weights are quantized
        for f in (ENCODER_FILE, DECODER_FILE):
            quantize_int4(out / f)
