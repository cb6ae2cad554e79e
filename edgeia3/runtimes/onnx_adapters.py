"""Adapters loaded into an ONNX export while it runs (``OnnxRuntime.load_adapter``).

The adapter must fit the export's IA3 graph inputs (``ia3_inputs`` in ``edgeia3.json``).
A canonical / PEFT / ``.ia3.gguf`` adapter is checked against the export's base identity and
written as an ``.onnx_adapter`` for those inputs; an ``.onnx_adapter`` file (which holds only
tensors, no base identity) must have exactly those inputs, shapes and dtype, and is copied.
Either way the runtime loads its own copy, so later edits of the source do not matter.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..adapter import CANONICAL_FILE, IA3Adapter
from ..errors import EdgeIA3Error
from ..manifest import ExportManifest
from .base_runtime import adapter_format


def prepare(manifest: ExportManifest, dtype: Any, name: str, path: Path, workdir: Path) -> tuple[Path, dict, IA3Adapter]:
    """Check the adapter at ``path`` against the export described by ``manifest`` (IA3 inputs in
    ``dtype``) and write the runtime's own ``.onnx_adapter`` copy of it under ``workdir``.
    Returns (the copy, facts about the adapter, the adapter)."""
    from edgeia3.converters.onnx.adapter_file import SUFFIX, read_onnx_adapter, write_onnx_adapter
    from edgeia3.converters.onnx.graph import plans_of

    plans = plans_of(manifest)
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / f"{name}{SUFFIX}"
    target.unlink(missing_ok=True)  # a stale copy of an adapter of that name, unloaded before
    if path.is_file() and path.name.endswith(SUFFIX):
        check_onnx_adapter_file(path, plans, dtype)
        adapter = read_onnx_adapter(path, plans, manifest.family)  # shapes, finite values
        shutil.copyfile(path, target)
        return target, {"sites": adapter.sites, "params": adapter.num_params, "format": "onnx_adapter",
                        "note": ".onnx_adapter files carry no base identity: checked against the export's IA3 "
                                "inputs only"}, adapter
    adapter = read_any_adapter(path, manifest.family)
    check_identity(adapter, manifest)
    adapter.check_finite()
    write_onnx_adapter(adapter, plans, target, dtype)  # refuses vectors of other lengths / sites
    return target, {"sites": adapter.sites, "params": adapter.num_params, "format": adapter_format(path)}, adapter


def read_any_adapter(path: Path, family: str) -> IA3Adapter:
    """A canonical adapter (dir or file), a PEFT dir or an ``.ia3.gguf``, as a canonical adapter."""
    if path.is_file() and path.suffix == ".gguf":
        from edgeia3.converters.gguf.adapter_file import read_ia3_gguf

        return read_ia3_gguf(path)
    if path.is_dir() and not (path / CANONICAL_FILE).exists():
        from ..formats.peft_dir import read_peft_dir

        return read_peft_dir(path, family=family)
    from ..formats import load_adapter

    return load_adapter(path)


def check_identity(adapter: IA3Adapter, manifest: ExportManifest) -> None:
    """The adapter's family and base identity are the export's."""
    from ..fingerprint import BaseIdentity

    if adapter.family != manifest.family:
        raise EdgeIA3Error(f"adapter is for the '{adapter.family}' family but the export's base is "
                           f"'{manifest.family}'")
    b = manifest.base
    if adapter.base is not None and b.get("fingerprint"):
        ident = BaseIdentity(b["fingerprint"], b.get("content", ""), b.get("name", ""))
        if not adapter.base.matches(ident):
            what = "architecture/shapes" if adapter.base.fingerprint != ident.fingerprint else "weights"
            raise EdgeIA3Error(
                f"adapter was made for another base: its {what} differ (adapter base '{adapter.base.name}' "
                f"{adapter.base.fingerprint}/{adapter.base.content}, this export's base '{ident.name}' "
                f"{ident.fingerprint}/{ident.content})")


def check_onnx_adapter_file(path: Path, plans: list, dtype: Any) -> None:
    """An ``.onnx_adapter`` file has exactly the export's IA3 inputs, shapes and dtype."""
    import onnxruntime as ort

    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        arrays = {k: v.numpy() for k, v in params.items()}
    except Exception as e:
        raise EdgeIA3Error(f"{path} is not a readable .onnx_adapter file: {' '.join(str(e).split())}") from None
    want = {p.name: p.size for p in plans}
    missing, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
    if missing or extra:
        raise EdgeIA3Error(f"{path} does not fit this export's IA3 inputs: "
                           + "; ".join(x for x in (f"missing {', '.join(missing[:4])}" if missing else "",
                                                   f"unknown {', '.join(extra[:4])}" if extra else "") if x))
    for k, a in arrays.items():
        if a.shape != (1, 1, want[k]):
            raise EdgeIA3Error(f"{path}: tensor {k} has shape {list(a.shape)}, the export expects [1, 1, {want[k]}]")
        if a.dtype != np.dtype(dtype):
            raise EdgeIA3Error(f"{path}: tensor {k} is {a.dtype}, the export's IA3 inputs are {np.dtype(dtype)}")
