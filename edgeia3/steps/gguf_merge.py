"""``edgeia3 merge --base X.gguf --out Y.gguf``: the exact block-scale merge as a step (the
base spec resolved, the adapter loaded and validated against the GGUF, the deployment
checked); the patching itself is ``edgeia3.converters.gguf.merge``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeia3.adapter import IA3Adapter
from edgeia3.base import resolve_gguf_base
from edgeia3.converters.gguf.base_gguf import GGUFBase
from edgeia3.converters.gguf.ggml_index import gguf_weights
from edgeia3.converters.gguf.merge import adapter_plan, merge_into_file
from edgeia3.errors import EdgeIA3Error
from edgeia3.weights import check_deployment

@dataclass
class GGUFMerge:
    out: Path
    into: str  # which weights the vectors were folded into
    adapter: IA3Adapter
    seconds: float
    notes: list[str] = field(default_factory=list)


def merge_gguf(base: str | Path, adapter: str | Path, out: str | Path) -> GGUFMerge:
    """``edgeia3 merge --base X.gguf --adapter A --out Y.gguf``: exact block-scale merge."""
    t0 = time.perf_counter()
    out = Path(out)
    base_path = resolve_gguf_base(base)
    if out.resolve() == base_path.resolve():
        raise EdgeIA3Error("--out must differ from the base GGUF (the base stays pristine)")
    gb = GGUFBase(base_path, name=str(base))
    ad = gb.load_adapter(adapter)
    merge_into_file(base_path, ad, out, gb)
    types = sorted({_type_name(gb.index.tensor(t).type) for t in adapter_plan(ad, gb)})
    what = f"the GGUF's {'/'.join(types)} block scales (exact, no re-quantization)"
    notes: list[str] = []
    check_deployment("adapter", ad, gguf_weights(base_path, base_path.name), False, notes)
    return GGUFMerge(out, what, ad, time.perf_counter() - t0, notes)


def _type_name(t: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(t).name
