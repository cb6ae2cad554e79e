"""GGML quant blocks as integer codes, per-sub-block scales and offsets.

Every block type llama.cpp dequantizes as ``scale * (q - zero) [+ offset]``
per sub-block of 16 or 32 values: ``q`` are unsigned integer codes, ``zero`` a
constant per type, ``offset`` a per-sub-block float (the "minimum" of Q4_1,
Q5_1 and the K-quants with ``dmin``). This one form feeds both the torch
weights that training runs on (``torch_weights``) and the ONNX MatMulNBits
transcoder, so the model trained is the model deployed.

Each type's block decoder, code width, zero point and sub-block size are its entry in
``quant_types`` (the one block-type table); the decoders do the arithmetic in the same
order as ggml's dequantize_row_* so the values equal gguf-py's ``quants.dequantize``
bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from edgeia3.errors import EdgeIA3Error

from .quant_types import BLOCK_TYPES, FLOAT_TYPES, QUANT_TYPES as SUPPORTED, names

__all__ = ["FLOAT_TYPES", "SUPPORTED", "Decomposed", "decompose", "float_values"]


@dataclass
class Decomposed:
    """A [rows, cols] weight as ``scale * (q - zero) + offset`` per sub-block of ``block`` values."""

    qtype: T
    q: np.ndarray  # uint8 [rows, cols] codes in [0, 2**bits)
    scale: np.ndarray  # float32 [rows, cols // block]
    offset: np.ndarray | None  # float32 [rows, cols // block], or None (no per-block minimum)
    zero: int
    bits: int
    block: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        rows, cols = self.q.shape
        codes = (self.q.astype(np.int16) - self.zero).astype(np.float32).reshape(rows, -1, self.block)
        w = codes * self.scale[:, :, None]
        if self.offset is not None:
            w = w + self.offset[:, :, None]
        return w.reshape(rows, cols)

    def take_rows(self, index: np.ndarray) -> "Decomposed":
        off = None if self.offset is None else self.offset[index]
        return Decomposed(self.qtype, self.q[index], self.scale[index], off, self.zero, self.bits, self.block)

    def scale_rows(self, values: np.ndarray) -> "Decomposed":
        """Output row n times values[n]: scales (and offsets) only, codes untouched."""
        v = np.asarray(values, np.float32)[:, None]
        off = None if self.offset is None else (self.offset * v).astype(np.float32)
        return Decomposed(self.qtype, self.q, (self.scale * v).astype(np.float32), off, self.zero,
                          self.bits, self.block)


def decompose(raw: np.ndarray, qtype: int | T, cols: int) -> Decomposed:
    """Decompose the bytes of a quantized [rows, cols] tensor (row-major, ggml layout)."""
    qt = T(qtype)
    if qt not in SUPPORTED:
        raise EdgeIA3Error(f"GGML type {qt.name} cannot be decomposed into blocks "
                           f"(supported: {names(SUPPORTED)})")
    bt = BLOCK_TYPES[qt]
    block_values, block_bytes = bt.block_values, bt.block_bytes
    if cols % block_values:
        raise EdgeIA3Error(f"row length {cols} is not a multiple of {qt.name}'s {block_values}-value blocks")
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, block_bytes)
    rows = raw.shape[0] * block_values // cols
    q, scale, offset = bt.decode(raw)
    per_row = cols // bt.sub_block
    return Decomposed(qt, q.reshape(rows, cols).astype(np.uint8),
                      scale.reshape(rows, per_row).astype(np.float32),
                      None if offset is None else offset.reshape(rows, per_row).astype(np.float32),
                      bt.zero, bt.bits, bt.sub_block)


def float_values(raw: np.ndarray, qtype: int | T, cols: int) -> np.ndarray:
    """F32/F16/BF16 tensor bytes as float32 [rows, cols]."""
    qt = T(qtype)
    if qt not in FLOAT_TYPES:
        raise EdgeIA3Error(f"GGML type {qt.name} is not a float type")
    stored = np.ascontiguousarray(raw, dtype=np.uint8).view(BLOCK_TYPES[qt].storage)
    if qt is T.BF16:  # the high 16 bits of a float32
        return (stored.astype(np.uint32) << 16).view(np.float32).reshape(-1, cols)
    return stored.astype(np.float32, copy=False).reshape(-1, cols)
