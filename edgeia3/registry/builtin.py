"""The built-in families. One ``register(...)`` per family.

Site names are canonical across formats: q, k, v (attention projections),
o (attention output), gate, up, down (feed-forward). Default targets follow
PEFT's IA3 defaults (peft/utils/constants.py); phi3 has none there, so it gets
llama's k, v, down.
"""

from __future__ import annotations

from typing import Any

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


def _llama_like_sites(rope_permute: bool) -> tuple[Site, ...]:
    """Separate q/k/v/o and gate/up/down Linear modules (llama, qwen, gemma).

    ONNX names are those of onnxruntime-genai's model builder, which fuses
    q, k and v into one qkv_proj MatMul unless told not to.
    """
    attn, mlp, qkv = "/model/layers.{i}/attn/", "/model/layers.{i}/mlp/", "/model/layers.{i}/attn/qkv_proj/MatMul"
    return (
        Site("q", "self_attn.q_proj", OUT, gguf_tensor="blk.{i}.attn_q",
             gguf_permute="q" if rope_permute else None, onnx_node=attn + "q_proj/MatMul",
             onnx_fused_node=qkv, onnx_fused_rows=_qkv_rows("q")),
        Site("k", "self_attn.k_proj", OUT, gguf_tensor="blk.{i}.attn_k",
             gguf_permute="k" if rope_permute else None, onnx_node=attn + "k_proj/MatMul",
             onnx_fused_node=qkv, onnx_fused_rows=_qkv_rows("k")),
        Site("v", "self_attn.v_proj", OUT, gguf_tensor="blk.{i}.attn_v", onnx_node=attn + "v_proj/MatMul",
             onnx_fused_node=qkv, onnx_fused_rows=_qkv_rows("v")),
        Site("o", "self_attn.o_proj", OUT, gguf_tensor="blk.{i}.attn_output", onnx_node=attn + "o_proj/MatMul"),
        Site("gate", "mlp.gate_proj", OUT, gguf_tensor="blk.{i}.ffn_gate", onnx_node=mlp + "gate_proj/MatMul"),
        Site("up", "mlp.up_proj", OUT, gguf_tensor="blk.{i}.ffn_up", onnx_node=mlp + "up_proj/MatMul"),
        Site("down", "mlp.down_proj", IN, gguf_tensor="blk.{i}.ffn_down", onnx_node=mlp + "down_proj/MatMul",
             input_fold="up"),
    )


_LLAMA_COMMON = dict(layers="model.layers", embed="model.embed_tokens.weight",
                     final_norm="model.norm.weight")

# llama.cpp's converter permutes q/k rows for llama-style RoPE only.
register(Family("llama", ("llama", "mistral"), sites=_llama_like_sites(True),
                default_targets=("k", "v", "down"), gguf_arch="llama", gguf_writer=True,
                gguf_pre_tokenizers=("smollm", "llama-bpe", "default"), **_LLAMA_COMMON))
register(Family("qwen2", ("qwen2",), sites=_llama_like_sites(False),
                default_targets=("q", "v", "down"), gguf_arch="qwen2", gguf_writer=True,
                gguf_pre_tokenizers=("qwen2",), **_LLAMA_COMMON))
register(Family("qwen3", ("qwen3",), sites=_llama_like_sites(False),
                default_targets=("q", "v", "down"), gguf_arch="qwen3", **_LLAMA_COMMON))
register(Family("gemma2", ("gemma2",), sites=_llama_like_sites(False),
                default_targets=("q", "v", "down"), gguf_arch="gemma2", **_LLAMA_COMMON))
register(Family("gemma3_text", ("gemma3_text",), sites=_llama_like_sites(False),
                default_targets=("q", "v", "down"), gguf_arch="gemma3", **_LLAMA_COMMON))

register(Family(
    "phi3", ("phi3",),
    sites=(
        Site("q", "self_attn.qkv_proj", OUT, fused_rows=_qkv_rows("q"), gguf_tensor="blk.{i}.attn_qkv"),
        Site("k", "self_attn.qkv_proj", OUT, fused_rows=_qkv_rows("k"), gguf_tensor="blk.{i}.attn_qkv"),
        Site("v", "self_attn.qkv_proj", OUT, fused_rows=_qkv_rows("v"), gguf_tensor="blk.{i}.attn_qkv"),
        Site("o", "self_attn.o_proj", OUT, gguf_tensor="blk.{i}.attn_output"),
        Site("gate", "mlp.gate_up_proj", OUT, fused_rows=_gate_up_rows("gate"), gguf_tensor="blk.{i}.ffn_up"),
        Site("up", "mlp.gate_up_proj", OUT, fused_rows=_gate_up_rows("up"), gguf_tensor="blk.{i}.ffn_up"),
        Site("down", "mlp.down_proj", IN, gguf_tensor="blk.{i}.ffn_down", input_fold="up"),
    ),
    default_targets=("k", "v", "down"), gguf_arch="phi3", **_LLAMA_COMMON,
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
    conv1d=True, gated_mlp=False, gguf_arch="gpt2",
))
