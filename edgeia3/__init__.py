"""edgeia3: an on-device deployment toolchain for IA3 adapters.

The Python API mirrors the CLI steps::

    from edgeia3 import load_base, IA3Adapter, merge
    base = load_base("default")            # embedded SmolLM2-135M-Instruct
    adapter = load_adapter_for("my_ia3/", base)

Names are resolved on first use (PEP 562), so ``import edgeia3.errors`` or a
converter module does not load every step (torch, transformers) and the package
itself imports nothing: layers keep pointing one way.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "IA3Adapter": "adapter", "IA3Vector": "adapter", "identity_adapter": "adapter",
    "LoadedBase": "base", "load_base": "base", "resolve_base": "base",
    "EdgeIA3Error": "errors",
    "BaseIdentity": "fingerprint",
    "load_adapter": "formats",
    "read_peft_dir": "formats.peft_dir", "to_peft_model": "formats.peft_dir", "write_peft_dir": "formats.peft_dir",
    "fold_into_model": "merge", "merge": "merge", "merge_loaded": "merge",
    "Family": "registry", "Scaling": "registry", "Site": "registry", "get_family": "registry",
    "load_adapter_for": "validate", "validate_adapter": "validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edgeia3' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """``edgeia3.merge`` is the merge function (as with an eager ``from .merge import merge``),
    even after the import system binds the submodule of that name onto the package."""

    @property
    def merge(self) -> Any:
        return importlib.import_module(f"{__name__}.merge").merge

    @merge.setter
    def merge(self, value: Any) -> None:
        pass  # the submodule stays reachable as sys.modules["edgeia3.merge"]


sys.modules[__name__].__class__ = _Package
