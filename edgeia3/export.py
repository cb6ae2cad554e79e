"""Export step: base (+ adapters) in, a runtime artifact out.

The format-specific work lives in ``converters/`` (ONNX, GGUF); this module is
the stable entry both the CLI and Python users call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def export_onnx(base: str, out: str | Path, precision: str = "int4",
                adapters: dict[str, str] | None = None, merge: str | None = None,
                provider: str = "cpu", mobile: bool = False) -> Any:
    """ONNX export for onnxruntime-genai, adapters as side-tensors or merged."""
    from converters.onnx.export import export

    return export(base=base, out=out, precision=precision, adapters=adapters or {},
                  merge=merge, provider=provider, mobile=mobile)


def export_gguf(base: str, out: str | Path, quant: str = "q4_0",
                adapters: dict[str, str] | None = None, merge: str | None = None) -> Any:
    """GGUF export for llama.cpp, with IA3 adapter GGUFs or one merged in exactly."""
    from converters.gguf.export import export

    return export(base=base, out=out, quant=quant, adapters=adapters or {}, merge=merge)
