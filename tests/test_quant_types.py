"""The block-type and file-type tables agree with gguf-py / llama.cpp and with every reader.

A new GGML block type or llama.cpp file type is one table entry; these checks (and
``test_gguf_native``'s bit-for-bit decoding, parametrized over the same table) are its tests.
"""

from __future__ import annotations


import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, quants

from edgeia3.converters.gguf import blocks, decompose as dec
from edgeia3.converters.gguf.file_types import (EXPORT_QUANTS, FILE_TYPES, TRAIN_QUANTS, WRITER_TYPES, choices,
                                                file_type, file_type_names)
from edgeia3.converters.gguf.ggml_index import TensorInfo
from edgeia3.converters.gguf.quant_types import BLOCK_TYPES, FLOAT_TYPES, QUANT_TYPES
from edgeia3.errors import EdgeIA3Error

QUANT = [BLOCK_TYPES[t] for t in QUANT_TYPES]


def _random_blocks(bt, n: int = 6, seed: int = 0) -> np.ndarray:
    """``n`` random blocks with sane fp16 scale fields."""
    rng = np.random.default_rng(seed + int(bt.qtype))
    raw = rng.integers(0, 256, size=(n, bt.block_bytes), dtype=np.uint8)
    for off in bt.scale_fields:
        raw[:, off:off + 2] = (0.05 * rng.standard_normal((n, 1))).astype(np.float16).view(np.uint8)
    return raw


def test_table_types_are_gguf_py_types():
    assert set(BLOCK_TYPES) <= set(GGML_QUANT_SIZES)
    assert QUANT_TYPES + FLOAT_TYPES == tuple(BLOCK_TYPES)
    assert set(FLOAT_TYPES) == {T.F32, T.F16, T.BF16}


@pytest.mark.parametrize("bt", QUANT, ids=lambda b: b.name)
def test_decoder_shapes_agree_with_the_entry(bt):
    """Codes fill a gguf-py block, one scale (and offset, iff the type has a minimum) per sub-block."""
    q, scale, offset = bt.decode(_random_blocks(bt))
    assert q.shape == (6, bt.block_values) and q.max() < 2 ** bt.bits
    assert bt.block_values % bt.sub_block == 0
    assert scale.shape == (6, bt.block_values // bt.sub_block)
    assert (offset is not None) == bt.has_minimum
    if offset is not None:
        assert offset.shape == scale.shape


@pytest.mark.parametrize("bt", QUANT, ids=lambda b: b.name)
def test_scale_fields_scale_the_block(bt):
    """gguf-py as the oracle: doubling the entry's fp16 fields doubles the dequantized block, zeroing them
    zeroes it - the exact row scaling of blocks.py and merge."""
    raw = _random_blocks(bt)
    assert all(0 <= off and off + 2 <= bt.block_bytes for off in bt.scale_fields)
    want = quants.dequantize(raw, bt.qtype)
    doubled, zeroed = raw.copy(), raw.copy()
    for off in bt.scale_fields:
        field = np.ascontiguousarray(raw[:, off:off + 2]).view(np.float16)
        doubled[:, off:off + 2] = (field * 2).astype(np.float16).view(np.uint8)
        zeroed[:, off:off + 2] = 0
    assert np.array_equal(quants.dequantize(doubled, bt.qtype), want * 2)
    assert not np.any(quants.dequantize(zeroed, bt.qtype))


@pytest.mark.parametrize("bt", QUANT, ids=lambda b: b.name)
def test_transcode_route_fits_matmul_nbits(bt):
    """Every code of the type fits the entry's MatMulNBits width (shifted by the zero point where
    there is no minimum)."""
    from edgeia3.converters.onnx.transcode import to_nbits

    raw = _random_blocks(bt, n=4)
    raw = np.concatenate([raw] * 2)  # [8 rows, 1 block]
    d = dec.decompose(raw, bt.qtype, bt.block_values)
    nb = to_nbits(d)
    assert nb.bits == bt.onnx_bits and (nb.minimum is not None) == bt.has_minimum
    codes = np.arange(2 ** bt.bits) - (0 if bt.has_minimum else bt.zero - (1 << (bt.onnx_bits - 1)))
    assert codes.min() >= 0 and codes.max() < 2 ** bt.onnx_bits


@pytest.mark.parametrize("t", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_storage_is_the_gguf_element(t):
    bt = BLOCK_TYPES[t]
    assert bt.block_values == 1 and np.dtype(bt.storage).itemsize == bt.block_bytes
    assert bt.decode is None and bt.scale_fields == () and not bt.has_minimum


@pytest.mark.parametrize("t", list(T), ids=lambda t: t.name)
def test_every_reader_takes_exactly_the_table(t):
    """blocks.row_fields and decompose accept a type iff it has an entry."""
    values, size = GGML_QUANT_SIZES[t]
    buf = np.zeros(2 * 2 * size, np.uint8)
    info = TensorInfo("w", int(t), (2 * values, 2), 0, buf.size)
    if t in BLOCK_TYPES:
        assert blocks.row_fields(buf, info).view.shape[0] == 2
    else:
        with pytest.raises(EdgeIA3Error, match="exact row scaling is supported for"):
            blocks.row_fields(buf, info)
    if t in QUANT_TYPES:
        assert dec.decompose(buf, t, 2 * values).shape == (2, 2 * values)
    elif t in FLOAT_TYPES:
        assert dec.float_values(buf, t, 2 * values).shape == (2, 2 * values)
    else:
        with pytest.raises(EdgeIA3Error, match="cannot be decomposed"):
            dec.decompose(buf, t, 2 * values)


def test_readers_publish_the_table():
    assert blocks.SUPPORTED == tuple(BLOCK_TYPES) and dec.SUPPORTED == QUANT_TYPES
    assert blocks.SCALE_FIELDS == {t: BLOCK_TYPES[t].scale_fields for t in QUANT_TYPES}


# -- file types -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FILE_TYPES))
def test_file_type_names_round_trip(name):
    """CLI name -> gguf-py's LlamaFileType -> the name GGUFIndex.file_type reports."""
    entry = file_type(name)
    assert entry.name == name and file_type(name.upper()) is entry
    ft = entry.ftype
    assert isinstance(ft, gguf.LlamaFileType)
    reported = gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").lower()
    assert reported == ("all_f32" if name == "f32" else name)


@pytest.mark.parametrize("name", list(FILE_TYPES))
def test_file_type_numbers_are_llama_cpps(name):
    import llama_cpp

    from edgeia3.converters.gguf.quantize import ftype_of

    const = "LLAMA_FTYPE_ALL_F32" if name == "f32" else f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
    assert ftype_of(name) == getattr(llama_cpp, const)


def test_file_type_lists():
    """The lists each caller reads are the table's (training keeps its order: error messages use it)."""
    from edgeia3.base import LLAMA_QUANTS, QUANTS
    from edgeia3.converters.gguf.hf_writer import DTYPES

    assert TRAIN_QUANTS == ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k")
    assert LLAMA_QUANTS == TRAIN_QUANTS and set(TRAIN_QUANTS) <= set(QUANTS)
    assert set(EXPORT_QUANTS) == {"q4_0", "q4_1", "q5_k_m", "q4_k_m", "q8_0", "f16"}
    assert DTYPES == WRITER_TYPES == ("f32", "f16")
    assert file_type_names("pure") == ("q4_0", "q8_0")
    assert len(file_type_names()) == len(FILE_TYPES)
    assert choices(("a",)) == "a" and choices(("a", "b", "c")) == "a, b or c"


def test_unknown_file_type_refused():
    with pytest.raises(EdgeIA3Error, match=r"unknown GGUF quantization 'q3_x' \(choose from q4_0, "):
        file_type("Q3_X")


def test_cli_help_lists_the_export_types():
    from typer.testing import CliRunner

    from edgeia3.cli import app

    res = CliRunner().invoke(app, ["export", "gguf", "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert res.exit_code == 0 and choices(EXPORT_QUANTS) in res.output
