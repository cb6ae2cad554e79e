"""Quantize a GGUF with llama.cpp's own quantizer (through llama-cpp-python)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from edgeia3.errors import EdgeIA3Error

# What ``edgeia3 export gguf --quant`` offers; quantize() takes any llama ftype below.
EXPORT_QUANTS = ("q4_0", "q4_1", "q5_k_m", "q4_k_m", "q8_0", "f16")
_FTYPES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_s", "q3_k_m",
           "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")


def ftype_of(quant: str) -> int:
    import llama_cpp

    quant = quant.lower()
    if quant not in _FTYPES:
        raise EdgeIA3Error(f"unknown GGUF quantization '{quant}' (choose from {', '.join(EXPORT_QUANTS)})")
    name = "LLAMA_FTYPE_ALL_F32" if quant == "f32" else f"LLAMA_FTYPE_MOSTLY_{quant.upper()}"
    return getattr(llama_cpp, name)


def quantize(src: str | Path, dst: str | Path, quant: str, threads: int | None = None,
             pure: bool = False) -> Path:
    """llama_model_quantize(src -> dst) with llama.cpp's default mix for ``quant``
    (``pure``: every tensor, embedding and output included, in ``quant``)."""
    import llama_cpp

    from .ggml_index import quiet_llama_logs

    quiet_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(quant)
    params.nthread = threads or os.cpu_count() or 1
    params.pure = pure
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise EdgeIA3Error(f"llama.cpp could not quantize {src} to {quant} (code {rc})")
    return Path(dst)
