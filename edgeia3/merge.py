"""Merge step: fold IA3 vectors into a transformers model's weights.

Output sites scale weight rows (and the bias); input sites scale weight
columns. The vectors are folded into the weights the adapter was trained on -
the *dequantized GGUF blocks* (the default) or the *dequantized NF4* weights -
so the result is exact; folding into the original fp32 weights would add the 4-bit
quantization error (PEFT refuses the 4-bit case altogether, peft #1704).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapter import IA3Adapter
from .atomic import atomic_dir, atomic_file, check_out
from .base import DEFAULT_BASE, LoadedBase, load_base
from .errors import EdgeIA3Error
from .formats import load_adapter
from .registry import Family, Scaling
from .validate import load_adapter_for
from .weights import llama_quant

INTO_CHOICES = ("auto", "full", "nf4", "gguf")


def fold_into_model(model: Any, adapter: IA3Adapter, family: Family) -> None:
    """Scale ``model``'s weights in place by ``adapter`` (fp32/fp16 Linear or Conv1D)."""
    with torch.no_grad():
        for v in adapter.vectors:
            site = family.site(v.site)
            module = model.get_submodule(family.module_path(v.layer, site))
            w = module.weight.data
            w = w.T if family.conv1d else w  # a view: [out, in] either way
            if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise EdgeIA3Error(f"{type(module).__name__} weights are quantized; dequantize before merging")
            scale = torch.from_numpy(v.values).to(w.dtype)
            rows = slice(*site.fused_rows(model.config)) if site.fused_rows else slice(None)
            if v.scaling is Scaling.OUTPUT:
                w[rows] *= scale[:, None]
                if getattr(module, "bias", None) is not None:
                    module.bias.data[rows] *= scale
            else:
                if site.fused_rows is not None:
                    raise EdgeIA3Error(f"site {v.site} is in a fused module and cannot be input-scaled")
                w[:, :] *= scale[None, :]


def dequantize_model(model: Any) -> Any:
    """Replace bitsandbytes 4-bit Linear layers by fp32 Linear holding the dequantized weights."""
    model = model.dequantize()
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.float()


@dataclass
class MergeResult:
    out: Path
    into: str  # human description of which weights the vectors were folded into
    adapter: IA3Adapter
    seconds: float


def merge_loaded(base: LoadedBase, adapter: IA3Adapter | None) -> Any:
    """Fold ``adapter`` into ``base`` (dequantizing a 4-bit base first; None: only that)."""
    model = base.model
    if base.quant == "nf4":
        model = dequantize_model(model)
    elif base.quant == "gguf":
        from edgeia3.converters.gguf.torch_weights import densify

        model = densify(model)
    if adapter is not None:
        fold_into_model(model, adapter, base.family)
    return model


def merge(base: str = DEFAULT_BASE, adapter: str | Path = "", out: str | Path = "",
          into: str = "auto", force: bool = False) -> MergeResult:
    """Load ``base``, fold ``adapter`` in and save a transformers directory at ``out``
    (or, when ``out`` ends in ``.gguf``, patch the base GGUF's quantized blocks).

    ``into``: ``auto`` follows the adapter's training quantization, ``full``
    uses the full-precision weights, ``nf4`` the dequantized NF4 weights.
    An existing ``out`` (a non-empty directory, or a file) is refused unless ``force``.
    """
    if into not in INTO_CHOICES:
        raise EdgeIA3Error(f"--into must be one of {', '.join(INTO_CHOICES)}")
    if Path(out).suffix == ".gguf":
        return _merge_into_gguf(base, adapter, Path(out), force)
    check_out(out, force)
    t0 = time.perf_counter()
    # Peek at the adapter's metadata before choosing how to load the base.
    quant, trained_on = _adapter_quant(adapter)
    if into == "auto":
        into = quant if quant in ("nf4", "gguf") else "full"
    load_as = {"nf4": "nf4", "full": "none"}.get(into)
    if into == "gguf":  # the GGUF blocks it was trained on: the base file, or its llama.cpp quantization
        load_as = llama_quant(trained_on) or "gguf"
    lb = load_base(base, quant=load_as)
    ad = load_adapter_for(adapter, lb)
    model = merge_loaded(lb, ad)
    what = {"nf4": "dequantized NF4 weights (exact w.r.t. the 4-bit model it was trained on)",
            "gguf": f"dequantized {(lb.weights or {}).get('quant')} GGUF blocks (the weights it was trained on)",
            }.get(into, "full-precision weights")
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp)
        if lb.tokenizer is not None:
            lb.tokenizer.save_pretrained(tmp)
        (tmp / "edgeia3_merge.json").write_text(json.dumps({
            "base": lb.source.name,
            "base_identity": lb.identity.to_dict(),
            "adapter": str(adapter),
            "adapter_sites": ad.sites,
            "adapter_quant": ad.quant,
            "merged_into": into,
        }, indent=2) + "\n")
    return MergeResult(Path(out), what, ad, time.perf_counter() - t0)


def _merge_into_gguf(base: str, adapter: str | Path, out: Path, force: bool) -> MergeResult:
    """Merge straight into an already-quantized GGUF by rescaling block scales."""
    from .base import resolve_gguf_base
    from .steps.gguf_merge import merge_gguf

    if out.exists() and out.resolve() == resolve_gguf_base(base).resolve():
        raise EdgeIA3Error("--out must differ from the base GGUF (the base stays pristine)")
    check_out(out, force, kind="file")
    # merge_gguf writes (atomically) over the empty temp file; ours then replaces ``out``.
    with atomic_file(out, force=force) as tmp:
        res = merge_gguf(base=base, adapter=adapter, out=tmp)
    into = res.into + "".join(f"; note: {n}" for n in res.notes)
    return MergeResult(out, into, res.adapter, res.seconds)


def _adapter_quant(path: str | Path) -> tuple[str, dict]:
    try:
        ad = load_adapter(path)
        return ad.quant, ad.trained_on
    except EdgeIA3Error:
        return "none", {}  # a bare PEFT dir carries no quant info; load_adapter_for reports real errors
