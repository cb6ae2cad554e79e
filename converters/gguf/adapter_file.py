"""The IA3 adapter GGUF (``NAME.ia3.gguf``): write from and read back to the
canonical adapter. The format is documented in docs/GGUF_IA3_FORMAT.md.

Like llama.cpp's LoRA adapters it is a GGUF with ``general.type=adapter``;
``adapter.type=ia3`` and the ``adapter.ia3.*`` keys describe it. Vectors are
stored in the base GGUF's row order, so a runtime applies them without
knowing anything about the original transformers layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeia3.adapter import IA3Adapter
from edgeia3.atomic import atomic_file
from edgeia3.errors import EdgeIA3Error
from edgeia3.fingerprint import BaseIdentity
from edgeia3.registry import get_family

from .plan import IN_SUFFIX, OUT_SUFFIX, to_gguf_vectors

FORMAT_VERSION = 1


def readable(path: Path) -> None:
    """An ordinary file's permissions (atomic_file's temp files start private)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
SUFFIX = ".ia3.gguf"
K = "adapter.ia3."


def write_ia3_gguf(adapter: IA3Adapter, path: str | Path, base, name: str = "") -> Path:
    """Write ``adapter`` (validated against ``base``, a GGUFBase) as an IA3 adapter GGUF."""
    import gguf

    adapter.check_finite()
    fam = adapter.family_spec
    vectors = to_gguf_vectors(adapter, base.config, base.heads)
    identity = adapter.base or base.identity  # a PEFT adapter without one gets its GGUF base's
    up = next((fam.input_fold_site(s.name) for s in fam.sites if fam.input_fold_site(s.name)), None)
    path = Path(path)
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), base.index.arch)
        w.add_type("adapter")
        w.add_string("adapter.type", "ia3")
        w.add_name(name or path.name.removesuffix(SUFFIX))
        w.add_uint32(K + "format_version", FORMAT_VERSION)
        w.add_string(K + "family", fam.name)
        w.add_array(K + "sites", adapter.sites)
        w.add_uint32(K + "block_count", base.config.num_hidden_layers)
        w.add_uint32(K + "head_count", base.heads["q"])
        w.add_uint32(K + "head_count_kv", base.heads["k"])
        permuted = sorted({s.gguf_tensor.split(".")[-1] for s in fam.sites if s.gguf_permute})
        if permuted:
            w.add_array(K + "rope_permuted", permuted)
        if up is not None:
            w.add_string(K + "input_fold_target", up.gguf_tensor)
            rows = up.fused_rows(base.config) if up.fused_rows else (0, base.config.intermediate_size)
            w.add_array(K + "input_fold_rows", [int(rows[0]), int(rows[1])])
        w.add_string(K + "base.fingerprint", identity.fingerprint)
        w.add_string(K + "base.content", identity.content)
        w.add_string(K + "base.name", identity.name)
        w.add_string(K + "trained_quant", adapter.quant)
        w.add_string(K + "trained_on", json.dumps(adapter.trained_on))
        w.add_string(K + "fused_layout", json.dumps(adapter.fused_layout))
        w.add_string(K + "extra", json.dumps(adapter.extra))
        for key, vec in vectors.items():
            w.add_tensor(key, np.ascontiguousarray(vec, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        readable(tmp)
    return path


def read_ia3_gguf(path: str | Path) -> IA3Adapter:
    """Read an IA3 adapter GGUF back into the canonical adapter (un-permuted)."""
    import gguf

    from .plan import from_gguf_vectors

    class BoundedReader(gguf.GGUFReader):
        """gguf-py reads past the end of a damaged file as empty arrays, so a corrupt array
        length loops (and allocates) without end; here a read past the end fails."""

        def _get(self, offset, dtype, count=1, override_order=None):
            if int(offset) + np.dtype(dtype).itemsize * int(count) > len(self.data):
                raise ValueError(f"truncated: a value at byte {int(offset)} runs past the end")
            return super()._get(offset, dtype, count, override_order)

    path = Path(path)
    if not path.is_file():
        raise EdgeIA3Error(f"adapter not found: {path}")
    try:
        reader = BoundedReader(str(path))
        meta = {k: fld.contents() for k, fld in reader.fields.items()
                if k in ("general.type", "adapter.type") or k.startswith(K)}
    except (ValueError, OSError, IndexError, KeyError, OverflowError) as e:  # UnicodeDecodeError too
        raise EdgeIA3Error(f"{path} is not a valid GGUF file: {e}") from e

    def get(key: str, kind: type, default=None):
        value = meta.get(key, default)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"{key} is {value!r}, expected a {kind.__name__}")
        return value

    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "ia3":
        raise EdgeIA3Error(f"{path} is not an IA3 adapter GGUF (general.type={meta.get('general.type')!r}, "
                           f"adapter.type={meta.get('adapter.type')!r})")
    try:
        version = get(K + "format_version", int, 0)
        if version > FORMAT_VERSION:
            raise EdgeIA3Error(f"{path}: IA3 adapter GGUF version {version} is newer than this edgeia3 reads")
        fam = get_family(get(K + "family", str))
        sites = get(K + "sites", list, [])
        layers = get(K + "block_count", int)
        heads = {"q": get(K + "head_count", int), "k": get(K + "head_count_kv", int)}
        if not all(isinstance(s, str) for s in sites):
            raise TypeError(f"{K}sites must be site names")
        if not 0 < layers <= 10_000 or min(heads.values()) <= 0:
            raise ValueError(f"block_count {layers} / head counts {heads} out of range")
        layout = json.loads(get(K + "fused_layout", str, "{}"))
        if not isinstance(layout, dict) or not all(
                isinstance(r, list) and len(r) == 3 and all(type(i) is int for i in r) for r in layout.values()):
            raise TypeError("fused_layout must map sites to [start, stop, rows]")
        trained_on = json.loads(get(K + "trained_on", str, "{}"))
        extra = json.loads(get(K + "extra", str, "{}"))
        if not isinstance(trained_on, dict) or not isinstance(extra, dict):
            raise TypeError("trained_on and extra must be JSON objects")
        vectors = {}
        for t in reader.tensors:
            if not t.name.endswith((OUT_SUFFIX, IN_SUFFIX)) or t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise EdgeIA3Error(f"{path}: unexpected tensor {t.name!r} ({t.tensor_type.name})")
            vectors[t.name] = np.array(t.data, dtype=np.float32).reshape(-1)
        fp = get(K + "base.fingerprint", str, "")
        base = BaseIdentity(fp, get(K + "base.content", str, ""), get(K + "base.name", str, "")) if fp else None
        adapter = from_gguf_vectors(vectors, fam, sites, layers, layout, heads, base=base,
                                    quant=get(K + "trained_quant", str, "none"), trained_on=trained_on, extra=extra)
        adapter.check_finite()
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise EdgeIA3Error(f"{path}: corrupt IA3 adapter GGUF metadata ({e})") from e
    except EdgeIA3Error as e:  # an unknown family or site, tensors of no site, non-finite values
        if str(path) in str(e):
            raise
        raise EdgeIA3Error(f"{path}: {' '.join(str(e).split())}") from e
    return adapter


def read_gguf_vectors(path: str | Path) -> dict[str, np.ndarray]:
    """The stored vectors as-is (GGUF row order), for runtimes that apply them directly."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
