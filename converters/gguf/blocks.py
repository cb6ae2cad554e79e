"""Where each GGML type keeps the per-block scale fields, and row scaling through them.

A weight's row (output channel, ne[1] index) is a run of quant blocks along
the input dimension. Every supported type dequantizes a block as
``d * f(q) [- or +] m * g(q)`` with fp16 ``d`` (and ``m``/``dmin``), so
multiplying those fields by l multiplies the whole dequantized row by l,
exactly up to the fp16 rounding of the new scales. Float types are scaled
value by value. Offsets follow ggml-common.h (block_q4_0 ... block_q6_K) and live in
the block-type table (``quant_types``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from edgeia3.errors import EdgeIA3Error

from .ggml_index import TensorInfo
from .quant_types import BLOCK_TYPES, FLOAT_TYPES, QUANT_TYPES, names

# type -> byte offsets of the fp16 scale fields inside one block (the block-type table's)
SCALE_FIELDS: dict[T, tuple[int, ...]] = {t: BLOCK_TYPES[t].scale_fields for t in QUANT_TYPES}
SUPPORTED = QUANT_TYPES + FLOAT_TYPES


@dataclass
class RowFields:
    """Writable view of a tensor's scale fields, leading axis = rows.

    ``view`` is [rows, n] (float types) or [rows, blocks, fields] (quant
    types) in its storage dtype: float16, float32, or uint16 for bf16.
    """

    view: np.ndarray
    bf16: bool = False

    def decode(self, stored: np.ndarray) -> np.ndarray:
        if self.bf16:
            return (stored.astype(np.uint32) << 16).view(np.float32)
        return stored.astype(np.float32)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """float32 -> the storage dtype (round to nearest even, like ggml)."""
        if self.bf16:
            u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
            return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return values.astype(self.view.dtype)

    def scaled(self, pristine: np.ndarray, l: np.ndarray) -> np.ndarray:
        """Stored ``pristine`` fields times per-row ``l``, in storage dtype (refuses overflow)."""
        shape = (-1,) + (1,) * (pristine.ndim - 1)
        out = self.encode(self.decode(pristine) * np.asarray(l, np.float32).reshape(shape))
        if not np.all(np.isfinite(self.decode(out))):
            raise EdgeIA3Error("an IA3 value overflows the tensor's fp16/bf16 scale range; refusing")
        return out


def row_fields(buf: np.ndarray, info: TensorInfo, rows: slice = slice(None)) -> RowFields:
    """Scale fields of ``rows`` of tensor ``info`` inside ``buf`` (uint8 view of the file)."""
    qt = T(info.type)
    if qt not in SUPPORTED:
        raise EdgeIA3Error(
            f"tensor {info.name} is {qt.name}: exact row scaling is supported for "
            f"{names(SUPPORTED)} only"
        )
    raw = buf[info.offset: info.offset + info.nbytes]
    n_rows, row_len = info.rows, info.ne[0]
    if len(info.ne) == 1:  # a bias: every element is its own row
        n_rows, row_len = info.ne[0], 1
    bt = BLOCK_TYPES[qt]
    if bt.is_float:
        return RowFields(raw.view(bt.storage).reshape(n_rows, row_len)[rows], bf16=qt is T.BF16)
    block, size = bt.block_values, bt.block_bytes
    if row_len % block:
        raise EdgeIA3Error(f"tensor {info.name}: row length {row_len} is not a multiple of {qt.name} blocks")
    blocks = raw.reshape(n_rows, row_len // block, size)[rows]
    offs = bt.scale_fields  # one field, or two adjacent ones (d, m / d, dmin)
    assert len(offs) == 1 or offs[1] == offs[0] + 2
    return RowFields(blocks[:, :, offs[0]: offs[0] + 2 * len(offs)].view(np.float16))
