"""Property-based fuzzing of the adapter readers (canonical file, PEFT dir, .ia3.gguf,
.onnx_adapter); export manifests and JSONL data: test_fuzz_inputs.py; the shared machinery:
fuzzing.py.

Each reader gets a VALID file made by edgeia3's own writers on a tiny random
model; hypothesis then corrupts it (truncation, bit flips, byte overwrites,
wrong tensor dtypes/shapes/names, wrong JSON values and types, non-UTF-8
bytes). The property, for every input:

- the reader returns a well-formed result, or raises exactly ``EdgeIA3Error``
  whose message is one non-empty line naming the user's file - never another
  exception type, a crash or a hang;
- it writes nothing: the folder it read from is byte-for-byte unchanged.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from edgeia3.adapter import CANONICAL_FILE
from edgeia3.formats import load_adapter
from fuzzing import (FEW, FUZZ, _reshape, corrupted, fresh_dir, json_file_mutated, json_values,
                     loads_or_refuses, read_safetensors, safetensors_header_len, safetensors_rewritten,
                     same_vectors, well_formed)


# -- the valid files read back (the starting point of every fuzz run) ----------------------------

def test_valid_files_read_back(valid):
    from edgeia3.converters.gguf.adapter_file import read_ia3_gguf
    from edgeia3.export import read_export

    ad = valid["adapter"]
    assert same_vectors(load_adapter(valid["canonical"]), ad)
    assert same_vectors(load_adapter(valid["peft"], base_config=valid["base"].config), ad)
    for kind in ("onnx", "gguf"):
        info = read_export(valid[kind])
        assert info.kind == kind and list(info.adapter_files) == ["a"]
        back = info.adapters()["a"]
        assert sorted((v.layer, v.site) for v in back.vectors) == sorted((v.layer, v.site) for v in ad.vectors)
        for v in back.vectors:
            np.testing.assert_allclose(v.values, ad.get(v.layer, v.site).values, rtol=1e-6)
    assert same_vectors(read_ia3_gguf(valid["gguf"] / "adapters" / "a.ia3.gguf"), info.adapters()["a"])


# -- canonical adapter file -----------------------------------------------------------------

def _check_canonical(valid, data: bytes):
    d = fresh_dir(valid["work"])
    path = d / CANONICAL_FILE
    path.write_bytes(data)
    ad = loads_or_refuses(lambda: load_adapter(path), d, path)
    if ad is not None:
        well_formed(ad)
    shutil.rmtree(d)
    return ad


@FUZZ
@given(data=st.data())
def test_fuzz_canonical_bytes(valid, data):
    raw = valid["canonical"].read_bytes()
    _check_canonical(valid, data.draw(corrupted(raw, hot=safetensors_header_len(raw))))


@FEW
@given(data=st.data())
def test_fuzz_canonical_tensors_and_metadata(valid, data):
    tensors, meta = read_safetensors(valid["canonical"])
    _check_canonical(valid, data.draw(safetensors_rewritten(tensors, meta)))


# -- PEFT IA3 directory ---------------------------------------------------------------------

def _check_peft(valid, config: bytes | None = None, weights: bytes | None = None):
    d = fresh_dir(valid["work"])
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(valid["peft"] / name, d / name)
    if config is not None:
        (d / "adapter_config.json").write_bytes(config)
    if weights is not None:
        (d / "adapter_model.safetensors").write_bytes(weights)
    ad = loads_or_refuses(lambda: load_adapter(d, base_config=valid["base"].config), d, d)
    if ad is not None:
        well_formed(ad)
    shutil.rmtree(d)
    return ad


@FUZZ
@given(data=st.data())
def test_fuzz_peft_config_json(valid, data):
    doc = json.loads((valid["peft"] / "adapter_config.json").read_text())
    _check_peft(valid, config=data.draw(json_file_mutated(doc)))


@FEW
@given(data=st.data())
def test_fuzz_peft_weights_bytes(valid, data):
    raw = (valid["peft"] / "adapter_model.safetensors").read_bytes()
    _check_peft(valid, weights=data.draw(corrupted(raw, hot=safetensors_header_len(raw))))


@FEW
@given(data=st.data())
def test_fuzz_peft_weights_dtype_shape_names(valid, data):
    tensors, meta = read_safetensors(valid["peft"] / "adapter_model.safetensors")
    _check_peft(valid, weights=data.draw(safetensors_rewritten(tensors, meta)))


# -- .ia3.gguf --------------------------------------------------------------------------------

def _check_gguf(valid, data: bytes):
    from edgeia3.converters.gguf.adapter_file import read_ia3_gguf

    d = fresh_dir(valid["work"])
    path = d / "a.ia3.gguf"
    path.write_bytes(data)
    ad = loads_or_refuses(lambda: read_ia3_gguf(path), d, path)
    if ad is not None:
        well_formed(ad)
    shutil.rmtree(d)
    return ad


def _gguf_fields(path: Path):
    """(key, value, type, sub_type) of every KV field and (name, array) of every tensor."""
    import gguf

    r = gguf.GGUFReader(str(path))
    kv = []
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        kv.append((f.name, f.contents(), vtype, sub))
    return r.data_offset, kv, [(t.name, np.array(t.data)) for t in r.tensors]


@st.composite
def gguf_rewritten(draw, path: Path, arch: str) -> bytes:
    """The adapter GGUF rewritten with KV values of other types/values, missing keys, and
    tensors of other dtypes/shapes/names."""
    import gguf

    _, kv, tensors = _gguf_fields(path)
    kv = list(kv)
    tensors = list(tensors)
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["kv", "kv", "drop_kv", "dtype", "shape", "rename", "drop_tensor"]))
        if what in ("kv", "drop_kv"):
            i = draw(st.integers(0, len(kv) - 1))
            if what == "drop_kv":
                kv.pop(i)
                continue
            key = kv[i][0]
            value = draw(st.one_of(
                st.integers(0, 2**32 - 1).map(lambda v: (v, gguf.GGUFValueType.UINT32, None)),
                st.integers(-2**31, 2**31 - 1).map(lambda v: (v, gguf.GGUFValueType.INT32, None)),
                st.floats(width=32).map(lambda v: (v, gguf.GGUFValueType.FLOAT32, None)),
                st.booleans().map(lambda v: (v, gguf.GGUFValueType.BOOL, None)),
                st.text(max_size=20).map(lambda v: (v, gguf.GGUFValueType.STRING, None)),
                json_values.map(lambda v: (json.dumps(v), gguf.GGUFValueType.STRING, None)),
                st.lists(st.text(max_size=6), max_size=4).map(
                    lambda v: (v, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)),
                st.lists(st.integers(0, 200), max_size=4).map(
                    lambda v: (v, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)),
            ))
            kv[i] = (key, *value)
        elif not tensors:
            break
        else:
            i = draw(st.integers(0, len(tensors) - 1))
            name, arr = tensors[i]
            if what == "dtype":
                tensors[i] = (name, arr.astype(draw(st.sampled_from([np.float16, np.float64, np.int8, np.int32]))))
            elif what == "shape":
                tensors[i] = (name, np.ascontiguousarray(_reshape(arr, draw(st.sampled_from(
                    ["2d-row", "half", "double", "empty", "3d"])))))
            elif what == "rename":
                tensors[i] = (draw(st.sampled_from([name + ".x", name.replace("0", "7"), "blk.0.attn_q.ia3_out",
                                                    "blk.99.attn_k.ia3_out", "x"])), arr)
            else:
                tensors.pop(i)
    names = [n for n, _ in tensors]
    assume(len(set(names)) == len(names) and all(a.size for _, a in tensors))
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/x.gguf"
        w = gguf.GGUFWriter(out, arch)
        try:
            for key, value, vtype, sub in kv:
                if key == "general.architecture":
                    continue
                w.add_key_value(key, value, vtype, sub)
            for name, arr in tensors:
                w.add_tensor(name, np.ascontiguousarray(arr))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        except (ValueError, TypeError, UnicodeEncodeError, struct.error):
            assume(False)  # a file gguf's own writer cannot write
        return Path(out).read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzz_ia3_gguf_bytes(valid, data):
    from edgeia3.converters.gguf.adapter_file import read_ia3_gguf  # noqa: F401

    path = valid["gguf"] / "adapters" / "a.ia3.gguf"
    offset, _, _ = _gguf_fields(path)
    _check_gguf(valid, data.draw(corrupted(path.read_bytes(), hot=offset)))


@FEW
@given(data=st.data())
def test_fuzz_ia3_gguf_metadata_and_tensors(valid, data):
    _check_gguf(valid, data.draw(gguf_rewritten(valid["gguf"] / "adapters" / "a.ia3.gguf", "llama")))


# -- .onnx_adapter ----------------------------------------------------------------------------

def _check_onnx_adapter(valid, data: bytes):
    from edgeia3.converters.onnx.adapter_file import read_onnx_adapter
    from edgeia3.converters.onnx.graph import plans_of
    from edgeia3.manifest import read_manifest

    m = read_manifest(valid["onnx"])
    d = fresh_dir(valid["work"])
    path = d / "a.onnx_adapter"
    path.write_bytes(data)
    # as edgeia3.export._onnx_adapters calls it
    ad = loads_or_refuses(lambda: read_onnx_adapter(path, plans_of(m), m.family, m.adapters["a"].sites),
                          d, path)
    if ad is not None:
        well_formed(ad)
        assert {v.site for v in ad.vectors} <= set(m.adapters["a"].sites)
    shutil.rmtree(d)
    return ad


@st.composite
def onnx_adapter_rewritten(draw, path: Path) -> bytes:
    import onnxruntime as ort

    from edgeia3.converters.onnx.adapter_file import read_onnx_adapter_tensors

    tensors = read_onnx_adapter_tensors(path)
    for _ in range(draw(st.integers(1, 3))):
        if not tensors:
            break
        key = draw(st.sampled_from(sorted(tensors)))
        what = draw(st.sampled_from(["dtype", "shape", "rename", "drop", "values"]))
        if what == "dtype":
            tensors[key] = tensors[key].astype(draw(st.sampled_from(
                [np.float16, np.float64, np.int8, np.int32, np.int64, np.uint8, np.bool_])))
        elif what == "shape":
            tensors[key] = np.ascontiguousarray(_reshape(tensors[key], draw(st.sampled_from(
                ["2d-row", "flat", "scalar", "empty", "half", "double"]))))
        elif what == "rename":
            tensors[draw(st.sampled_from([key + "x", key.replace("0", "1"), "", "ia3.layers.9.qkv"]))] = \
                tensors.pop(key)
        elif what == "drop":
            del tensors[key]
        else:
            arr = tensors[key].reshape(-1)
            if arr.size and arr.dtype.kind == "f":
                arr[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0]))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(draw(st.integers(0, 3)))
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fmt.export_adapter(f"{tmp}/x.onnx_adapter")
        except Exception:  # onnxruntime refuses to write it
            assume(False)
        return Path(f"{tmp}/x.onnx_adapter").read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzz_onnx_adapter_bytes(valid, data):
    raw = (valid["onnx"] / "adapters" / "a.onnx_adapter").read_bytes()
    _check_onnx_adapter(valid, data.draw(corrupted(raw, hot=len(raw))))


@FEW
@given(data=st.data())
def test_fuzz_onnx_adapter_dtype_shape_names(valid, data):
    _check_onnx_adapter(valid, data.draw(onnx_adapter_rewritten(valid["onnx"] / "adapters" / "a.onnx_adapter")))


