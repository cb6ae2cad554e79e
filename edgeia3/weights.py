"""Which weights an adapter was trained on, which weights an export runs, and whether they agree.

An IA3 adapter learns to correct the rounding of the exact 4-bit grid it was
trained on; on another grid of the same base (NF4 vs llama.cpp's Q4_1 vs the
ONNX builder's int4) a 135M model loses much of what it learned (FACTS.md:
93.8% -> 70% on a GGUF, 60% on a re-quantized int4 ONNX). So every adapter
records its weights (``IA3Adapter.quant`` + ``trained_on``), every export
records what it runs (``deployed``), and a difference is a warning, or an
error under ``--strict``.

A description of deployed weights is a dict:
- ``{"kind": "gguf", "sha256": ..., "quant": "q4_1", "name": ...}``: the blocks of
  one GGUF file (llama.cpp, the transcoded ONNX, or their exact fp32 dequantization);
- ``{"kind": "full"}``: the base's full-precision weights (fp32/fp16 builds of a transformers base);
- ``{"kind": "requantized", "how": ...}``: weights rounded to a grid no adapter trained on.
"""

from __future__ import annotations

from typing import Any

from .errors import note_or_refuse

COST = ("measured on SmolLM2-135M: an adapter trained to 93.8% on one 4-bit grid answered 70% on "
        "llama.cpp's Q4_1 and 60% on the ONNX builder's int4 (FACTS.md)")


def llama_quant(trained_on: dict) -> str | None:
    """The llama.cpp type when an adapter was trained on its base quantized once by edgeia3
    (``edgeia3 train --quant q4_0`` ...: ``base.quantized_gguf``); None for a GGUF base's own
    file, NF4 or full precision."""
    return trained_on.get("quant") if trained_on.get("source") == "quantized" else None


def trained_label(adapter: Any) -> str:
    """Human description of what an adapter was trained on."""
    t = adapter.trained_on or {}
    if t.get("sha256"):
        how = "dequantized " if adapter.quant == "none" else ""
        return f"{how}{t.get('quant', '?')} blocks of {t.get('name', '?')} ({t['sha256']})"
    return {"nf4": "an NF4 (bitsandbytes) base", "none": "full-precision weights"}.get(adapter.quant, adapter.quant)


def deployed_label(deployed: dict) -> str:
    if deployed.get("kind") == "gguf":
        return f"{deployed.get('quant', '?')} blocks of {deployed.get('name', '?')} ({deployed.get('sha256')})"
    if deployed.get("kind") == "full":
        return "full-precision weights"
    return deployed.get("how", "re-quantized weights")


def same_weights(adapter: Any, deployed: dict) -> bool:
    """True when ``deployed`` runs the very weights ``adapter`` was trained on."""
    t = adapter.trained_on or {}
    if deployed.get("kind") == "gguf":
        return bool(t.get("sha256")) and t["sha256"] == deployed.get("sha256")
    if deployed.get("kind") == "full":
        return adapter.quant == "none" and not t.get("sha256")
    return False


def check_deployment(name: str, adapter: Any, deployed: dict, strict: bool, notes: list[str]) -> bool:
    """Append a warning to ``notes`` (or raise under ``strict``) when the weights differ."""
    if same_weights(adapter, deployed):
        return True
    msg = (f"adapter '{name}' was trained on {trained_label(adapter)} but this export runs "
           f"{deployed_label(deployed)}: expect its accuracy to drop ({COST}). Train on the weights you deploy "
           "(edgeia3 train --quant auto on the same base) to remove the gap")
    note_or_refuse(msg, strict, notes)
    return False
