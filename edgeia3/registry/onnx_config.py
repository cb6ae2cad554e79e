"""config.json as onnxruntime-genai's model builder (0.18) must read it, per family.

transformers 5 writes RoPE settings as ``rope_parameters`` (Gemma 3: one dict per
layer type). The builder lifts the keys of ``rope_parameters`` onto the config
object (where the attribute is missing) and then reads older flat names
(``rope_type``, ``rope_theta``, ``rope_local_base_freq``, ``type``).
transformers drops such names at the top level of config.json when it loads it,
so they are added inside ``rope_parameters``, next to what transformers reads,
which stays as it is (other fields change only where the builder reads them
differently: phi3's original_max_position_embeddings, Mistral's layer_types).
A function here takes config.json (a dict) and returns the dict the builder
should read. Where the builder would compute something else than transformers,
it raises EdgeIA3Error naming the config value. Each translation and refusal
was checked against transformers' logits on tiny models.
"""

from __future__ import annotations

from ..errors import EdgeIA3Error


def _refuse(cfg: dict, what: str) -> None:
    raise EdgeIA3Error(f"ONNX export of model_type {cfg.get('model_type')}: {what}; onnxruntime-genai's model "
                       "builder would build a model that computes something else than transformers")


def sliding_all_layers(cfg: dict) -> dict:
    """Mistral: ``sliding_window`` applies to every layer, but the builder windows only the
    layers ``layer_types`` marks as sliding (none when there is no layer_types)."""
    if cfg.get("sliding_window") and not cfg.get("layer_types"):
        cfg["layer_types"] = ["sliding_attention"] * cfg["num_hidden_layers"]
    return cfg


def gemma3(cfg: dict) -> dict:
    """Per-layer-type RoPE -> the full layers' as the flat one, the sliding layers' theta
    as rope_local_base_freq (the builder's two cos/sin caches)."""
    rope = cfg.get("rope_parameters") or {}
    full, local = rope.get("full_attention"), rope.get("sliding_attention")
    if full is None or local is None:
        return cfg
    if local.get("rope_type", "default") != "default":
        _refuse(cfg, f"rope_parameters.sliding_attention.rope_type={local['rope_type']!r} (the builder "
                "applies no scaling of its own to the sliding layers' RoPE)")
    # The builder scales both caches with the full layers' scaling (seen: linear, factor 8).
    if full.get("rope_type", "default") != "default" and "sliding_attention" in cfg.get("layer_types", []):
        _refuse(cfg, f"rope_parameters.full_attention.rope_type={full['rope_type']!r} with sliding layers "
                "(the builder applies it to the sliding layers' RoPE too)")
    rope.update({k: v for k, v in full.items()}, rope_local_base_freq=local["rope_theta"])
    return cfg


def phi3(cfg: dict) -> dict:
    """The builder picks its LongRoPE model when max_position_embeddings differs from
    original_max_position_embeddings, transformers only for rope_type longrope; the
    builder's LongRoPE reads the old name ``type``."""
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") == "longrope":
        rope.setdefault("type", "longrope")
    elif cfg.get("original_max_position_embeddings") != cfg.get("max_position_embeddings"):
        cfg["original_max_position_embeddings"] = cfg["max_position_embeddings"]
    return cfg
