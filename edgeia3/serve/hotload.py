"""Which adapters an ``--adapters-dir`` holds, and the names the server takes.

Loading and unloading while serving is the runtime's own (``Runtime.load_adapter`` /
``unload_adapter``, ``cannot_load`` says why a runtime cannot): every adapter is validated
against the served base exactly as the export steps validate it (family, base identity,
vector lengths, finiteness). llama.cpp (a GGUF side export, T5 included) takes canonical,
PEFT or ``.ia3.gguf`` adapters; onnxruntime-genai (an ONNX side export) those and
``.onnx_adapter`` files fitting its IA3 inputs; merged exports, exports without IA3 inputs,
the torch and T5 ONNX runtimes take none.
"""

from __future__ import annotations

from pathlib import Path

from ..adapter import check_adapter_name, is_adapter_name
from ..errors import EdgeIA3Error
from ..runtimes import NotLoadable

__all__ = ["ADAPTER_SUFFIXES", "NotLoadable", "check_name", "discover"]

ADAPTER_SUFFIXES = (".ia3.gguf", ".onnx_adapter", ".safetensors")
check_name = check_adapter_name  # one rule for exports and the server (edgeia3.adapter)


def discover(directory: str | Path) -> dict[str, Path]:
    """Adapters in ``directory``: NAME/ (canonical or PEFT dir), NAME.ia3.gguf, NAME.onnx_adapter,
    NAME.safetensors (canonical file). Names are sorted; anything else is ignored, and so is a
    name that differs from an earlier one only in case (names are case-insensitive)."""
    d = Path(directory)
    if not d.is_dir():
        raise EdgeIA3Error(f"adapters dir not found: {d}")
    found: dict[str, tuple[str, Path]] = {}  # lower-case name -> (name, path)
    for p in sorted(d.iterdir()):
        if p.name.startswith("."):
            continue
        name = None
        if p.is_dir() and ((p / "edgeia3_adapter.safetensors").exists() or (p / "adapter_config.json").exists()):
            name = p.name
        elif p.is_file():
            for suffix in ADAPTER_SUFFIXES:
                if p.name.endswith(suffix) and len(p.name) > len(suffix):
                    name = p.name[: -len(suffix)]
                    break
        if name is not None and is_adapter_name(name):
            found.setdefault(name.lower(), (name, p))
    return dict(found.values())
