"""Quantize a GGUF with llama.cpp's own quantizer (through llama-cpp-python)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from edgeia3.errors import EdgeIA3Error

from .file_types import file_type


def ftype_of(quant: str) -> int:
    """llama.cpp's ftype number of file type ``quant`` (any name in the file-type table)."""
    return int(file_type(quant).ftype)


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
