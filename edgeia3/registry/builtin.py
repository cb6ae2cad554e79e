"""The built-in families. One ``register(...)`` per family.

Site names are canonical across formats: q, k, v (attention projections),
o (attention output), gate, up, down (feed-forward). Default targets follow
PEFT's IA3 defaults (peft/utils/constants.py); phi3 has none there, so it gets
llama's k, v, down.
"""

from __future__ import annotations

from typing import Any

from ..errors import EdgeIA3Error
from . import gguf_hparams as gh
from . import onnx_config as oc
from .base import Family, Scaling, Site, register

OUT, IN = Scaling.OUTPUT, Scaling.INPUT


def _head_dim(c: Any) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _kv_heads(c: Any) -> int:
    return getattr(c, "num_key_value_heads", None) or c.num_attention_heads


def _qkv_rows(which: str):
    """Rows of q, k or v inside a fused [q; k; v] projection output."""

    def rows(c: Any) -> tuple[int, int]:
        q = c.num_attention_heads * _head_dim(c)
        kv = _kv_heads(c) * _head_dim(c)
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}[which]

    return rows


def _gate_up_rows(which: str):
    """Rows of gate or up inside phi3's fused [gate; up] projection output."""

    def rows(c: Any) -> tuple[int, int]:
        i = c.intermediate_size
        return (0, i) if which == "gate" else (i, 2 * i)

    return rows


def _onnx(name: str) -> dict:
    """A site's MatMul names in onnxruntime-genai's builder graph, which are the same for every
    family it builds here: it splits HF's fused modules (phi3 qkv_proj, gate_up_proj) into
    q/k/v and gate/up, then fuses q, k and v into one qkv_proj MatMul unless told not to."""
    layer = "/model/layers.{i}/" + ("mlp/" if name in ("gate", "up", "down") else "attn/")
    if name not in ("q", "k", "v"):
        return {"onnx_node": f"{layer}{name}_proj/MatMul"}
    return {"onnx_node": f"{layer}{name}_proj/MatMul", "onnx_fused_node": layer + "qkv_proj/MatMul",
            "onnx_fused_rows": _qkv_rows(name)}


def _llama_like_sites(rope_permute: bool) -> tuple[Site, ...]:
    """Separate q/k/v/o and gate/up/down Linear modules (llama, qwen, gemma)."""
    return (
        Site("q", "self_attn.q_proj", OUT, gguf_tensor="blk.{i}.attn_q",
             gguf_permute="q" if rope_permute else None, **_onnx("q")),
        Site("k", "self_attn.k_proj", OUT, gguf_tensor="blk.{i}.attn_k",
             gguf_permute="k" if rope_permute else None, **_onnx("k")),
        Site("v", "self_attn.v_proj", OUT, gguf_tensor="blk.{i}.attn_v", **_onnx("v")),
        Site("o", "self_attn.o_proj", OUT, gguf_tensor="blk.{i}.attn_output", **_onnx("o")),
        Site("gate", "mlp.gate_proj", OUT, gguf_tensor="blk.{i}.ffn_gate", **_onnx("gate")),
        Site("up", "mlp.up_proj", OUT, gguf_tensor="blk.{i}.ffn_up", **_onnx("up")),
        Site("down", "mlp.down_proj", IN, gguf_tensor="blk.{i}.ffn_down", input_fold="up", **_onnx("down")),
    )


_LLAMA_COMMON = dict(layers="model.layers", embed="model.embed_tokens.weight",
                     final_norm="model.norm.weight")

# llama.cpp's converter permutes q/k rows for llama-style RoPE only.
register(Family("llama", ("llama", "mistral"), sites=_llama_like_sites(True), onnx_config=oc.sliding_all_layers,
                default_targets=("k", "v", "down"), gguf_arch="llama", gguf_hparams=gh.llama,
                gguf_pre_tokenizers=("smollm", "llama-bpe", "default"), **_LLAMA_COMMON))
register(Family("qwen2", ("qwen2",), sites=_llama_like_sites(False),
                default_targets=("q", "v", "down"), gguf_arch="qwen2", gguf_hparams=gh.llama,
                gguf_pre_tokenizers=("qwen2",), **_LLAMA_COMMON))
register(Family("qwen3", ("qwen3",), sites=_llama_like_sites(False),
                default_targets=("q", "v", "down"), gguf_arch="qwen3", gguf_hparams=gh.llama,
                gguf_pre_tokenizers=("qwen2",), **_LLAMA_COMMON))
register(Family("gemma2", ("gemma2",), sites=_llama_like_sites(False),
                default_targets=("q", "v", "down"), gguf_arch="gemma2", gguf_hparams=gh.gemma2,
                gguf_norm_shift=1.0, **_LLAMA_COMMON))
register(Family("gemma3_text", ("gemma3_text",), sites=_llama_like_sites(False), onnx_config=oc.gemma3,
                default_targets=("q", "v", "down"), gguf_arch="gemma3", gguf_hparams=gh.gemma3,
                gguf_norm_shift=1.0, **_LLAMA_COMMON))

register(Family(
    "phi3", ("phi3",),
    sites=(
        Site("q", "self_attn.qkv_proj", OUT, fused_rows=_qkv_rows("q"), gguf_tensor="blk.{i}.attn_qkv", **_onnx("q")),
        Site("k", "self_attn.qkv_proj", OUT, fused_rows=_qkv_rows("k"), gguf_tensor="blk.{i}.attn_qkv", **_onnx("k")),
        Site("v", "self_attn.qkv_proj", OUT, fused_rows=_qkv_rows("v"), gguf_tensor="blk.{i}.attn_qkv", **_onnx("v")),
        Site("o", "self_attn.o_proj", OUT, gguf_tensor="blk.{i}.attn_output", **_onnx("o")),
        Site("gate", "mlp.gate_up_proj", OUT, fused_rows=_gate_up_rows("gate"), gguf_tensor="blk.{i}.ffn_up",
             **_onnx("gate")),
        Site("up", "mlp.gate_up_proj", OUT, fused_rows=_gate_up_rows("up"), gguf_tensor="blk.{i}.ffn_up",
             **_onnx("up")),
        Site("down", "mlp.down_proj", IN, gguf_tensor="blk.{i}.ffn_down", input_fold="up", **_onnx("down")),
    ),
    default_targets=("k", "v", "down"), gguf_arch="phi3", gguf_hparams=gh.phi3, onnx_config=oc.phi3, **_LLAMA_COMMON,
))

register(Family(
    "gpt2", ("gpt2",),
    layers="transformer.h",
    sites=(
        Site("q", "attn.c_attn", OUT, fused_rows=_qkv_rows("q"), gguf_tensor="blk.{i}.attn_qkv"),
        Site("k", "attn.c_attn", OUT, fused_rows=_qkv_rows("k"), gguf_tensor="blk.{i}.attn_qkv"),
        Site("v", "attn.c_attn", OUT, fused_rows=_qkv_rows("v"), gguf_tensor="blk.{i}.attn_qkv"),
        Site("o", "attn.c_proj", OUT, gguf_tensor="blk.{i}.attn_output"),
        Site("up", "mlp.c_fc", OUT, gguf_tensor="blk.{i}.ffn_up"),
        Site("down", "mlp.c_proj", IN, gguf_tensor="blk.{i}.ffn_down"),
    ),
    # PEFT targets the whole fused c_attn, i.e. q, k and v.
    default_targets=("q", "k", "v", "down"),
    embed="transformer.wte.weight", final_norm="transformer.ln_f.weight",
    conv1d=True, gated_mlp=False, gguf_arch="gpt2", gguf_hparams=gh.gpt2,
    gguf_pre_tokenizers=("gpt-2",),
))


# -- Falcon -------------------------------------------------------------------


def _falcon_kv_heads(c: Any) -> int:
    """KV heads of Falcon's fused query_key_value, refusing layouts that interleave q, k, v.

    transformers views its output as (groups, q heads per group + 2, head_dim):
    multi_query has one group, [all q; k; v]; new_decoder_architecture has
    num_kv_heads groups and plain multi-head (multi_query=False) one group per
    head, [q_h; k_h; v_h]. Only one group gives q/k/v contiguous row ranges,
    which every format here (fused_layout, GGUF plans, training masks) assumes.
    A GGUF view (no multi_query field) is [all q; all k; all v] - llama.cpp's
    converter regroups the rows - but a PEFT vector for the same model is in
    transformers' grouped order: they agree only for one KV head.
    """
    if not hasattr(c, "multi_query"):
        groups, what = _kv_heads(c), f"GGUF attention.head_count_kv={_kv_heads(c)}"
    elif c.new_decoder_architecture:
        groups, what = c.num_kv_heads, f"new_decoder_architecture=True with num_kv_heads={c.num_kv_heads}"
    elif not c.multi_query:
        groups, what = c.num_attention_heads, "multi_query=False (one [q; k; v] group per head)"
    else:
        return 1
    if groups != 1:
        raise EdgeIA3Error(
            f"falcon {what}: transformers' query_key_value interleaves q, k and v rows per head group, "
            "which edgeia3's q/k/v sites (contiguous row ranges) cannot describe; supported: one "
            "KV head (multi_query=True, new_decoder_architecture=True with num_kv_heads=1, "
            "or a GGUF with head_count_kv=1)")
    return 1


def _falcon_qkv_rows(which: str):
    """Rows of q, k or v in Falcon's query_key_value: [q (heads); k (kv); v (kv)]."""

    def rows(c: Any) -> tuple[int, int]:
        hd, kv = c.hidden_size // c.num_attention_heads, _falcon_kv_heads(c)
        q = c.num_attention_heads * hd
        return {"q": (0, q), "k": (q, q + kv * hd), "v": (q + kv * hd, q + 2 * kv * hd)}[which]

    return rows


# MLP: dense_4h_to_h(GELU(dense_h_to_4h x)), not gated. ``down`` scales the input
# columns of dense_4h_to_h: the torch merge folds that exactly (float column
# scaling), but no fold into the previous rows exists - GELU(l z) != l GELU(z)
# (a ReLU MLP could fold a positive l into dense_h_to_4h's rows; GELU cannot) - so
# there is no input_fold, and a GGUF block-scale merge of ``down`` is refused.
# No onnx_node: onnxruntime-genai's builder has no Falcon, so ONNX export refuses it.
# GGUF: "falcon" is llama.cpp's architecture name. edgeia3's writer covers the layouts
# llama.cpp's falcon graph computes with one KV head (gh.falcon refuses ALiBi, sequential
# attention, biases and several KV groups); query_key_value is copied as is (llama.cpp's
# regrouping is the identity then) and no RoPE row permutation applies (NeoX RoPE).
register(Family(
    "falcon", ("falcon",),
    layers="transformer.h",
    sites=(
        Site("q", "self_attention.query_key_value", OUT, fused_rows=_falcon_qkv_rows("q"),
             gguf_tensor="blk.{i}.attn_qkv"),
        Site("k", "self_attention.query_key_value", OUT, fused_rows=_falcon_qkv_rows("k"),
             gguf_tensor="blk.{i}.attn_qkv"),
        Site("v", "self_attention.query_key_value", OUT, fused_rows=_falcon_qkv_rows("v"),
             gguf_tensor="blk.{i}.attn_qkv"),
        Site("o", "self_attention.dense", OUT, gguf_tensor="blk.{i}.attn_output"),
        Site("up", "mlp.dense_h_to_4h", OUT, gguf_tensor="blk.{i}.ffn_up"),
        Site("down", "mlp.dense_4h_to_h", IN, gguf_tensor="blk.{i}.ffn_down"),
    ),
    # PEFT: target_modules [query_key_value, dense_4h_to_h], feedforward [dense_4h_to_h].
    default_targets=("q", "k", "v", "down"),
    embed="transformer.word_embeddings.weight", final_norm="transformer.ln_f.weight",
    gated_mlp=False, gguf_arch="falcon", gguf_hparams=gh.falcon, gguf_pre_tokenizers=("falcon",),
    gguf_misread=lambda names: ("it drops the second layer norm (attn_norm_2, Falcon-40B's ln_attn)"
                                if "blk.0.attn_norm_2.weight" in names else None),
))


# -- T5 / Flan-T5 (encoder-decoder) --------------------------------------------
def _t5_check(c: Any) -> None:
    """edgeia3 counts one layer index over both stacks: the decoder must be as deep as the
    encoder; an encoder-only checkpoint has no decoder to adapt."""
    if any(str(a).endswith("EncoderModel") for a in (getattr(c, "architectures", None) or [])):
        raise EdgeIA3Error(f"{c.architectures[0]} is an encoder-only checkpoint: IA3 in edgeia3 needs the "
                           "whole encoder-decoder model (T5ForConditionalGeneration)")
    dec = getattr(c, "num_decoder_layers", None) or c.num_layers
    if dec != c.num_layers:
        raise EdgeIA3Error(f"t5 with {c.num_layers} encoder and {dec} decoder blocks: edgeia3 supports "
                           "equal depths (as every T5 / Flan-T5 release)")


def _t5_sites() -> tuple[Site, ...]:
    """Encoder self-attention, decoder self- and cross-attention, and both feed-forward
    ``wo`` (INPUT: PEFT's feed-forward module). Only the modules every T5 variant has:
    the original ReLU MLP (wi, wo) and Flan-T5's gated GELU (wi_0, wi_1, wo) share ``wo``.
    Exact folds of ``wo``'s input scale (GGUF, llama.cpp's ``ffn_up`` = wi or wi_1): a
    gated MLP folds any scale into wi_1's rows, a ReLU MLP a positive one into wi's; the
    torch merge scales ``wo``'s columns exactly."""
    out = []
    for prefix, stack, attn, gguf in (("enc", None, "layer.0.SelfAttention", "enc.blk.{i}.attn_"),
                                      ("dec", "decoder.block", "layer.0.SelfAttention", "dec.blk.{i}.attn_"),
                                      ("cross", "decoder.block", "layer.1.EncDecAttention", "dec.blk.{i}.cross_attn_")):
        out += [Site(f"{prefix}_{p}", f"{attn}.{p}", OUT, stack=stack, gguf_tensor=gguf + p) for p in ("q", "k", "v", "o")]
    for prefix, stack, mlp in (("enc", None, "layer.1"), ("dec", "decoder.block", "layer.2")):
        out.append(Site(f"{prefix}_wo", f"{mlp}.DenseReluDense.wo", IN, stack=stack,
                        gguf_tensor=f"{prefix}.blk.{{i}}.ffn_down", gguf_fold_rows=f"{prefix}.blk.{{i}}.ffn_up",
                        gguf_fold_gate=f"{prefix}.blk.{{i}}.ffn_gate"))
    return tuple(out)


def _t5_gguf_rewrite(c: Any, name: str, data: Any, names: set[str]) -> list:
    """llama.cpp's T5 reads one token embedding (the copies under encoder./decoder. go) and
    never scales the decoder output; transformers multiplies it by d_model**-0.5 when
    ``scale_decoder_outputs`` (T5 v1.0; older configs: tied embeddings). The head is the
    checkpoint's lm_head if it has one (transformers keeps a distinct one), else the shared
    embedding; it is written pre-scaled, so llama.cpp computes what transformers does."""
    scale = getattr(c, "scale_decoder_outputs", getattr(c, "tie_word_embeddings", False))
    head = (lambda w: [("lm_head.weight", (w * (c.d_model ** -0.5)).astype(w.dtype) if scale else w)])
    if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        return []
    if name == "lm_head.weight":
        return head(data)
    if name == "shared.weight" and "lm_head.weight" not in names:
        return [(name, data)] + head(data)
    return [(name, data)]


register(Family(
    "t5", ("t5",),
    layers="encoder.block",
    sites=_t5_sites(),
    # PEFT: target_modules [k, v, wo], feedforward [wo] - in every stack.
    default_targets=("enc_k", "enc_v", "enc_wo", "dec_k", "dec_v", "cross_k", "cross_v", "dec_wo"),
    embed="shared.weight", final_norm="decoder.final_layer_norm.weight",
    gated_mlp=False, auto_model="AutoModelForSeq2SeqLM", peft_task_type="SEQ_2_SEQ_LM", check_config=_t5_check,
    gguf_arch="t5", gguf_hparams=gh.t5, gguf_rewrite=_t5_gguf_rewrite,
))
