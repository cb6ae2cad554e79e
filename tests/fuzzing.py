"""What the reader fuzz tests share (test_fuzz_readers.py, test_fuzz_inputs.py): the property
(a reader returns a well-formed result or one clear EdgeIA3Error, never another exception, a
hang or a write), hypothesis strategies that corrupt files, and the valid files to start from."""

from __future__ import annotations

import dataclasses

import contextlib
import copy
import hashlib
import json
import os
import signal
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, settings
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


