"""Canonical IA3 adapter <-> vectors in a GGUF base's row order, and the row
scalings those vectors mean for the base's tensors.

Everything per-family comes from the registry: the GGUF tensor of a site
(``Site.gguf_tensor``), its RoPE row permutation (``Site.gguf_permute``), rows
of fused modules (``Site.fused_rows``) and whether the MLP is gated
(``Site.input_fold``: a gated MLP's input-scaled ``down`` site folds into the
rows of the ``up`` site's tensor).

Vector names: ``<weight base>.ia3_out`` multiplies the rows (output channels)
of ``<weight base>.weight`` (and ``.bias``); ``<weight base>.ia3_in``
multiplies its columns (input channels). A fused weight gets one full-length
``ia3_out`` vector, ones in the rows of sites the adapter leaves alone.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np

from edgeia3.adapter import IA3Adapter, IA3Vector
from edgeia3.errors import EdgeIA3Error
from edgeia3.registry import Family, Scaling, Site

from .ggml_index import GGUFIndex

OUT_SUFFIX, IN_SUFFIX = "ia3_out", "ia3_in"


def rope_permute(v: np.ndarray, groups: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf ``permute``) applied to a row vector."""
    return v.reshape(groups, 2, -1).swapaxes(1, 2).reshape(-1)


def rope_unpermute(v: np.ndarray, groups: int) -> np.ndarray:
    return v.reshape(groups, -1, 2).swapaxes(1, 2).reshape(-1)


def permute_groups(site: Site, heads: dict[str, int]) -> int | None:
    """Head groups of a site's RoPE permutation (q: attention heads, k: KV heads)."""
    if site.gguf_permute is None:
        return None
    return heads["q" if site.gguf_permute == "q" else "k"]


def vector_name(site: Site, layer: int, scaling: Scaling) -> str:
    return f"{site.gguf_tensor.format(i=layer)}.{OUT_SUFFIX if scaling is Scaling.OUTPUT else IN_SUFFIX}"


def to_gguf_vectors(adapter: IA3Adapter, config: SimpleNamespace, heads: dict[str, int]) -> dict[str, np.ndarray]:
    """The adapter as named vectors in GGUF row order (permutations applied, fused rows merged)."""
    fam = adapter.family_spec
    out: dict[str, np.ndarray] = {}
    for v in adapter.vectors:
        site = fam.site(v.site)
        if site.gguf_tensor is None:
            raise EdgeIA3Error(f"family {fam.name} has no GGUF tensor for site {v.site}")
        values = np.asarray(v.values, dtype=np.float32)
        groups = permute_groups(site, heads)
        if groups:
            values = rope_permute(values, groups)
        name = vector_name(site, v.layer, v.scaling)
        if site.fused_rows is None or v.scaling is Scaling.INPUT:
            out[name] = values.copy()
            continue
        a, b, total = _fused(adapter, site, config)
        full = out.setdefault(name, np.ones(total, dtype=np.float32))
        full[a:b] = values
    return out


def from_gguf_vectors(vectors: dict[str, np.ndarray], family: Family, sites: list[str], layers: int,
                      layout: dict[str, list[int]], heads: dict[str, int], **meta) -> IA3Adapter:
    """Inverse of to_gguf_vectors: back to the canonical adapter (permutations undone).

    ``layout`` gives [start, stop, total] of every fused site (IA3Adapter.fused_layout).
    """
    found, used = [], set()
    for i in range(layers):
        for name in sites:
            site = family.site(name)
            for scaling in (Scaling.OUTPUT, Scaling.INPUT):
                key = vector_name(site, i, scaling)
                if key not in vectors:
                    continue
                values = vectors[key]
                if site.fused_rows is not None and scaling is Scaling.OUTPUT:
                    if name not in layout:
                        raise EdgeIA3Error(f"adapter GGUF lacks the fused layout of site {name}")
                    a, b, _ = layout[name]
                    values = values[a:b]
                groups = permute_groups(site, heads)
                if groups:
                    values = rope_unpermute(values, groups)
                found.append(IA3Vector(i, name, scaling, np.array(values, dtype=np.float32)))
                used.add(key)
    unknown = sorted(set(vectors) - used)
    if unknown:
        raise EdgeIA3Error(f"adapter GGUF has tensors that match none of its sites: {', '.join(unknown[:3])}")
    return IA3Adapter(family.name, found, fused_layout=layout, **meta)


def _fused(adapter: IA3Adapter, site: Site, config: SimpleNamespace) -> tuple[int, int, int]:
    if site.name in adapter.fused_layout:
        a, b, total = adapter.fused_layout[site.name]
        return int(a), int(b), int(total)
    a, b = site.fused_rows(config)
    total = max(t.fused_rows(config)[1] for t in adapter.family_spec.sites if t.module == site.module)
    return a, b, total


def scale_plan(vectors: dict[str, np.ndarray], index: GGUFIndex, family: Family) -> dict[str, np.ndarray]:
    """Per-row multipliers for each base tensor (``*.weight`` and ``*.bias``) the vectors touch.

    Output vectors scale their weight's rows and bias. Input vectors of a
    gated MLP's down projection fold into the ``up`` site's rows (exact:
    down(act(gate x) * up x * l) == down(act(gate x) * (l o up) x)); any other
    input vector is column scaling, which block scales cannot express.
    """
    plan: dict[str, np.ndarray] = {}

    def scale(tensor_base: str, start: int, values: np.ndarray) -> None:
        weight = index.tensor(f"{tensor_base}.weight")
        targets = [weight.name] + [f"{tensor_base}.bias"] * (f"{tensor_base}.bias" in index.tensors)
        for t in targets:
            full = plan.setdefault(t, np.ones(weight.rows, dtype=np.float32))
            full[start:start + values.size] *= values

    config = gguf_config(index, family)
    for name, values in vectors.items():
        base, _, kind = name.rpartition(".")
        if kind == OUT_SUFFIX:
            rows = index.tensor(f"{base}.weight").rows
            if values.size != rows:
                raise EdgeIA3Error(f"IA3 vector {name} has {values.size} values, tensor {base} has {rows} rows")
            scale(base, 0, values)
            continue
        site, layer = _input_site(family, base)
        if site is not None and site.gguf_fold_rows:
            if f"{site.gguf_fold_gate.format(i=layer)}.weight" in index.tensors or bool(np.all(values > 0)):
                scale(site.gguf_fold_rows.format(i=layer), 0, values)
                continue
            raise EdgeIA3Error(
                f"IA3 vector {name} scales the input of {base} behind a ReLU (no gate tensor) and has "
                f"non-positive values (min {float(values.min()):.3g}): relu(l*z) == l*relu(z) needs l > 0, "
                "so no exact row-scale fold exists and edgeia3 refuses rather than re-quantize")
        up = family.input_fold_site(site.name) if site else None
        if up is None:
            raise EdgeIA3Error(
                f"IA3 vector {name} scales the input channels (columns) of {base}; family "
                f"'{family.name}' has no gated MLP, so no exact row-scale fold exists and edgeia3 "
                "refuses rather than re-quantize. Train without the feed-forward site for GGUF."
            )
        up_base = up.gguf_tensor.format(i=layer)
        start = up.fused_rows(config)[0] if up.fused_rows else 0
        scale(up_base, start, values)
    return plan


def _input_site(family: Family, tensor_base: str) -> tuple[Site | None, int]:
    """The INPUT-scaled site whose GGUF tensor pattern ``tensor_base`` is, and its layer."""
    for s in family.sites:
        if s.scaling is Scaling.INPUT and s.gguf_tensor:
            m = re.fullmatch(re.escape(s.gguf_tensor).replace(r"\{i\}", r"(\d+)"), tensor_base)
            if m:
                return s, int(m.group(1))
    return None, -1


def gguf_config(index: GGUFIndex, family: Family) -> SimpleNamespace:
    """An HF-config-like view of a GGUF base, for the registry's row functions."""
    heads = index.arch_int("attention.head_count")
    hidden = index.arch_int("embedding_length")
    head_dim = index.arch_int("attention.key_length", hidden // heads)
    return SimpleNamespace(
        model_type=family.model_types[0], num_hidden_layers=index.arch_int("block_count"),
        hidden_size=hidden, intermediate_size=index.arch_int("feed_forward_length"),
        num_attention_heads=heads, num_key_value_heads=index.arch_int("attention.head_count_kv", heads),
        head_dim=head_dim, vocab_size=index.arch_int("vocab_size", 0) or None,
    )
