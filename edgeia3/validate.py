"""Check an adapter against a base: one clear error per problem.

The checks run against anything that can describe its shape (``BaseShape``) - a loaded
transformers model (``edgeia3.base.LoadedBase``) or a GGUF file
(``edgeia3.converters.gguf.base_gguf.GGUFBase``) - so a GGUF base is never loaded into torch
just to validate an adapter, and this module sits below both (it imports no base loader).
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any, Protocol

from .adapter import IA3Adapter, fused_layout_for
from .errors import EdgeIA3Error
from .fingerprint import BaseIdentity
from .formats import load_adapter
from .registry import Family, Scaling, Site


class BaseShape(Protocol):
    """What validation needs to know about a base."""

    family: Family
    config: Any  # has num_hidden_layers and what the registry's fused_rows read

    @property
    def identities(self) -> list[BaseIdentity]: ...  # any of them may match the adapter's

    def module_shape(self, layer: int, site: Site) -> tuple[int, int]: ...  # logical [out, in]


def expected_length(base: BaseShape, layer: int, site_name: str, scaling: Scaling) -> int:
    site = base.family.site(site_name)
    out, inp = base.module_shape(layer, site)
    if scaling is Scaling.INPUT:
        if site.fused_rows is not None:
            raise EdgeIA3Error(f"site {site_name} lives in a fused module and cannot be input-scaled")
        return inp
    if site.fused_rows is not None:
        a, b = site.fused_rows(base.config)
        return b - a
    return out


def adapter_for_base(base: BaseShape, sites: list[str] | None = None, seed: int | None = None,
                     spread: float = 0.2) -> IA3Adapter:
    """An adapter shaped for ``base`` (a loaded model or a GGUF file): all ones, or with
    ``seed`` values 1 + spread * N(0, 1) - the identity / random adapter tests and benches use."""
    import numpy as np

    from .adapter import IA3Vector
    fam = base.family
    rng = np.random.default_rng(seed) if seed is not None else None
    vectors = []
    for i in range(base.config.num_hidden_layers):
        for name in sites or fam.default_targets:
            scaling = fam.site(name).scaling
            n = expected_length(base, i, name, scaling)
            values = np.ones(n, np.float32) if rng is None else (1 + spread * rng.standard_normal(n)).astype(np.float32)
            vectors.append(IA3Vector(i, name, scaling, values))
    return IA3Adapter(fam.name, vectors, base=base.identities[0], fused_layout=fused_layout_for(fam, base.config))


def validate_adapter(adapter: IA3Adapter, base: BaseShape, check_identity: bool = True) -> None:
    """Raise EdgeIA3Error unless ``adapter`` fits ``base`` exactly."""
    fam = base.family
    if adapter.family != fam.name:
        raise EdgeIA3Error(f"adapter is for the '{adapter.family}' family but the base is '{fam.name}'")
    ids = base.identities
    if check_identity and adapter.base is not None and not any(adapter.base.matches(i) for i in ids):
        what = "architecture/shapes" if all(adapter.base.fingerprint != i.fingerprint for i in ids) else "weights"
        raise EdgeIA3Error(
            f"adapter was made for another base: its {what} differ "
            f"(adapter base '{adapter.base.name}' fingerprint {adapter.base.fingerprint}/"
            f"{adapter.base.content}, this base '{ids[0].name}' {ids[0].fingerprint}/{ids[0].content})"
        )
    adapter.check_finite()
    n = int(base.config.num_hidden_layers)
    for v in adapter.vectors:
        if not 0 <= v.layer < n:
            raise EdgeIA3Error(f"adapter vector {v.key}: the base has only {n} layers")
        want = expected_length(base, v.layer, v.site, v.scaling)
        if v.values.size != want:
            raise EdgeIA3Error(
                f"adapter vector {v.key} has {v.values.size} values, the base expects {want} "
                "(shape mismatch: adapter for another model?)"
            )
    layout = fused_layout_for(fam, base.config)
    for site, rows in adapter.fused_layout.items():
        if layout.get(site) != [int(x) for x in rows]:
            raise EdgeIA3Error(f"fused layout of site {site} {rows} differs from the base's {layout.get(site)}")


def load_adapter_for(path: str | Path, base: BaseShape, check_identity: bool = True) -> IA3Adapter:
    """Load any supported adapter form and validate it against ``base``."""
    adapter = load_adapter(path, base_config=base.config)
    if not adapter.fused_layout:
        adapter = dataclasses.replace(adapter, fused_layout=fused_layout_for(base.family, base.config))
    validate_adapter(adapter, base, check_identity)
    return adapter
