"""Check an adapter against a loaded base: one clear error per problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapter import IA3Adapter, fused_layout_for
from .base import LoadedBase
from .errors import EdgeIA3Error
from .fingerprint import module_shape, num_layers
from .registry import Scaling


def expected_length(base: LoadedBase, layer: int, site_name: str, scaling: Scaling) -> int:
    fam = base.family
    site = fam.site(site_name)
    out, inp = module_shape(base.model.get_submodule(fam.module_path(layer, site)), fam.conv1d)
    if scaling is Scaling.INPUT:
        if site.fused_rows is not None:
            raise EdgeIA3Error(f"site {site_name} lives in a fused module and cannot be input-scaled")
        return inp
    if site.fused_rows is not None:
        a, b = site.fused_rows(base.config)
        return b - a
    return out


def validate_adapter(adapter: IA3Adapter, base: LoadedBase, check_identity: bool = True) -> None:
    """Raise EdgeIA3Error unless ``adapter`` fits ``base`` exactly."""
    if adapter.family != base.family.name:
        raise EdgeIA3Error(
            f"adapter is for the '{adapter.family}' family but the base is '{base.family.name}'"
        )
    if check_identity and adapter.base is not None and not adapter.base.matches(base.identity):
        what = "architecture/shapes" if adapter.base.fingerprint != base.identity.fingerprint else "weights"
        raise EdgeIA3Error(
            f"adapter was made for another base: its {what} differ "
            f"(adapter base '{adapter.base.name}' fingerprint {adapter.base.fingerprint}/"
            f"{adapter.base.content}, this base '{base.identity.name}' "
            f"{base.identity.fingerprint}/{base.identity.content})"
        )
    adapter.check_finite()
    n = num_layers(base.config)
    for v in adapter.vectors:
        if not 0 <= v.layer < n:
            raise EdgeIA3Error(f"adapter vector {v.key}: the base has only {n} layers")
        want = expected_length(base, v.layer, v.site, v.scaling)
        if v.values.size != want:
            raise EdgeIA3Error(
                f"adapter vector {v.key} has {v.values.size} values, the base expects {want} "
                "(shape mismatch: adapter for another model?)"
            )
    layout = fused_layout_for(base.family, base.config)
    for site, rows in adapter.fused_layout.items():
        if layout.get(site) != list(rows):
            raise EdgeIA3Error(f"fused layout of site {site} {rows} differs from the base's {layout.get(site)}")


def load_adapter_for(path: str | Path, base: LoadedBase, check_identity: bool = True) -> IA3Adapter:
    """Load any supported adapter form and validate it against ``base``."""
    adapter = IA3Adapter.load(path, base_config=base.config)
    if not adapter.fused_layout:
        adapter.fused_layout = fused_layout_for(base.family, base.config)
    validate_adapter(adapter, base, check_identity)
    return adapter


def stamp_base(adapter: IA3Adapter, base: LoadedBase) -> Any:
    """Record ``base``'s identity in an adapter that has none (e.g. from PEFT)."""
    if adapter.base is None:
        adapter.base = base.identity
    return adapter
