"""Property-based fuzzing of export manifests (edgeia3.json) and JSONL training data, and
the inputs fuzzing once found, each refused with one clear error (the property: fuzzing.py)."""

from __future__ import annotations

import copy
import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

from fuzzing import (FUZZ, Files, corrupted, fresh_dir, json_bytes, json_file_mutated, json_mutated,
                     loads_or_refuses, read_safetensors, well_formed)
from test_fuzz_readers import _check_canonical, _check_gguf, _check_onnx_adapter, _check_peft


# -- export manifest (edgeia3.json) --------------------------------------------------------------

@pytest.fixture(scope="module")
def export_copies(valid):
    """A copy of each export whose manifest the tests overwrite."""
    out = Files(root=valid["root"])
    for kind in ("onnx", "gguf"):
        out[kind] = shutil.copytree(valid[kind], valid["root"] / f"{kind}_copy")
        out[kind + "_manifest"] = json.loads((valid[kind] / "edgeia3.json").read_text())
    return out


def _check_manifest(export_copies, kind: str, data: bytes):
    from edgeia3.export import ExportInfo, read_export

    d = export_copies[kind]
    manifest = d / "edgeia3.json"
    manifest.write_bytes(data)
    info = loads_or_refuses(lambda: read_export(d), d, d)
    if info is None:
        return None
    assert isinstance(info, ExportInfo) and info.kind == kind
    assert isinstance(info.precision, str) and isinstance(info.base_spec, str)
    assert isinstance(info.model_bytes, int) and (info.merged is None or isinstance(info.merged, str))
    assert all(isinstance(n, str) and isinstance(p, Path) for n, p in info.adapter_files.items())
    assert all(isinstance(b, int) for b in info.adapter_bytes.values())
    # the adapters named by a manifest that reads are read too, or refused with one clear error
    ads = loads_or_refuses(info.adapters, d, d)
    if ads is not None:
        for ad in ads.values():
            well_formed(ad)
    return info


@pytest.mark.parametrize("kind", ["onnx", "gguf"])
@FUZZ
@given(data=st.data())
def test_fuzz_export_manifest(export_copies, kind, data):
    _check_manifest(export_copies, kind, data.draw(json_file_mutated(export_copies[kind + "_manifest"])))


# -- JSONL training data --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir("llama", tokenizer=True))
    tok.__class__.__repr__ = lambda self: "<tiny tokenizer>"
    return tok


VALID_ROWS = [
    {"messages": [{"role": "user", "content": "sea"}, {"role": "assistant", "content": "wet"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ice"},
                  {"role": "assistant", "content": "cold"}]},
    {"prompt": "sun is ", "completion": "warm"},
    {"text": "snow is cold"},
]

text_values = st.one_of(st.text(max_size=30), st.just(""), st.just("\ud800"), st.just("\x00"),
                        st.integers(1, 20_000).map(lambda n: "ab " * n))  # huge values


@st.composite
def jsonl_line(draw) -> bytes:
    kind = draw(st.sampled_from(["valid", "valid", "structure", "text", "raw", "deep", "bigint"]))
    if kind == "valid":
        return json.dumps(draw(st.sampled_from(VALID_ROWS))).encode()
    if kind == "structure":
        return json_bytes(draw(json_mutated(draw(st.sampled_from(VALID_ROWS))))).replace(b"\n", b" ")
    if kind == "text":  # the shapes' fields with other strings, incl. empty, huge, lone surrogates
        row = copy.deepcopy(draw(st.sampled_from(VALID_ROWS)))
        if "messages" in row:
            row["messages"][draw(st.integers(0, len(row["messages"]) - 1))]["content"] = draw(text_values)
        else:
            row[draw(st.sampled_from(sorted(row)))] = draw(text_values)
        return json.dumps(row).encode()
    if kind == "deep":
        return b"[" * draw(st.integers(1, 200_000))
    if kind == "bigint":
        return b'{"text": ' + b"7" * draw(st.integers(4000, 6000)) + b"}"
    return draw(st.one_of(st.binary(max_size=40), st.sampled_from(
        [b"\xff\xfe", b'{"text": "\xe9t\xe9"}', b'{"text": "\\ud800"}', b"\x00", b"NaN", b'"text"', b"{}"])))


@st.composite
def jsonl_file(draw) -> bytes:
    if draw(st.integers(0, 4)) == 0:  # a valid file, byte-corrupted
        valid = b"".join(json.dumps(r).encode() + b"\n" for r in VALID_ROWS)
        return draw(corrupted(valid))
    lines = draw(st.lists(jsonl_line(), min_size=0, max_size=5))
    sep = draw(st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n"]))
    return sep.join(lines) + draw(st.sampled_from([b"", sep]))


@FUZZ
@given(data=jsonl_file(), max_length=st.sampled_from([1, 4, 64, 512]))
def test_fuzz_jsonl_training_data(valid, tokenizer, data, max_length):
    _check_jsonl(valid, tokenizer, data, max_length)


def _check_jsonl(valid, tokenizer, data: bytes, max_length: int = 64):
    from edgeia3.data import IGNORE, Example, load_examples, read_jsonl

    d = fresh_dir(valid["work"])
    path = d / "train.jsonl"
    path.write_bytes(data)
    rows = loads_or_refuses(lambda: read_jsonl(path), d, path)
    examples = loads_or_refuses(lambda: load_examples(path, tokenizer, max_length), d, path)
    if examples is not None:
        assert rows is not None and len(examples) == len(rows) > 0
        for ex in examples:
            assert isinstance(ex, Example) and 0 < len(ex.input_ids) <= max_length
            assert len(ex.labels) == len(ex.input_ids) and any(lab != IGNORE for lab in ex.labels)
            assert all(isinstance(t, int) for t in ex.input_ids) and isinstance(ex.target, str)
    shutil.rmtree(d)
    return examples


# -- the inputs fuzzing found, pinned (each crashed, hung or misled a reader before its fix) ------

def _gguf_bytes(valid) -> bytes:
    return (valid["gguf"] / "adapters" / "a.ia3.gguf").read_bytes()


def _gguf_array_count_past_the_end(valid) -> bytes:
    """input_fold_rows (INT32 x 2) as UINT8 x 2**63: gguf-py read past the end as empty arrays
    of size 0, looping (and allocating) forever."""
    data = bytearray(_gguf_bytes(valid))
    key = b"adapter.ia3.input_fold_rows"
    at = data.index(key) + len(key)  # then: u32 ARRAY (9), u32 item type, u64 count
    assert struct.unpack_from("<II", data, at) == (9, 5)
    struct.pack_into("<IQ", data, at + 4, 0, 2**63)
    return bytes(data)


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1 and len(old) == len(new)
    return data.replace(old, new)


def _canonical_with(valid, tensor_fn=None, **meta) -> bytes:
    tensors, old = read_safetensors(valid["canonical"])
    if tensor_fn:
        tensor_fn(tensors)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, f"{tmp}/x", metadata={**old, **meta})
        return Path(f"{tmp}/x").read_bytes()


def _nan_at_0(tensors: dict) -> None:
    tensors[sorted(tensors)[0]].reshape(-1)[0] = np.nan


def _peft_config(valid, **changes) -> bytes:
    doc = json.loads((valid["peft"] / "adapter_config.json").read_text())
    return json.dumps({**doc, **changes}).encode()


def _onnx_adapter_with_nan(valid) -> bytes:
    import onnxruntime as ort

    from edgeia3.converters.onnx.adapter_file import read_onnx_adapter_tensors

    tensors = read_onnx_adapter_tensors(valid["onnx"] / "adapters" / "a.onnx_adapter")
    tensors[sorted(tensors)[0]].reshape(-1)[-1] = np.nan
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    with tempfile.TemporaryDirectory() as tmp:
        fmt.export_adapter(f"{tmp}/x")
        return Path(f"{tmp}/x").read_bytes()


def _manifest(export_copies, which: str, **changes) -> bytes:
    return json.dumps({**export_copies[which + "_manifest"], **changes}).encode()


FOUND = {  # name: (reader, input builder), every one of them must be refused with one clear line
    "gguf: array count past the end (hung)": ("gguf", _gguf_array_count_past_the_end),
    "gguf: duplicate key (KeyError)": ("gguf", lambda v: _replace_once(
        _gguf_bytes(v), b"adapter.ia3.extra", b"adapter.ia3.sites")),
    "gguf: non-UTF-8 general.type (UnicodeDecodeError)": ("gguf", lambda v: _replace_once(
        _gguf_bytes(v), b"\x07" + bytes(7) + b"adapter", b"\x07" + bytes(7) + b"\xffdapter")),
    "gguf: a tensor of no site (error without the path)": ("gguf", lambda v: _replace_once(
        _gguf_bytes(v), b"blk.0.attn_k.ia3_out", b"blk.7.attn_k.ia3_out")),
    "canonical: NaN (error without the path)": ("canonical", lambda v: _canonical_with(v, _nan_at_0)),
    "canonical: base a JSON list (TypeError)": ("canonical", lambda v: _canonical_with(v, base='["x"]')),
    "canonical: 2-D int tensor (loaded as a vector)": ("canonical", lambda v: _canonical_with(
        v, lambda t: t.update({k: np.ones((2, 3), np.int32) for k in sorted(t)[:1]}))),
    "peft: non-UTF-8 adapter_config.json (UnicodeDecodeError)": ("peft_config", lambda v: b"\xff{}"),
    "peft: adapter_config.json is null (AttributeError)": ("peft_config", lambda v: b"null"),
    "peft: feedforward_modules [1] (TypeError)": ("peft_config", lambda v: _peft_config(v, feedforward_modules=[1])),
    "peft: feedforward_modules a bad regex (re.error)": ("peft_config", lambda v: _peft_config(
        v, feedforward_modules="(")),
    "onnx_adapter: NaN (loaded silently)": ("onnx_adapter", _onnx_adapter_with_nan),
    "manifest: null (AttributeError)": ("manifest_onnx", lambda e: b"null"),
    "manifest: kind a list (TypeError)": ("manifest_onnx", lambda e: _manifest(e, "onnx", kind=["onnx"])),
    "manifest: ia3_inputs [null] (TypeError)": ("manifest_onnx", lambda e: _manifest(e, "onnx", ia3_inputs=[None])),
    "manifest: unknown family (error without the path)": ("manifest_onnx", lambda e: _manifest(
        e, "onnx", family="mamba")),
    "manifest: base null (TypeError)": ("manifest_onnx", lambda e: _manifest(e, "onnx", base=None)),
    "manifest: non-UTF-8 (UnicodeDecodeError)": ("manifest_gguf", lambda e: b'{"kind": "\xff"}'),
    "manifest: model path with NUL (ValueError)": ("manifest_gguf", lambda e: _manifest(e, "gguf", model="a\x00b")),
    "manifest: model file missing (FileNotFoundError)": ("manifest_gguf", lambda e: _manifest(e, "gguf", model="0")),
    "jsonl: non-UTF-8 (UnicodeDecodeError)": ("jsonl", lambda v: b'{"text": "ok"}\n\xff\n'),
    "jsonl: nesting too deep (RecursionError)": ("jsonl", lambda v: b"[" * 100_000),
    "jsonl: 5000-digit number (ValueError)": ("jsonl", lambda v: b'{"text": ' + b"7" * 5000 + b"}"),
    "jsonl: lone surrogate (tokenizer TypeError)": ("jsonl", lambda v: b'{"text": "\\ud800"}'),
    "jsonl: role a list (TypeError)": ("jsonl", lambda v: json.dumps(
        {"messages": [{"role": ["user"], "content": "x"}, {"role": "assistant", "content": "y"}]}).encode()),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_found_inputs_are_refused(name, valid, export_copies, tokenizer):
    reader, build = FOUND[name]
    if reader.startswith("manifest"):
        kind = reader.split("_")[1]
        result = _check_manifest(export_copies, kind, build(export_copies))
    else:
        data = build(valid)
        result = {"gguf": lambda: _check_gguf(valid, data), "canonical": lambda: _check_canonical(valid, data),
                  "peft_config": lambda: _check_peft(valid, config=data),
                  "onnx_adapter": lambda: _check_onnx_adapter(valid, data),
                  "jsonl": lambda: _check_jsonl(valid, tokenizer, data)}[reader]()
    assert result is None, f"{name}: read instead of refused"
