"""Architecture registry: one declarative entry per model family.

An entry names where IA3 can act in that family (its *sites*), which of them
PEFT targets by default, and how each site appears in every format edgeia3
writes (HF module, ONNX node, GGUF tensor, row permutation). Code elsewhere
asks the registry; it never branches on architecture names.
"""

from .base import (Family, Scaling, Site, decoder_start_token, families, family_for_config,
                   family_for_gguf_arch, get_family, register)
from . import builtin as _builtin  # noqa: F401  (registers the built-in families)

__all__ = [
    "Family",
    "Scaling",
    "Site",
    "decoder_start_token",
    "families",
    "family_for_config",
    "family_for_gguf_arch",
    "get_family",
    "register",
]
