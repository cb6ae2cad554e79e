"""The PEFT IA3 model that training runs: wrapping a base on the chosen sites, a full-precision
twin of a 4-bit base for fast evaluation, and the trained vectors read back as the canonical
adapter (``edgeia3.adapter``). Used by ``train`` and by ``bench/peft_loop.py``'s plain loop."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from .adapter import IA3Adapter, IA3Vector, fused_layout_for
from .base import LoadedBase
from .formats.peft_dir import peft_target_modules


def ia3_params(model: Any) -> dict[str, torch.nn.Parameter]:
    """The IA3 vectors PEFT added to ``model``, by parameter name."""
    return {n: p for n, p in model.named_parameters() if "ia3_l" in n}


def wrap_with_ia3(base: LoadedBase, sites: list[str]) -> Any:
    """A PEFT IA3 model on ``base`` targeting ``sites``; fused slices not targeted stay at 1."""
    from peft import IA3Config, get_peft_model

    fam = base.family
    modules, feedforward = peft_target_modules(fam, sites)
    cfg = IA3Config(task_type=fam.peft_task_type, target_modules=modules, feedforward_modules=feedforward,
                    fan_in_fan_out=fam.conv1d)
    model = get_peft_model(base.model, cfg)
    # A fused module (phi3 qkv_proj) holds several sites in one vector: mask the
    # gradient of slices that were not asked for, so they stay exactly 1.
    for s in fam.sites:
        if s.fused_rows is not None and s.name not in sites and s.module in modules:
            a, b = s.fused_rows(base.config)
            for name, p in ia3_params(model).items():
                if f".{s.module}." in name:
                    mask = torch.ones_like(p)
                    mask[a:b] = 0
                    p.register_hook(lambda g, m=mask: g * m)
    return model


class EvalTwin:
    """A full-precision twin of a 4-bit (NF4 or GGUF-block) base for evaluation.

    4-bit layers dequantize every weight on every forward, which makes greedy
    generation minutes slower (and bitsandbytes' fast CPU eval path is the repack
    that breaks training, FACTS.md). The twin holds the *dequantized* 4-bit
    weights, so with the current IA3 vectors copied in it computes the same
    function as the 4-bit model (exactness tested), at fp32 speed.
    """

    def __init__(self, lb: LoadedBase, sites: list[str]):
        from .merge import dequantize_model

        if lb.quant == "gguf":
            from edgeia3.converters.gguf.torch_weights import densify

            twin = densify(copy.deepcopy(lb.model))
        else:
            twin = dequantize_model(copy.deepcopy(lb.model))
        self.model = wrap_with_ia3(dataclasses.replace(lb, model=twin, quant="none"), sites)

    def sync(self, trained: Any) -> Any:
        src = ia3_params(trained)
        with torch.no_grad():
            for name, p in ia3_params(self.model).items():
                p.copy_(src[name])
        return self.model


def adapter_from_peft(model: Any, base: LoadedBase, sites: list[str], quant: str) -> IA3Adapter:
    """Read the trained vectors out of a PEFT model into the canonical adapter."""
    fam = base.family
    layout = fused_layout_for(fam, base.config)
    params = {n.replace(".default", ""): p.detach().float().cpu().numpy().ravel()
              for n, p in ia3_params(model).items()}
    vectors = []
    for name, values in params.items():
        path = name.split("base_model.model.", 1)[-1].rsplit(".ia3_l", 1)[0]
        layer, located = fam.locate(path)
        for s in located:
            if s.name not in sites:
                continue
            part = values[layout[s.name][0]:layout[s.name][1]] if s.name in layout else values
            vectors.append(IA3Vector(layer, s.name, s.scaling, part.copy()))
    return IA3Adapter(fam.name, vectors, base=base.identity, quant=quant, fused_layout=layout,
                      trained_on=dict(base.weights or {}))
