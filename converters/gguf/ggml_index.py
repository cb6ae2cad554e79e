"""Tensor offsets, shapes and metadata of a GGUF file, read by libggml.

gguf-py's GGUFReader takes ~2 s on SmolLM2 because it builds a numpy view per
vocabulary string; libggml's own ``gguf_init_from_file`` (shipped inside
llama-cpp-python) reads the same header in milliseconds. The container is
never parsed by hand: without llama-cpp-python the index falls back to
GGUFReader.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeia3.errors import EdgeIA3Error

def _tensor_name(which: str) -> str:
    import gguf

    return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, which)] + ".weight"


def tensor_name_map(arch: str, n_layers: int = 1) -> Any:
    """gguf-py's HF -> GGUF tensor-name map for llama.cpp architecture ``arch`` (e.g. "t5")."""
    import gguf

    for k, v in gguf.MODEL_ARCH_NAMES.items():
        if v == arch:
            return gguf.get_tensor_name_map(k, n_layers)
    raise EdgeIA3Error(f"gguf-py does not know architecture '{arch}'")


# Architecture-independent tensor names, from gguf-py's constants (the names llama.cpp uses)
TOKEN_EMBD, OUTPUT, OUTPUT_NORM = (_tensor_name(w) for w in ("TOKEN_EMBD", "OUTPUT", "OUTPUT_NORM"))

# gguf_type values (ggml/include/gguf.h)
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)


def file_digest(path: str | Path) -> str:
    """Short sha256 of a file's bytes: names the exact weights an adapter was trained on."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:  # size/mtime: a changed file is hashed again
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def gguf_weights(path: Path, name: str, quant: str | None = None) -> dict:
    """The ``trained_on`` / ``deployed`` description of a GGUF's blocks (see edgeia3.weights)."""
    return {"kind": "gguf", "sha256": file_digest(path), "quant": quant or GGUFIndex(path).file_type, "name": name}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: int  # ggml_type == gguf.GGMLQuantizationType value
    ne: tuple[int, ...]  # ggml order: ne[0] = row length (input dim), ne[1] = rows
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def rows(self) -> int:
        n = 1
        for x in self.ne[1:]:
            n *= x
        return n


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


@functools.lru_cache(maxsize=1)
def _libggml() -> Any | None:
    """libggml-base from llama-cpp-python's package (already loaded by libllama)."""
    try:
        import llama_cpp  # noqa: F401  (loads the libraries)
    except ImportError:
        return None
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    cands = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.*"))
    if not cands:
        return None
    lib = ctypes.CDLL(str(cands[0]))
    vp, cp, i64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64
    sigs = {
        "gguf_init_from_file": (vp, [cp, _InitParams]),
        "gguf_free": (None, [vp]),
        "gguf_get_n_tensors": (i64, [vp]),
        "gguf_get_tensor_name": (cp, [vp, i64]),
        "gguf_get_tensor_offset": (ctypes.c_size_t, [vp, i64]),
        "gguf_get_tensor_type": (ctypes.c_int, [vp, i64]),
        "gguf_get_tensor_size": (ctypes.c_size_t, [vp, i64]),
        "gguf_get_data_offset": (ctypes.c_size_t, [vp]),
        "gguf_find_key": (i64, [vp, cp]),
        "gguf_get_kv_type": (ctypes.c_int, [vp, i64]),
        "gguf_get_val_u32": (ctypes.c_uint32, [vp, i64]),
        "gguf_get_val_i32": (ctypes.c_int32, [vp, i64]),
        "gguf_get_val_u64": (ctypes.c_uint64, [vp, i64]),
        "gguf_get_val_f32": (ctypes.c_float, [vp, i64]),
        "gguf_get_val_bool": (ctypes.c_bool, [vp, i64]),
        "gguf_get_val_str": (cp, [vp, i64]),
        "ggml_get_tensor": (vp, [vp, cp]),
        "ggml_nelements": (i64, [vp]),
        "ggml_nrows": (i64, [vp]),
        "ggml_n_dims": (ctypes.c_int, [vp]),
        "ggml_free": (None, [vp]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


class GGUFIndex:
    """Metadata and tensor table of one GGUF file (no tensor data is read)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise EdgeIA3Error(f"GGUF file not found: {self.path}")
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise EdgeIA3Error(f"{self.path} is not a GGUF file (bad magic)")
        lib = _libggml()
        self.kv: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        if lib is not None:
            self._read_libggml(lib)
        else:
            self._read_gguf_py()

    # -- readers -------------------------------------------------------------
    def _read_libggml(self, lib: Any) -> None:
        ggml_ctx = ctypes.c_void_p()
        ctx = lib.gguf_init_from_file(str(self.path).encode(), _InitParams(True, ctypes.pointer(ggml_ctx)))
        if not ctx:
            raise EdgeIA3Error(f"{self.path} is not a valid GGUF file (libggml could not read it)")
        try:
            self._ctx, self._lib = ctx, lib
            base = lib.gguf_get_data_offset(ctx)
            for i in range(lib.gguf_get_n_tensors(ctx)):
                name = lib.gguf_get_tensor_name(ctx, i).decode()
                t = lib.ggml_get_tensor(ggml_ctx, name.encode())
                n, rows = lib.ggml_nelements(t), lib.ggml_nrows(t)
                ne = (n // rows, rows) if lib.ggml_n_dims(t) > 1 else (n,)
                self.tensors[name] = TensorInfo(name, lib.gguf_get_tensor_type(ctx, i), ne,
                                                base + lib.gguf_get_tensor_offset(ctx, i),
                                                lib.gguf_get_tensor_size(ctx, i))
            self._scalar_getter = self._libggml_scalar
            self._cache_scalars()
        finally:
            lib.gguf_free(ctx)
            lib.ggml_free(ggml_ctx)
            self._ctx = None

    def _libggml_scalar(self, key: str) -> Any:
        lib, ctx = self._lib, self._ctx
        i = lib.gguf_find_key(ctx, key.encode())
        if i < 0:
            return None
        kind = lib.gguf_get_kv_type(ctx, i)
        getters = {_U32: lib.gguf_get_val_u32, _I32: lib.gguf_get_val_i32, _U64: lib.gguf_get_val_u64,
                   _F32: lib.gguf_get_val_f32, _BOOL: lib.gguf_get_val_bool}
        if kind == _STR:
            return lib.gguf_get_val_str(ctx, i).decode("utf-8", "replace")
        return getters[kind](ctx, i) if kind in getters else None

    def _cache_scalars(self) -> None:
        """Read the scalar keys edgeia3 uses (arrays such as the vocab are skipped)."""
        arch = self._scalar_getter("general.architecture")
        keys = ["general.architecture", "general.type", "general.name", "general.file_type",
                "adapter.type", "tokenizer.chat_template", "tokenizer.ggml.model",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]
        if arch:
            keys += [f"{arch}.{k}" for k in (
                "block_count", "embedding_length", "feed_forward_length", "context_length",
                "attention.head_count", "attention.head_count_kv", "attention.key_length",
                "attention.value_length", "vocab_size")]
        keys += list(_EDGEIA3_KEYS)
        for k in keys:
            v = self._scalar_getter(k)
            if v is not None:
                self.kv[k] = v

    def _read_gguf_py(self) -> None:
        import gguf

        try:
            reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError) as e:
            raise EdgeIA3Error(f"{self.path} is not a valid GGUF file: {e}") from e
        for k, f in reader.fields.items():
            if len(f.types) == 1 and f.types[0] != gguf.GGUFValueType.ARRAY:
                self.kv[k] = f.contents()
        for t in reader.tensors:
            self.tensors[t.name] = TensorInfo(t.name, int(t.tensor_type), tuple(int(x) for x in t.shape),
                                              int(t.data_offset), int(t.n_bytes))

    # -- views ---------------------------------------------------------------
    @property
    def arch(self) -> str:
        arch = self.kv.get("general.architecture")
        if not arch:
            raise EdgeIA3Error(f"{self.path}: GGUF without general.architecture")
        return arch

    def arch_int(self, key: str, default: int | None = None) -> int:
        v = self.kv.get(f"{self.arch}.{key}")
        if v is None:
            if default is None:
                raise EdgeIA3Error(f"{self.path}: GGUF metadata {self.arch}.{key} missing")
            return default
        return int(v)

    @property
    def file_type(self) -> str:
        """llama.cpp's file type name, e.g. "q4_1", "q4_k_m", "f16"."""
        import gguf

        ft = self.kv.get("general.file_type")
        try:
            return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").lower() if ft is not None else "unknown"
        except ValueError:
            return f"file_type {ft}"

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise EdgeIA3Error(f"{self.path}: tensor {name} missing for architecture {self.arch}")
        return self.tensors[name]


# Metadata edgeia3 itself writes into GGUFs it produces (see hf_writer).
_EDGEIA3_KEYS = ("edgeia3.source.fingerprint", "edgeia3.source.content", "edgeia3.source.name")


_LOG_ERROR, _LOG_CONT = 4, 5  # ggml_log_level (ggml.h): NONE, DEBUG, INFO, WARN, ERROR, CONT
_log_state = {"callback": None, "last": 0}


def quiet_llama_logs() -> None:
    """Let only llama.cpp/ggml errors reach stderr (load chatter and quantizer warnings off).

    llama-cpp-python's own callback maps the current level numbers wrongly
    (WARN shows as ERROR), so install one that knows them.
    """
    if _log_state["callback"] is not None:
        return
    import sys

    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level != _LOG_CONT:
            _log_state["last"] = level
        if _log_state["last"] == _LOG_ERROR:
            print(text.decode("utf-8", "replace"), end="", file=sys.stderr, flush=True)

    _log_state["callback"] = callback  # ctypes callbacks must outlive their registration
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
