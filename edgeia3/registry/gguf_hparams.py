"""Each family's GGUF hyperparameters, the way llama.cpp's converter writes them.

A function here takes a transformers config object and a ``gguf.GGUFWriter``
and adds the architecture keys llama.cpp reads for that family. Where llama.cpp
hard-codes something that transformers reads from the config (Gemma's attention
scale and sliding-window pattern, Gemma 3's local RoPE base), a config that
differs is refused: the file would load and silently compute another model.
The registry entries (builtin.py) point at these functions.
"""

from __future__ import annotations

from typing import Any

from ..errors import EdgeIA3Error
from .base import decoder_start_token


def _head_dim(c: Any) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _rope(c: Any, layer_type: str | None = None) -> dict:
    """RoPE parameters (transformers 5 ``rope_parameters``; per layer type for Gemma 3)."""
    rope = getattr(c, "rope_parameters", None) or {}
    if layer_type and layer_type in rope:
        rope = rope[layer_type]
    return {"rope_type": rope.get("rope_type", "default"), "rope_theta": float(rope.get("rope_theta", 10000.0)),
            "factor": rope.get("factor")}


def _refuse(c: Any, what: str) -> None:
    raise EdgeIA3Error(f"{c.model_type}: {what}; llama.cpp would load the GGUF and compute another model")


def _check_pattern(c: Any, every: int) -> None:
    """llama.cpp fixes which layers slide: all but every ``every``-th one."""
    types = getattr(c, "layer_types", None)
    if not types:
        return
    want = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(len(types))]
    if list(types) != want:
        _refuse(c, f"layer_types {list(types)} differ from llama.cpp's fixed pattern (every {every}th layer full)")


def _check_attention_scale(c: Any) -> None:
    scalar = getattr(c, "query_pre_attn_scalar", None)
    if scalar is not None and int(scalar) != _head_dim(c):
        _refuse(c, f"query_pre_attn_scalar={scalar} but llama.cpp scales attention by head_dim={_head_dim(c)}")


def _common(c: Any, w: Any, rope_theta: float | None) -> None:
    """Sizes every decoder family shares; ``rope_theta`` None for learned positions."""
    w.add_context_length(int(c.max_position_embeddings))
    w.add_embedding_length(int(c.hidden_size))
    w.add_block_count(int(c.num_hidden_layers))
    w.add_head_count(int(c.num_attention_heads))
    w.add_vocab_size(int(c.vocab_size))
    if rope_theta is not None:
        w.add_rope_freq_base(rope_theta)


def llama(c: Any, w: Any) -> None:
    """llama, mistral, qwen2, qwen3: RMSNorm, SwiGLU, RoPE (default scaling only)."""
    rope = _rope(c)
    if rope["rope_type"] != "default":
        _refuse(c, f"RoPE scaling '{rope['rope_type']}' is not written by edgeia3's GGUF writer")
    # qwen2/qwen3 switch it with use_sliding_window; mistral slides whenever a window is set
    window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
    if window and window < c.max_position_embeddings:
        _refuse(c, f"sliding-window attention (window {window}) is on")
    _common(c, w, rope["rope_theta"])
    head_dim = _head_dim(c)
    w.add_feed_forward_length(int(c.intermediate_size))
    w.add_head_count_kv(int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)  # as llama.cpp's converter: readers default it differently (qwen3)
    w.add_value_length(head_dim)


def phi3(c: Any, w: Any) -> None:
    """Phi-3: llama-like with fused qkv / gate_up and partial rotary; no LongRoPE factors."""
    rope = _rope(c)
    if rope["rope_type"] != "default":
        _refuse(c, "LongRoPE scaling needs rope factor tensors edgeia3's GGUF writer does not write")
    if getattr(c, "sliding_window", None):
        _refuse(c, f"sliding_window={c.sliding_window} is set")
    _common(c, w, rope["rope_theta"])
    w.add_feed_forward_length(int(c.intermediate_size))
    w.add_head_count_kv(int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    rotary = float(getattr(c, "partial_rotary_factor", None) or 1.0)
    w.add_rope_dimension_count(int(rotary * _head_dim(c)))


def _gemma_common(c: Any, w: Any, rope_theta: float) -> None:
    _check_attention_scale(c)
    _common(c, w, rope_theta)
    w.add_feed_forward_length(int(c.intermediate_size))
    w.add_head_count_kv(int(c.num_key_value_heads))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_key_length(_head_dim(c))
    w.add_value_length(_head_dim(c))
    w.add_sliding_window(int(c.sliding_window))


def gemma2(c: Any, w: Any) -> None:
    """Gemma 2: soft-capped attention and final logits, every 2nd layer global."""
    rope = _rope(c)
    if rope["rope_type"] != "default":
        _refuse(c, f"RoPE scaling '{rope['rope_type']}'")
    _check_pattern(c, 2)
    _gemma_common(c, w, rope["rope_theta"])
    if c.attn_logit_softcapping:
        w.add_attn_logit_softcapping(float(c.attn_logit_softcapping))
    if c.final_logit_softcapping:
        w.add_final_logit_softcapping(float(c.final_logit_softcapping))


def gemma3(c: Any, w: Any) -> None:
    """Gemma 3 (text): q/k norms, every 6th layer global; local layers' RoPE base is 10000."""
    full, local = _rope(c, "full_attention"), _rope(c, "sliding_attention")
    if local["rope_type"] != "default" or local["rope_theta"] != 10000.0:
        _refuse(c, f"sliding layers' RoPE {local} differ from llama.cpp's fixed base 10000")
    if full["rope_type"] not in ("default", "linear"):
        _refuse(c, f"RoPE scaling '{full['rope_type']}'")
    if getattr(c, "final_logit_softcapping", None) or getattr(c, "attn_logit_softcapping", None):
        _refuse(c, "logit soft-capping is set (llama.cpp's Gemma 3 has none)")
    _check_pattern(c, 6)
    _gemma_common(c, w, full["rope_theta"])
    if full["rope_type"] == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))


def gpt2(c: Any, w: Any) -> None:
    """GPT-2: LayerNorm with biases, learned positions, GELU MLP, Conv1D weights."""
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        _refuse(c, f"activation {c.activation_function} (llama.cpp's GPT-2 uses tanh-approximated GELU)")
    _common(c, w, None)
    w.add_feed_forward_length(int(getattr(c, "n_inner", None) or 4 * c.hidden_size))
    w.add_layer_norm_eps(float(c.layer_norm_epsilon))


# Falcon MLP activations llama.cpp's graph computes: it always applies ggml's GELU, the tanh
# approximation. transformers' "gelu" (erf, every Falcon release) differs from it by at most
# 4.7e-4 per activation (at x = 2.7); on the tiny test models llama.cpp's logits differ from
# transformers' by 1.7e-4 with either GELU, its own compute floor (test_falcon.py).
_FALCON_GELU = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def falcon(c: Any, w: Any) -> None:
    """Falcon: parallel attention + GELU MLP off one LayerNorm (two for Falcon-40B's
    ln_attn / ln_mlp), NeoX RoPE, fused query_key_value, no linear biases.

    llama.cpp's falcon graph is that and nothing else: it has no ALiBi, no sequential
    (post-attention LayerNorm) block and no linear biases. Its converter regroups
    query_key_value from transformers' per-KV-group [q..; k; v] blocks into [all q; all k;
    all v]; with one KV head that is the identity, which is what this writer relies on
    (it copies the rows unchanged), so layouts with several KV groups are refused.
    """
    if getattr(c, "alibi", False):
        _refuse(c, "alibi=True (llama.cpp's falcon graph has RoPE only, no ALiBi)")
    if not getattr(c, "parallel_attn", True):
        _refuse(c, "parallel_attn=False (llama.cpp's falcon graph runs attention and MLP in parallel "
                   "off the same LayerNorm; it has no post-attention LayerNorm)")
    if getattr(c, "bias", False):
        raise EdgeIA3Error("falcon bias=True: llama.cpp's falcon graph has no query_key_value, dense "
                           "or MLP biases (it refuses a GGUF that carries them)")
    if c.activation not in _FALCON_GELU:
        _refuse(c, f"activation={c.activation} (llama.cpp's falcon MLP is GELU)")
    if c.new_decoder_architecture:
        groups, field = c.num_kv_heads, f"num_kv_heads={c.num_kv_heads}"
    else:
        groups, field = (1, "") if c.multi_query else (c.num_attention_heads, "multi_query=False")
    if groups != 1:
        raise EdgeIA3Error(f"falcon {field}: query_key_value interleaves q, k and v per KV group; "
                           "edgeia3's GGUF writer copies its rows as they are, which is llama.cpp's "
                           "[q; k; v] order only for one KV head (convert with llama.cpp's "
                           "convert_hf_to_gguf.py)")
    rope = _rope(c)
    if rope["rope_type"] != "default":
        _refuse(c, f"RoPE scaling '{rope['rope_type']}' is not written by edgeia3's GGUF writer")
    _common(c, w, rope["rope_theta"])
    w.add_feed_forward_length(int(c.ffn_hidden_size))  # llama.cpp's converter assumes 4 * hidden
    w.add_head_count_kv(1)
    w.add_layer_norm_eps(float(c.layer_norm_epsilon))


def t5(c: Any, w: Any) -> None:
    """T5 / Flan-T5: relative position buckets, RMS norms, no attention scale (llama.cpp's
    T5 graph), the MLP chosen by the tensors (gated GELU when wi_0 exists, else ReLU)."""
    if int(getattr(c, "relative_attention_max_distance", 128)) != 128:
        _refuse(c, f"relative_attention_max_distance={c.relative_attention_max_distance} "
                   "(llama.cpp's T5 buckets assume 128)")
    act = getattr(c, "dense_act_fn", "relu")
    want = "gelu_new" if getattr(c, "is_gated_act", False) else "relu"
    if act != want:
        _refuse(c, f"feed-forward activation {act} (llama.cpp's T5 runs {want} for this MLP)")
    w.add_context_length(int(getattr(c, "n_positions", None) or 512))
    w.add_embedding_length(int(c.d_model))
    w.add_feed_forward_length(int(c.d_ff))
    w.add_block_count(int(c.num_layers))
    w.add_decoder_block_count(int(getattr(c, "num_decoder_layers", None) or c.num_layers))
    w.add_head_count(int(c.num_heads))
    w.add_key_length(int(c.d_kv))
    w.add_value_length(int(c.d_kv))
    w.add_layer_norm_eps(float(c.layer_norm_epsilon))
    w.add_layer_norm_rms_eps(float(c.layer_norm_epsilon))
    w.add_relative_attn_buckets_count(int(c.relative_attention_num_buckets))
    w.add_decoder_start_token_id(decoder_start_token(c))
    w.add_vocab_size(int(c.vocab_size))
