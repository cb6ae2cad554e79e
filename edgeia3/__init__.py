"""edgeia3: an on-device deployment toolchain for IA3 adapters.

The Python API mirrors the CLI steps::

    from edgeia3 import load_base, IA3Adapter, merge
    base = load_base("default")            # embedded SmolLM2-135M-Instruct
    adapter = load_adapter_for("my_ia3/", base)
"""

from .adapter import IA3Adapter, IA3Vector, identity_adapter
from .base import LoadedBase, load_base, resolve_base
from .errors import EdgeIA3Error
from .fingerprint import BaseIdentity
from .formats import load_adapter
from .formats.peft_dir import read_peft_dir, to_peft_model, write_peft_dir
from .merge import fold_into_model, merge, merge_loaded
from .registry import Family, Scaling, Site, get_family
from .validate import load_adapter_for, validate_adapter

__version__ = "0.1.0"

__all__ = [
    "BaseIdentity", "EdgeIA3Error", "Family", "IA3Adapter", "IA3Vector", "LoadedBase", "Scaling",
    "Site", "fold_into_model", "get_family", "identity_adapter", "load_adapter", "load_adapter_for", "load_base",
    "merge", "merge_loaded", "read_peft_dir", "resolve_base", "to_peft_model", "validate_adapter",
    "write_peft_dir",
]
