"""Property-based fuzzing of every reader of user-supplied files.

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

import dataclasses

import contextlib
import copy
import hashlib
import json
import os
import shutil
import signal
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from safetensors import safe_open
from safetensors.numpy import save_file

from edgeia3.adapter import CANONICAL_FILE, IA3Adapter
from edgeia3.errors import EdgeIA3Error
from tiny_models import random_peft_adapter
from edgeia3.formats import load_adapter

HANG_S = 20  # one read of a few-kB file taking this long is a hang

# EDGEIA3_FUZZ_EXAMPLES=1000 fuzzes deeper (minutes); the default keeps the file under a minute
EXAMPLES = int(os.environ.get("EDGEIA3_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=max(1, EXAMPLES * 2 // 3))


# -- the property ---------------------------------------------------------------------------

class Hang(BaseException):
    """Not an Exception: a reader's broad ``except Exception`` cannot swallow it."""


@contextlib.contextmanager
def no_hang(seconds: int = HANG_S):
    def fire(*_):
        raise Hang(f"reader still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def loads_or_refuses(read, folder: Path, names: str | Path):
    """Run ``read()``; the result, or None when it raised a proper EdgeIA3Error."""
    before = snapshot(folder)
    try:
        with no_hang():
            result = read()
    except EdgeIA3Error as e:
        msg = str(e)
        assert msg.strip() and "\n" not in msg.strip(), f"not one clear line: {msg!r}"
        assert str(names) in msg, f"the error does not name {names}: {msg!r}"
        result = None
    if currently_in_test_context():
        event("refused" if result is None else "read")
    # any other exception type propagates and fails the test, with hypothesis' minimal input
    assert snapshot(folder) == before, "the reader wrote or changed files"
    return result


def fresh_dir(root: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=root))


# -- mutations --------------------------------------------------------------------------------

SPECIAL = [b"\x00" * 8, b"\xff" * 8, b"\x7f" + b"\xff" * 7, b"\xff" * 7 + b"\x7f", b"\x80", b"\xc3\x28",
           b"\xed\xa0\x80", b"\x00\x00\x80\x7f", b"\x00\x00\xc0\x7f", b"{", b"\"", b"\\", b"]", b"}"]


@st.composite
def corrupted(draw, data: bytes, hot: int = 0) -> bytes:
    """``data`` truncated, with bits flipped and bytes overwritten, inserted or deleted.

    Positions are drawn half the time from the first ``hot`` bytes (the header),
    where a corruption changes the structure rather than a tensor value."""
    buf = bytearray(data)

    def pos(extra: int = 0) -> int:
        top = len(buf) - 1 + extra
        hi = min(hot, len(buf)) - 1 + extra if hot else top
        return draw(st.one_of(st.integers(0, max(hi, 0)), st.integers(0, max(top, 0))))

    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete"]))
        if not buf:
            break
        if op == "truncate":
            del buf[draw(st.integers(0, len(buf) - 1)):]
        elif op == "flip":
            for _ in range(draw(st.integers(1, 8))):
                buf[pos()] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.one_of(st.sampled_from(SPECIAL), st.binary(min_size=1, max_size=16)))
            at = pos()
            buf[at:at + len(chunk)] = chunk
        elif op == "insert":
            at = pos(1)
            buf[at:at] = draw(st.one_of(st.sampled_from(SPECIAL), st.binary(min_size=1, max_size=16)))
        else:
            at = pos()
            del buf[at:at + draw(st.integers(1, 16))]
    assume(bytes(buf) != data)
    return bytes(buf)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                         st.sampled_from(["", "llama", "IA3", "ia3", "adapter", "../", "\x00", "\ud800", "0"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=8)


def paths_in(doc, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, doc
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield from paths_in(v, prefix + (k,))


@st.composite
def json_mutated(draw, doc) -> object:
    """``doc`` with values replaced by random JSON (other types), keys deleted or the whole replaced."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in paths_in(doc)]
        where = draw(st.sampled_from(paths))
        if not where:
            return draw(json_values)
        parent = doc
        for k in where[:-1]:
            parent = parent[k]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent[where[-1]] = draw(json_values)
    return doc


def json_bytes(doc) -> bytes:
    return json.dumps(doc, allow_nan=True, indent=1).encode("utf-8", "surrogatepass")


@st.composite
def json_file_mutated(draw, doc) -> bytes:
    """A JSON file: structurally mutated, byte-corrupted, or garbage."""
    kind = draw(st.sampled_from(["structure", "bytes", "garbage"]))
    if kind == "structure":
        return json_bytes(draw(json_mutated(doc)))
    if kind == "bytes":
        return draw(corrupted(json_bytes(doc)))
    return draw(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
                          st.sampled_from([b"", b"[]", b"null", b"1e999", b"9" * 5000, b"[" * 100_000,
                                           b"\xef\xbb\xbf{}", b'{"a": 1, "a": 2}', b"NaN"])))


# safetensors: rewrite the same tensors with other dtypes, shapes, names, metadata
DTYPES = [np.float16, np.float64, np.int8, np.int32, np.int64, np.uint8, np.bool_]


def _reshape(arr: np.ndarray, how: str) -> np.ndarray:
    return {"2d-row": lambda a: a.reshape(1, -1), "2d-col": lambda a: a.reshape(-1, 1),
            "flat": lambda a: a.reshape(-1), "scalar": lambda a: a.reshape(-1)[:1].reshape(()) if a.size else a,
            "empty": lambda a: a.reshape(-1)[:0], "half": lambda a: a.reshape(-1)[: a.size // 2],
            "3d": lambda a: a.reshape(1, 1, -1), "double": lambda a: np.concatenate([a.reshape(-1)] * 2)}[how](arr)


@st.composite
def safetensors_rewritten(draw, tensors: dict[str, np.ndarray], meta: dict[str, str] | None) -> bytes:
    tensors = {k: v.copy() for k, v in tensors.items()}
    meta = dict(meta) if meta is not None else None
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["dtype", "shape", "rename", "drop", "values", "meta"]))
        key = draw(st.sampled_from(sorted(tensors))) if tensors else None
        if key is None:
            break
        if what == "dtype":
            tensors[key] = tensors[key].astype(draw(st.sampled_from(DTYPES)))
        elif what == "shape":
            tensors[key] = np.ascontiguousarray(_reshape(tensors[key], draw(st.sampled_from(
                ["2d-row", "2d-col", "flat", "scalar", "empty", "half", "3d", "double"]))))
        elif what == "rename":
            new = draw(st.one_of(st.text(min_size=1, max_size=30), st.sampled_from(
                [key + ".x", key.replace("0", "99999"), key.replace("0", "-1"), key.replace("0", "a"),
                 key.replace(".", "", 1), key.rsplit(".", 1)[0] + ".q", "layers.0", "....", key + "\x00"])))
            tensors[new] = tensors.pop(key)
        elif what == "drop":
            del tensors[key]
        elif what == "values":
            arr = tensors[key]
            if arr.size and arr.dtype.kind == "f":
                arr.reshape(-1)[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from(
                    [np.nan, np.inf, -np.inf, 0.0, -1.0, 1e38, 1e-45]))
        elif meta is not None:
            mkey = draw(st.sampled_from(sorted(meta) + ["format", "family", "scaling", "other"]))
            if draw(st.booleans()) and mkey in meta:
                del meta[mkey]
            else:
                meta[mkey] = draw(st.one_of(st.text(max_size=30), json_values.map(json.dumps)))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            save_file(tensors, f"{tmp}/x.safetensors", metadata=meta)
        except Exception:  # a rewrite safetensors itself refuses to write (e.g. bad names): skip
            assume(False)
        return Path(f"{tmp}/x.safetensors").read_bytes()


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
    with safe_open(str(path), "np") as st_:
        return {k: st_.get_tensor(k) for k in st_.keys()}, st_.metadata()


def safetensors_header_len(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


# -- valid files, built once ---------------------------------------------------------------

@pytest.fixture(scope="module")
def valid(tiny_dir, tmp_path_factory):
    """One valid file of each format, from edgeia3's own writers on a tiny random llama."""
    from edgeia3 import load_base
    from edgeia3.export import export_gguf, export_onnx

    root = tmp_path_factory.mktemp("fuzz")
    base_dir = tiny_dir("llama", tokenizer="bpe")
    base = load_base(base_dir)
    random_peft_adapter(copy.deepcopy(base.model), "llama", root / "peft", seed=3)
    adapter = load_adapter(root / "peft", base_config=base.config)
    adapter = dataclasses.replace(adapter, base=base.identity)
    canonical = adapter.save(root / "canonical" / CANONICAL_FILE)
    onnx = export_onnx(str(base_dir), root / "onnx", "fp32", adapters={"a": str(root / "peft")}).out
    gguf = export_gguf(str(base_dir), root / "gguf", quant="f32", adapters={"a": str(root / "peft")}).out
    return Files({"root": root, "base": base, "adapter": adapter, "peft": root / "peft", "canonical": canonical,
            "onnx": onnx, "gguf": gguf, "work": Path(tempfile.mkdtemp(dir=root))})


class Files(dict):
    """The valid files; a short repr keeps hypothesis' falsifying-example reports readable."""

    def __repr__(self) -> str:
        return f"<valid files under {self['root']}>"


def same_vectors(a: IA3Adapter, b: IA3Adapter) -> bool:
    return [(v.layer, v.site, v.scaling) for v in a.vectors] == [(v.layer, v.site, v.scaling) for v in b.vectors] \
        and all(np.array_equal(x.values, y.values) for x, y in zip(a.vectors, b.vectors))


def well_formed(ad: IA3Adapter) -> None:
    """A successfully read adapter is a usable one."""
    assert isinstance(ad, IA3Adapter) and ad.family_spec is not None
    for v in ad.vectors:
        assert isinstance(v.layer, int) and v.values.dtype == np.float32 and v.values.ndim == 1
        assert np.all(np.isfinite(v.values))
    assert isinstance(ad.fused_layout, dict) and isinstance(ad.trained_on, dict) and isinstance(ad.extra, dict)
    assert isinstance(ad.quant, str) and (ad.base is None or all(
        isinstance(x, str) for x in (ad.base.fingerprint, ad.base.content, ad.base.name)))
    assert len({(v.layer, v.site) for v in ad.vectors}) == len(ad.vectors), "a site twice"


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
    from edgeia3.converters.onnx.export import plans_of

    m = json.loads((valid["onnx"] / "edgeia3.json").read_text())
    d = fresh_dir(valid["work"])
    path = d / "a.onnx_adapter"
    path.write_bytes(data)
    # as edgeia3.export._onnx_adapters calls it
    ad = loads_or_refuses(lambda: read_onnx_adapter(path, plans_of(m), m["family"], m["adapters"]["a"]["sites"]),
                          d, path)
    if ad is not None:
        well_formed(ad)
        assert {v.site for v in ad.vectors} <= set(m["adapters"]["a"]["sites"])
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
