"""Exact merge of an IA3 adapter into an already-quantized GGUF.

Each affected row's block scale fields are multiplied by the IA3 value
(blocks.py); nothing is dequantized or re-quantized, so the merged file is
the base's own quantized model times diag(l), exactly up to the fp16
rounding of the new scales. The output is a copy of the base with those
bytes rewritten in place through a numpy memmap.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from edgeia3.adapter import IA3Adapter
from edgeia3.atomic import atomic_file

from .adapter_file import readable
from .base_gguf import GGUFBase
from .blocks import row_fields
from .ggml_index import GGUFIndex
from .plan import scale_plan, to_gguf_vectors


def adapter_plan(adapter: IA3Adapter, base: GGUFBase) -> dict[str, np.ndarray]:
    """Per-row multipliers of every base tensor ``adapter`` touches."""
    vectors = to_gguf_vectors(adapter, base.config, base.heads)
    return scale_plan(vectors, base.index, base.family)


def apply_plan(buf: np.ndarray, index: GGUFIndex, plan: dict[str, np.ndarray],
               pristine: dict[str, np.ndarray] | None = None) -> None:
    """Rewrite the scale fields in ``buf`` (a writable uint8 view of the file).

    ``pristine`` (tensor -> original stored fields) lets a runtime apply an
    adapter from the original values however often it switches; without it
    the current values are the original.
    """
    for name, l in plan.items():
        fields = row_fields(buf, index.tensor(name))
        original = pristine[name] if pristine is not None else np.array(fields.view)
        fields.view[...] = fields.scaled(original, l)


def merge_into_file(base_path: Path, adapter: IA3Adapter, out: Path, base: GGUFBase | None = None) -> float:
    """Copy ``base_path`` to ``out`` (atomically) with ``adapter`` merged; returns patch seconds."""
    base = base or GGUFBase(base_path)
    plan = adapter_plan(adapter, base)
    with atomic_file(out) as tmp:
        shutil.copyfile(base_path, tmp)
        readable(tmp)
        t0 = time.perf_counter()
        mm = np.memmap(tmp, dtype=np.uint8, mode="r+")
        apply_plan(mm, base.index, plan)
        mm.flush()
        del mm
        seconds = time.perf_counter() - t0
    return seconds
