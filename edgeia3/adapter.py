"""The canonical IA3 adapter: the one model every format converts to and from.

An adapter is, per layer, a few vectors; each names its *site* (q, k, v, o,
gate, up, down - see the registry) and whether it scales the site's output
(rows) or its input (columns). Metadata records the family, the base it was
made for and the quantization it was trained on.

On disk the canonical form is one self-describing safetensors file
(``edgeia3_adapter.safetensors``): tensors ``layers.{i}.{site}`` (fp32) and
the metadata as JSON strings in the header. No pickle.
"""

from __future__ import annotations


import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import EdgeIA3Error
from .fingerprint import BaseIdentity
from .registry import Family, Scaling, get_family

CANONICAL_FILE = "edgeia3_adapter.safetensors"
FORMAT = "edgeia3-ia3"
FORMAT_VERSION = "1"
# No IA3 adapter comes near this: a 70B model's vectors are ~10 MB. A bigger file is refused before
# a byte of it is read (a server must not load whatever large file a request names).
MAX_ADAPTER_BYTES = 256 << 20
# What an adapter may be called wherever it gets a name (exports' files and manifests, the server's
# models): file-name safe, and never "base", the server's name for the model without an adapter.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED_NAMES = frozenset({"base"})  # compared case-insensitively


def is_adapter_name(name: Any) -> bool:
    return isinstance(name, str) and ADAPTER_NAME.fullmatch(name) is not None and name.lower() not in RESERVED_NAMES


def check_adapter_name(name: Any) -> None:
    """One ``EdgeIA3Error`` saying what is wrong with ``name`` as an adapter name (``is_adapter_name``)."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise EdgeIA3Error(f"adapter name {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-' "
                           "(starting with a letter or digit)")
    if name.lower() in RESERVED_NAMES:
        raise EdgeIA3Error(f"'{name}' names the base model; pick another adapter name")


@dataclass
class IA3Vector:
    layer: int
    site: str
    scaling: Scaling
    values: np.ndarray  # 1-D float32

    @property
    def key(self) -> str:
        return f"layers.{self.layer}.{self.site}"


@dataclass(frozen=True)
class IA3Adapter:
    """Immutable once made: derive changed copies with ``dataclasses.replace``."""

    family: str
    vectors: list[IA3Vector]
    base: BaseIdentity | None = None
    quant: str = "none"  # quantization of the base it was trained on: none | nf4 | gguf
    # The exact weights it was trained on, for quant "gguf": {"sha256", "quant", "name", "types"}
    trained_on: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    # For sites inside a fused module: site -> [start, stop, module_rows].
    fused_layout: dict[str, list[int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors.sort(key=lambda v: (v.layer, self.family_spec.sites.index(self.family_spec.site(v.site))))

    # -- views ---------------------------------------------------------------
    @property
    def family_spec(self) -> Family:
        return get_family(self.family)

    @property
    def sites(self) -> list[str]:
        order = [s.name for s in self.family_spec.sites]
        return sorted({v.site for v in self.vectors}, key=order.index)

    @property
    def layers(self) -> list[int]:
        return sorted({v.layer for v in self.vectors})

    @property
    def num_params(self) -> int:
        return int(sum(v.values.size for v in self.vectors))

    @property
    def nbytes(self) -> int:
        return int(sum(v.values.nbytes for v in self.vectors))

    def get(self, layer: int, site: str) -> IA3Vector | None:
        for v in self.vectors:
            if v.layer == layer and v.site == site:
                return v
        return None

    def check_finite(self) -> None:
        for v in self.vectors:
            if not np.all(np.isfinite(v.values)):
                bad = int(np.sum(~np.isfinite(v.values)))
                raise EdgeIA3Error(f"adapter vector {v.key} has {bad} non-finite values (NaN/Inf)")

    # -- canonical file ------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the canonical safetensors file (``path`` may be a directory)."""
        from safetensors.numpy import save_file

        from .atomic import atomic_file

        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / CANONICAL_FILE
        self.check_finite()
        tensors = {v.key: np.ascontiguousarray(v.values, dtype=np.float32) for v in self.vectors}
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "quant": self.quant,
            "dtype": self.dtype,
            "base": json.dumps(self.base.to_dict() if self.base else None),
            "scaling": json.dumps({v.key: v.scaling.value for v in self.vectors}),
            "fused_layout": json.dumps(self.fused_layout),
            "trained_on": json.dumps(self.trained_on),
            "extra": json.dumps(self.extra),
        }
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "IA3Adapter":
        """Read a canonical file, or a directory holding one. (Any adapter form, PEFT
        directories included: ``edgeia3.formats.load_adapter``.)"""
        path = Path(path)
        if path.is_dir():
            if not (path / CANONICAL_FILE).exists():
                raise EdgeIA3Error(f"{path} holds no edgeia3 adapter ({CANONICAL_FILE})")
            path = path / CANONICAL_FILE
        if not path.exists():
            raise EdgeIA3Error(f"adapter not found: {path}")
        return _read_canonical(path)


def read_adapter_safetensors(path: str | Path, check_header: Any = None,
                             max_bytes: int = MAX_ADAPTER_BYTES) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors and metadata of an adapter's safetensors file, checked before its data is read: the
    file's size (at most ``max_bytes``), then ``check_header(metadata, {name: shape})`` (raises for a
    file that is not the expected kind), then that every tensor is a vector (one dimension over 1)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise EdgeIA3Error(f"cannot read {path}: {e.strerror or e}") from None
    if size > max_bytes:
        raise EdgeIA3Error(f"{path} is {size / 2**20:.0f} MiB; no IA3 adapter is larger than "
                           f"{max_bytes >> 20} MiB (is it a model file?)")
    try:
        with safe_open(str(path), "np") as st:
            meta = st.metadata() or {}
            shapes = {k: st.get_slice(k).get_shape() for k in st.keys()}
            if check_header is not None:
                check_header(meta, shapes)
            bad = next((k for k, v in shapes.items() if sum(d > 1 for d in v) > 1), None)  # vectors only
            if bad is not None:
                raise EdgeIA3Error(f"{path}: tensor {bad} has shape {list(shapes[bad])}, not an IA3 vector")
            return {k: st.get_tensor(k) for k in shapes}, meta
    except (SafetensorError, OSError, ValueError) as e:
        raise EdgeIA3Error(f"{path} is not a readable safetensors file: {e}") from e


def _read_canonical(path: Path) -> IA3Adapter:
    def canonical(meta: dict, shapes: dict) -> None:
        if meta.get("format") != FORMAT:
            raise EdgeIA3Error(f"{path} is not an edgeia3 IA3 adapter (format={meta.get('format')!r})")

    tensors, meta = read_adapter_safetensors(path, canonical)

    def json_meta(key: str, default: str, kind: Any) -> Any:
        value = json.loads(meta.get(key, default))
        if not isinstance(value, kind):
            raise TypeError(f"metadata {key!r} holds a JSON {type(value).__name__}")
        return value

    try:
        scaling = json_meta("scaling", "{}", dict)
        vectors, seen = [], set()
        for key, arr in tensors.items():
            if not re.fullmatch(r"layers\.[0-9]+\.[a-z_0-9]+", key):
                raise ValueError(f"tensor {key!r} is not named layers.<layer>.<site>")
            _, layer, site = key.split(".")
            if arr.dtype.kind != "f" or arr.ndim != 1 or arr.size == 0:
                raise ValueError(f"tensor {key} is {arr.dtype} of shape {list(arr.shape)}, "
                                 "expected a non-empty 1-D float vector")
            if (int(layer), site) in seen:
                raise ValueError(f"tensor {key} repeats layer {int(layer)} site {site}")
            seen.add((int(layer), site))
            vectors.append(IA3Vector(int(layer), site, Scaling(scaling[key]), arr.astype(np.float32)))
        base = json_meta("base", "null", (dict, type(None)))
        if base is not None and not all(isinstance(v, str) for v in base.values()):
            raise TypeError("base identity fields must be strings")
        fused_layout = json_meta("fused_layout", "{}", dict)
        if not all(isinstance(r, list) and len(r) == 3 and all(type(i) is int for i in r)
                   for r in fused_layout.values()):
            raise TypeError("fused_layout must map sites to [start, stop, rows]")
        adapter = IA3Adapter(
            family=get_family(meta["family"]).name,
            vectors=vectors,
            base=BaseIdentity.from_dict(base),
            quant=meta.get("quant", "none"),
            dtype=meta.get("dtype", "float32"),
            fused_layout=fused_layout,
            trained_on=json_meta("trained_on", "{}", dict),
            extra=json_meta("extra", "{}", dict),
        )
        adapter.check_finite()
    except (KeyError, ValueError, TypeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise EdgeIA3Error(f"{path}: corrupt edgeia3 adapter ({type(e).__name__}: {e})") from e
    except EdgeIA3Error as e:  # an unknown family or site, non-finite values
        raise EdgeIA3Error(f"{path}: {' '.join(str(e).split())}") from e
    return adapter


def fused_layout_for(family: Family, config: Any) -> dict[str, list[int]]:
    """Rows of every fused site for a given base config (see Site.fused_rows)."""
    layout = {}
    for s in family.sites:
        if s.fused_rows is not None:
            siblings = [t for t in family.sites if t.module == s.module]
            total = max(t.fused_rows(config)[1] for t in siblings)
            layout[s.name] = [*s.fused_rows(config), total]
    return layout


def identity_adapter(family: Family, model: Any, sites: Iterable[str] | None = None,
                     base: BaseIdentity | None = None, quant: str = "none") -> IA3Adapter:
    """An all-ones adapter shaped for ``model`` (the starting point for training/tests)."""
    from .fingerprint import module_shape, num_layers

    sites = list(sites or family.default_targets)
    layout = fused_layout_for(family, model.config)
    vectors = []
    for i in range(num_layers(model.config)):
        for name in sites:
            s = family.site(name)
            out, inp = module_shape(model.get_submodule(family.module_path(i, s)), family.conv1d)
            if name in layout:
                out = layout[name][1] - layout[name][0]
            n = inp if s.scaling is Scaling.INPUT else out
            vectors.append(IA3Vector(i, name, s.scaling, np.ones(n, dtype=np.float32)))
    return IA3Adapter(family.name, vectors, base=base, quant=quant, fused_layout=layout)
