"""Canonical IA3 adapter <-> ONNX Runtime adapter file (``.onnx_adapter``).

An ``.onnx_adapter`` holds named tensors that onnxruntime(-genai) feeds as graph
inputs of the same name. Here: one tensor per IA3 input of the export
(``ia3.layers.{i}.{sites}``, shape [1, 1, N]), every input of the graph written
even where the adapter leaves it at ones, so activating an adapter fully
determines every IA3 input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeia3.adapter import IA3Adapter, IA3Vector
from edgeia3.errors import EdgeIA3Error
from edgeia3.registry import Scaling, get_family

from .graph import IA3Input

SUFFIX = ".onnx_adapter"


def adapter_tensors(adapter: IA3Adapter, plans: list[IA3Input], dtype=np.float32) -> dict[str, np.ndarray]:
    """The graph-input tensors ([1, 1, N]) that apply ``adapter`` on an export with ``plans``."""
    used: set[tuple[int, str]] = set()
    out = {}
    for p in plans:
        vec = np.ones(p.size, dtype=np.float32)
        for site, start, stop in p.parts:
            v = adapter.get(p.layer, site)
            if v is None:
                continue
            if v.scaling.value != p.scaling:
                raise EdgeIA3Error(f"adapter vector {v.key} scales the {v.scaling.value}, the export "
                                   f"expects {p.scaling} scaling at {p.node}")
            if v.values.size != stop - start:
                raise EdgeIA3Error(f"adapter vector {v.key} has {v.values.size} values, {p.name} expects {stop - start}")
            vec[start:stop] = v.values
            used.add((v.layer, v.site))
        out[p.name] = vec.reshape(1, 1, -1).astype(dtype)
    missing = [v.key for v in adapter.vectors if (v.layer, v.site) not in used]
    if missing:
        raise EdgeIA3Error(f"this export has no IA3 input for adapter vectors {', '.join(missing[:4])}"
                           f"{' ...' if len(missing) > 4 else ''}; export it with that adapter's sites")
    return out


def write_onnx_adapter(adapter: IA3Adapter, plans: list[IA3Input], path: str | Path,
                       dtype=np.float32) -> Path:
    """Write ``adapter`` as an ONNX Runtime adapter file for an export with ``plans``."""
    import onnxruntime as ort

    from edgeia3.atomic import atomic_file

    path = Path(path)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    tensors = adapter_tensors(adapter, plans, dtype)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    with atomic_file(path) as tmp:
        fmt.export_adapter(str(tmp))
    return path


def read_onnx_adapter_tensors(path: str | Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    if not Path(path).is_file():
        raise EdgeIA3Error(f"ONNX adapter file not found: {path}")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        arrays = {k: v.numpy() for k, v in fmt.get_parameters().items()}
    except Exception as e:  # onnxruntime raises its own RuntimeError types for bad files
        raise EdgeIA3Error(f"{path} is not a readable .onnx_adapter file: {' '.join(str(e).split())}") from e
    for k, a in arrays.items():
        if a.dtype.kind != "f":
            raise EdgeIA3Error(f"{path}: tensor {k} holds {a.dtype} values, IA3 vectors are floating point")
    return {k: np.array(a, dtype=np.float32) for k, a in arrays.items()}


def read_onnx_adapter(path: str | Path, plans: list[IA3Input], family: str,
                      sites: list[str] | None = None) -> IA3Adapter:
    """Read an ``.onnx_adapter`` back into a canonical adapter.

    ``sites``: the adapter's sites (from the export manifest); without them,
    parts that are exactly ones (identity) are dropped.
    """
    return adapter_from_tensors(read_onnx_adapter_tensors(path), plans, family, sites, path)


def adapter_from_tensors(tensors: dict[str, np.ndarray], plans: list[IA3Input], family: str,
                         sites: list[str] | None, path: str | Path) -> IA3Adapter:
    """Graph-input tensors (name -> [1, 1, N]: an ``.onnx_adapter``'s or a web export's adapter
    file, read from ``path``) back into a canonical adapter; ``sites`` as for ``read_onnx_adapter``."""
    fam = get_family(family)
    vectors = []
    for p in plans:
        if p.name not in tensors:
            continue
        if tensors[p.name].shape != (1, 1, p.size):
            raise EdgeIA3Error(f"{path}: tensor {p.name} has shape {list(tensors[p.name].shape)}, "
                               f"the export expects [1, 1, {p.size}]")
        vec = tensors[p.name].reshape(-1)
        for site, start, stop in p.parts:
            part = vec[start:stop]
            keep = site in sites if sites is not None else not np.all(part == 1.0)
            if keep:
                vectors.append(IA3Vector(p.layer, site, Scaling(p.scaling), part.copy()))
    if not vectors and sites is None:
        raise EdgeIA3Error(f"{path} holds no IA3 tensors of this export")
    adapter = IA3Adapter(fam.name, vectors)
    try:
        adapter.check_finite()
    except EdgeIA3Error as e:
        raise EdgeIA3Error(f"{path}: {e}") from e
    return adapter
