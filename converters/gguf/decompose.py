"""GGML quant blocks as integer codes, per-sub-block scales and offsets.

Every block type llama.cpp dequantizes as ``scale * (q - zero) [+ offset]``
per sub-block of 16 or 32 values: ``q`` are unsigned integer codes, ``zero`` a
constant per type, ``offset`` a per-sub-block float (the "minimum" of Q4_1,
Q5_1 and the K-quants with ``dmin``). This one form feeds both the torch
weights that training runs on (``torch_weights``) and the ONNX MatMulNBits
transcoder, so the model trained is the model deployed.

The field layouts follow ggml-common.h / ggml-quants.c (block_q4_0 ... block_q6_K);
the arithmetic is done in the same order as ggml's dequantize_row_* so the
values equal gguf-py's ``quants.dequantize`` bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from edgeia3.errors import EdgeIA3Error

FLOAT_TYPES = (T.F32, T.F16, T.BF16)


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


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """fp16 field at byte ``at`` of every block, as float32 [nblocks, 1]."""
    return np.ascontiguousarray(b[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: low nibbles are values 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits_of(qh: np.ndarray, n: int) -> np.ndarray:
    """The n low bits of each little-endian uint32 in ``qh`` [nb, 4] as [nb, n] 0/1."""
    word = np.ascontiguousarray(qh).view("<u4")
    return ((word >> np.arange(n, dtype=np.uint32)) & 1).astype(np.uint8)


def _scale_min_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs packed in 12 bytes (Q4_K/Q5_K), each [nb, 8]."""
    s = np.empty((sc.shape[0], 8), np.uint8)
    m = np.empty((sc.shape[0], 8), np.uint8)
    s[:, :4] = sc[:, 0:4] & 63
    m[:, :4] = sc[:, 4:8] & 63
    s[:, 4:] = (sc[:, 8:12] & 0x0F) | ((sc[:, 0:4] >> 6) << 4)
    m[:, 4:] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return s, m


def _q3k_scales(sc: np.ndarray) -> np.ndarray:
    """The sixteen 6-bit Q3_K scales packed in 12 bytes, minus 32, as int [nb, 16]."""
    low = np.concatenate([sc[:, 0:8] & 0x0F, sc[:, 0:8] >> 4], axis=1)
    k = np.arange(16)
    high = (sc[:, 8 + k % 4] >> (2 * (k // 4))) & 3
    return (low | (high << 4)).astype(np.int16) - 32


def _blocks(qt: T, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int, int]:
    """Per block: codes [nb, n], scales [nb, n/block], offsets or None, zero, bits, block."""
    nb = b.shape[0]
    if qt is T.Q4_0:
        return _nibbles(b[:, 2:18]), _f16(b, 0), None, 8, 4, 32
    if qt is T.Q4_1:
        return _nibbles(b[:, 4:20]), _f16(b, 0), _f16(b, 2), 0, 4, 32
    if qt is T.Q5_0:
        q = _nibbles(b[:, 6:22]) | (_bits_of(b[:, 2:6], 32) << 4)
        return q, _f16(b, 0), None, 16, 5, 32
    if qt is T.Q5_1:
        q = _nibbles(b[:, 8:24]) | (_bits_of(b[:, 4:8], 32) << 4)
        return q, _f16(b, 0), _f16(b, 2), 0, 5, 32
    if qt is T.Q8_0:
        q = (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q, _f16(b, 0), None, 128, 8, 32
    if qt is T.Q2_K:
        sc, qs, d, dmin = b[:, 0:16], b[:, 16:80], _f16(b, 80), _f16(b, 82)
        # y = half*128 + j*32 + l (l < 32): bits 2j of qs[half*32 + l]
        shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
        q = (qs.reshape(nb, 2, 1, 32) >> shifts) & 3
        return (q.reshape(nb, 256), d * (sc & 0x0F).astype(np.float32),
                -(dmin * (sc >> 4).astype(np.float32)), 0, 2, 16)
    if qt is T.Q3_K:
        hm, qs, d = b[:, 0:32], b[:, 32:96], _f16(b, 108)
        shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
        low = (qs.reshape(nb, 2, 1, 32) >> shifts) & 3  # [nb, half, j, l]
        hbit = (hm[:, None, None, :] >> np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)) & 1
        q = (low | (hbit << 2)).reshape(nb, 256)
        return q, d * _q3k_scales(b[:, 96:108]).astype(np.float32), None, 4, 3, 16
    if qt in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(b, 0), _f16(b, 2)
        s, m = _scale_min_k4(b[:, 4:16])
        qs = b[:, 16:144] if qt is T.Q4_K else b[:, 48:176]
        # chunk c of 64 values: 32 low nibbles of qs[c*32:(c+1)*32], then their high nibbles
        q = np.stack([qs.reshape(nb, 4, 32) & 0x0F, qs.reshape(nb, 4, 32) >> 4], axis=2)
        if qt is T.Q5_K:
            qh = b[:, 16:48]
            hb = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [nb, 8, 32]
            q = q | (hb.reshape(nb, 4, 2, 32) << 4)
        return (q.reshape(nb, 256), d * s.astype(np.float32), -(dmin * m.astype(np.float32)),
                0, 4 if qt is T.Q4_K else 5, 32)
    if qt is T.Q6_K:
        ql, qh, sc, d = b[:, 0:128], b[:, 128:192], b[:, 192:208].view(np.int8), _f16(b, 208)
        ql = ql.reshape(nb, 2, 2, 32)  # [half, ql half (l or l+32), l]
        qh = qh.reshape(nb, 2, 1, 32)
        low = np.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
        q = (low | (high << 4)).reshape(nb, 256)
        return q, d * sc.astype(np.float32), None, 32, 6, 16
    raise EdgeIA3Error(f"GGML type {qt.name} is not supported (supported: {', '.join(t.name for t in SUPPORTED)})")


SUPPORTED = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


def decompose(raw: np.ndarray, qtype: int | T, cols: int) -> Decomposed:
    """Decompose the bytes of a quantized [rows, cols] tensor (row-major, ggml layout)."""
    qt = T(qtype)
    if qt not in SUPPORTED:
        raise EdgeIA3Error(f"GGML type {qt.name} cannot be decomposed into blocks "
                           f"(supported: {', '.join(t.name for t in SUPPORTED)})")
    block_values, block_bytes = GGML_QUANT_SIZES[qt]
    if cols % block_values:
        raise EdgeIA3Error(f"row length {cols} is not a multiple of {qt.name}'s {block_values}-value blocks")
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, block_bytes)
    rows = raw.shape[0] * block_values // cols
    q, scale, offset, zero, bits, sub = _blocks(qt, raw)
    per_row = cols // sub
    return Decomposed(qt, q.reshape(rows, cols).astype(np.uint8),
                      scale.reshape(rows, per_row).astype(np.float32),
                      None if offset is None else offset.reshape(rows, per_row).astype(np.float32),
                      zero, bits, sub)


def float_values(raw: np.ndarray, qtype: int | T, cols: int) -> np.ndarray:
    """F32/F16/BF16 tensor bytes as float32 [rows, cols]."""
    qt = T(qtype)
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if qt is T.F32:
        return raw.view(np.float32).reshape(-1, cols)
    if qt is T.F16:
        return raw.view(np.float16).astype(np.float32).reshape(-1, cols)
    if qt is T.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(-1, cols)
    raise EdgeIA3Error(f"GGML type {qt.name} is not a float type")
