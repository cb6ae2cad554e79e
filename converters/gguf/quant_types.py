"""The one table of GGML tensor types edgeia3 reads, rescales and transcodes exactly.

One ``BlockType`` entry per type holds everything the converters need to know about it:
where a block keeps its fp16 scale fields (``blocks``: exact row scaling), how a block
decodes into codes, scales and offsets (``decompose``: training and the ONNX transcoder),
the code width, zero point and sub-block size, whether there is a per-block minimum, and
the MatMulNBits width the ONNX transcoder puts it in. Block sizes come from gguf-py's
``GGML_QUANT_SIZES``. Adding a type is one decoder and one entry here, plus its test
(``tests/test_quant_types.py`` and ``test_gguf_native.py`` pick it up from the table).

The field layouts follow ggml-common.h / ggml-quants.c (block_q4_0 ... block_q6_K);
the decoders do the arithmetic in ggml's own order, so ``decompose`` equals gguf-py's
``quants.dequantize`` bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from edgeia3.errors import EdgeIA3Error

# block bytes [nb, bytes] -> codes [nb, values], scales [nb, subs], offsets [nb, subs] or None
Decoded = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]
Decoder = Callable[[np.ndarray], Decoded]


@dataclass(frozen=True)
class BlockType:
    """One GGML tensor type: a quant block ``scale * (q - zero) [+ offset]`` per sub-block, or floats."""

    qtype: T
    scale_fields: tuple[int, ...] = ()  # byte offsets in a block of its fp16 d (, then m / dmin: the minimum)
    decode: Decoder | None = None  # quant types: a block's codes, scales and offsets
    bits: int = 0  # code width: codes are in [0, 2**bits)
    zero: int = 0  # the code zero point
    sub_block: int = 0  # values per scale (and offset)
    storage: type | None = None  # float types: the element as stored (bf16 as its uint16 bits)

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def is_float(self) -> bool:
        return self.storage is not None

    @property
    def block_values(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def block_bytes(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def has_minimum(self) -> bool:
        """A per-sub-block additive term (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K): the second scale field."""
        return len(self.scale_fields) == 2

    @property
    def onnx_bits(self) -> int:
        """The ONNX transcode route: MatMulNBits of this width (a minimum adds the block-sum
        MatMul term); float types become plain MatMuls."""
        return 4 if self.bits <= 4 else 8


# -- block decoders (ggml's dequantize_row_* in the same arithmetic order) ------------------------


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


def _q4_0(b: np.ndarray) -> Decoded:  # d, qs[16]
    return _nibbles(b[:, 2:18]), _f16(b, 0), None


def _q4_1(b: np.ndarray) -> Decoded:  # d, m, qs[16]
    return _nibbles(b[:, 4:20]), _f16(b, 0), _f16(b, 2)


def _q5_0(b: np.ndarray) -> Decoded:  # d, qh[4], qs[16]
    return _nibbles(b[:, 6:22]) | (_bits_of(b[:, 2:6], 32) << 4), _f16(b, 0), None


def _q5_1(b: np.ndarray) -> Decoded:  # d, m, qh[4], qs[16]
    return _nibbles(b[:, 8:24]) | (_bits_of(b[:, 4:8], 32) << 4), _f16(b, 0), _f16(b, 2)


def _q8_0(b: np.ndarray) -> Decoded:  # d, qs[32]
    return (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), _f16(b, 0), None


def _q2_k(b: np.ndarray) -> Decoded:  # scales[16], qs[64], d, dmin
    nb = b.shape[0]
    sc, qs, d, dmin = b[:, 0:16], b[:, 16:80], _f16(b, 80), _f16(b, 82)
    # y = half*128 + j*32 + l (l < 32): bits 2j of qs[half*32 + l]
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    q = (qs.reshape(nb, 2, 1, 32) >> shifts) & 3
    return q.reshape(nb, 256), d * (sc & 0x0F).astype(np.float32), -(dmin * (sc >> 4).astype(np.float32))


def _q3_k(b: np.ndarray) -> Decoded:  # hmask[32], qs[64], scales[12], d
    nb = b.shape[0]
    hm, qs, d = b[:, 0:32], b[:, 32:96], _f16(b, 108)
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    low = (qs.reshape(nb, 2, 1, 32) >> shifts) & 3  # [nb, half, j, l]
    hbit = (hm[:, None, None, :] >> np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)) & 1
    q = (low | (hbit << 2)).reshape(nb, 256)
    return q, d * _q3k_scales(b[:, 96:108]).astype(np.float32), None


def _q45_k(b: np.ndarray, five: bool) -> Decoded:
    nb = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    s, m = _scale_min_k4(b[:, 4:16])
    qs = b[:, 48:176] if five else b[:, 16:144]
    # chunk c of 64 values: 32 low nibbles of qs[c*32:(c+1)*32], then their high nibbles
    q = np.stack([qs.reshape(nb, 4, 32) & 0x0F, qs.reshape(nb, 4, 32) >> 4], axis=2)
    if five:
        qh = b[:, 16:48]
        hb = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [nb, 8, 32]
        q = q | (hb.reshape(nb, 4, 2, 32) << 4)
    return q.reshape(nb, 256), d * s.astype(np.float32), -(dmin * m.astype(np.float32))


def _q4_k(b: np.ndarray) -> Decoded:  # d, dmin, scales[12], qs[128]
    return _q45_k(b, five=False)


def _q5_k(b: np.ndarray) -> Decoded:  # d, dmin, scales[12], qh[32], qs[128]
    return _q45_k(b, five=True)


def _q6_k(b: np.ndarray) -> Decoded:  # ql[128], qh[64], scales[16], d
    nb = b.shape[0]
    ql, qh, sc, d = b[:, 0:128], b[:, 128:192], b[:, 192:208].view(np.int8), _f16(b, 208)
    ql = ql.reshape(nb, 2, 2, 32)  # [half, ql half (l or l+32), l]
    qh = qh.reshape(nb, 2, 1, 32)
    low = np.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    return (low | (high << 4)).reshape(nb, 256), d * sc.astype(np.float32), None


# -- the table ---------------------------------------------------------------------------------

_ENTRIES = (
    BlockType(T.Q4_0, (0,), _q4_0, bits=4, zero=8, sub_block=32),
    BlockType(T.Q4_1, (0, 2), _q4_1, bits=4, zero=0, sub_block=32),
    BlockType(T.Q5_0, (0,), _q5_0, bits=5, zero=16, sub_block=32),
    BlockType(T.Q5_1, (0, 2), _q5_1, bits=5, zero=0, sub_block=32),
    BlockType(T.Q8_0, (0,), _q8_0, bits=8, zero=128, sub_block=32),
    BlockType(T.Q2_K, (80, 82), _q2_k, bits=2, zero=0, sub_block=16),
    BlockType(T.Q3_K, (108,), _q3_k, bits=3, zero=4, sub_block=16),
    BlockType(T.Q4_K, (0, 2), _q4_k, bits=4, zero=0, sub_block=32),
    BlockType(T.Q5_K, (0, 2), _q5_k, bits=5, zero=0, sub_block=32),
    BlockType(T.Q6_K, (208,), _q6_k, bits=6, zero=32, sub_block=16),
    BlockType(T.F32, storage=np.float32),
    BlockType(T.F16, storage=np.float16),
    BlockType(T.BF16, storage=np.uint16),
)
BLOCK_TYPES: dict[T, BlockType] = {e.qtype: e for e in _ENTRIES}
QUANT_TYPES: tuple[T, ...] = tuple(t for t, e in BLOCK_TYPES.items() if not e.is_float)
FLOAT_TYPES: tuple[T, ...] = tuple(t for t, e in BLOCK_TYPES.items() if e.is_float)


def names(types: tuple[T, ...] = tuple(BLOCK_TYPES)) -> str:
    """'Q4_0, Q4_1, ...': for messages."""
    return ", ".join(t.name for t in types)


def block_type(qtype: int | T) -> BlockType:
    """The table entry of ``qtype`` (refuses a type edgeia3 cannot read exactly)."""
    qt = T(qtype)
    if qt not in BLOCK_TYPES:
        raise EdgeIA3Error(f"GGML type {qt.name} is not supported (supported: {names()})")
    return BLOCK_TYPES[qt]
