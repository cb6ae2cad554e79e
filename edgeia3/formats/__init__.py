"""Converters between the canonical IA3 adapter and external adapter formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapter import CANONICAL_FILE, IA3Adapter


def load_adapter(path: str | Path, base_config: Any = None) -> IA3Adapter:
    """Any adapter form edgeia3 reads from a path: the canonical file (or a dir holding it),
    or a PEFT IA3 directory - which needs ``base_config`` (the HF config of its base) to
    know its family and the row ranges of fused modules."""
    path = Path(path)
    if path.is_dir() and not (path / CANONICAL_FILE).exists():
        from .peft_dir import read_peft_dir

        return read_peft_dir(path, config=base_config)
    return IA3Adapter.load(path)
