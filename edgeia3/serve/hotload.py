"""Loading and unloading IA3 adapters into an open runtime, while it serves.

Every adapter is validated against the served base exactly as the export steps
validate it (family, base identity, vector lengths, finiteness); what a runtime
cannot take at run time is refused with a clear ``NotLoadable`` message.

- llama.cpp (GGUF side export): the adapter (canonical, PEFT dir or ``.ia3.gguf``)
  is validated against the GGUF (``GGUFBase.load_adapter``) and its scale fields
  are precomputed like the runtime does for the export's own adapters; the next
  ``use_adapter`` swaps them in. A merged GGUF export cannot take adapters.
- onnxruntime-genai (ONNX side export): the adapter must fit the export's IA3
  graph inputs (``ia3_inputs`` in ``edgeia3.json``). A canonical / PEFT /
  ``.ia3.gguf`` adapter is checked against the export's base identity and written
  as an ``.onnx_adapter`` for those inputs; an ``.onnx_adapter`` file (which holds
  only tensors, no base identity) must have exactly those inputs, shapes and dtype.
  Exports without IA3 inputs (merged or base-only) cannot take adapters.
- torch: refused (serve an export).

These functions reach into the runtimes' internals (marked below); a runtime
that grows public ``add_adapter(name, path)`` / ``remove_adapter(name)`` methods
is used through those instead.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeIA3Error
from ..formats import load_adapter

log = logging.getLogger("edgeia3.serve")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED = {"base"}
ADAPTER_SUFFIXES = (".ia3.gguf", ".onnx_adapter", ".safetensors")


class NotLoadable(EdgeIA3Error):
    """This runtime / export cannot take adapters at run time at all."""


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise EdgeIA3Error(f"adapter name {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-' "
                           "(starting with a letter or digit)")
    if name.lower() in RESERVED:
        raise EdgeIA3Error(f"'{name}' names the base model; pick another adapter name")


def discover(directory: str | Path) -> dict[str, Path]:
    """Adapters in ``directory``: NAME/ (canonical or PEFT dir), NAME.ia3.gguf, NAME.onnx_adapter,
    NAME.safetensors (canonical file). Names are sorted; anything else is ignored, and so is a
    name that differs from an earlier one only in case (names are case-insensitive)."""
    d = Path(directory)
    if not d.is_dir():
        raise EdgeIA3Error(f"adapters dir not found: {d}")
    found: dict[str, tuple[str, Path]] = {}  # lower-case name -> (name, path)
    for p in sorted(d.iterdir()):
        if p.name.startswith("."):
            continue
        name = None
        if p.is_dir() and ((p / "edgeia3_adapter.safetensors").exists() or (p / "adapter_config.json").exists()):
            name = p.name
        elif p.is_file():
            for suffix in ADAPTER_SUFFIXES:
                if p.name.endswith(suffix) and len(p.name) > len(suffix):
                    name = p.name[: -len(suffix)]
                    break
        if name is not None and NAME_RE.fullmatch(name) and name.lower() not in RESERVED:
            found.setdefault(name.lower(), (name, p))
    return dict(found.values())


def can_load(rt: Any) -> str | None:
    """None if ``rt`` can take adapters at run time, else the reason it cannot."""
    if rt.name == "llama.cpp":
        if rt.merged:
            return (f"this GGUF export has adapter '{rt.merged}' merged into its weights; it cannot load "
                    "adapters at run time (export without --merge to swap adapters)")
        return None
    if rt.name == "onnxruntime-genai":
        if not rt.manifest.get("ia3_inputs"):
            from ..manifest import merged_name

            merged = merged_name(rt.manifest)
            why = f"adapter '{merged}' is merged into its weights" if merged else "it was exported without adapters"
            return (f"this ONNX export has no IA3 side inputs ({why}), so adapters cannot be loaded at run time; "
                    "re-export it with --adapter NAME=PATH")
        return None
    return (f"the {rt.name} runtime cannot load adapters at run time (serve an ONNX or GGUF export, or attach "
            "adapters when opening it)")


def add_adapter(rt: Any, name: str, path: str | Path, workdir: Path) -> dict:
    """Validate the adapter at ``path`` against ``rt``'s base and make it usable as ``name``.
    Must run on the thread that owns ``rt``. Returns facts about it (sites, params)."""
    check_name(name)
    path = Path(path)
    if not path.exists():
        raise EdgeIA3Error(f"adapter not found: {path}")
    if name in rt.adapters:
        raise EdgeIA3Error(f"adapter '{name}' is already loaded")
    reason = can_load(rt)
    if reason:
        raise NotLoadable(reason)
    try:
        if hasattr(rt, "add_adapter"):  # runtimes that load adapters themselves (llama.cpp)
            return {**rt.add_adapter(name, path), "format": _format_of(path)}
        return _onnx_add(rt, name, path, workdir)
    except BaseException:
        _forget_refused(rt, name)
        raise


def _forget_refused(rt: Any, name: str) -> None:
    """A refused adapter leaves no trace: a runtime may have recorded it (or its chat template)
    before refusing it (llama.cpp: an overflowing scale), and the name must stay loadable."""
    if name in rt.adapters and hasattr(rt, "remove_adapter"):
        try:
            rt.remove_adapter(name)
        except Exception:  # never hide the refusal's own error
            log.exception("could not forget refused adapter %r", name)
    templates = getattr(rt, "templates", None)
    if templates is not None:
        templates.forget(name)


def remove_adapter(rt: Any, name: str, workdir: Path | None = None) -> None:
    """Forget adapter ``name`` (the base becomes active if it was); its file is deleted when it is
    the server's own copy (under ``workdir``). Must run on ``rt``'s thread."""
    if name not in rt.adapters:
        raise EdgeIA3Error(f"unknown adapter '{name}'")
    if getattr(rt, "merged", None) == name:
        raise NotLoadable(f"adapter '{name}' is merged into this export's weights; it cannot be unloaded")
    if not hasattr(rt, "remove_adapter"):
        raise NotLoadable(f"the {rt.name} runtime cannot unload adapters at run time")
    path = rt.remove_adapter(name)  # ONNX: the adapter's file; llama.cpp keeps none
    if path is not None and workdir is not None and Path(workdir).resolve() in Path(path).resolve().parents:
        Path(path).unlink(missing_ok=True)  # the server's own copy


# -- onnxruntime-genai --------------------------------------------------------------------------------
def _onnx_add(rt: Any, name: str, path: Path, workdir: Path) -> dict:
    from edgeia3.converters.onnx.adapter_file import SUFFIX, read_onnx_adapter, write_onnx_adapter
    from edgeia3.converters.onnx.export import plans_of

    m = rt.manifest
    plans = plans_of(m)
    dtype = _onnx_ia3_dtype(rt)
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / f"{name}{SUFFIX}"
    target.unlink(missing_ok=True)  # a stale copy of an adapter of that name, unloaded before
    if path.is_file() and path.name.endswith(SUFFIX):
        _check_onnx_adapter_file(path, plans, dtype)
        adapter = read_onnx_adapter(path, plans, m["family"])  # shapes, finite values
        shutil.copyfile(path, target)  # the server's own copy: later edits of the source do not matter
        info = {"sites": adapter.sites, "params": adapter.num_params, "format": "onnx_adapter",
                "note": ".onnx_adapter files carry no base identity: checked against the export's IA3 inputs only"}
    else:
        adapter = _read_any_adapter(path, m["family"])
        _check_onnx_identity(adapter, m)
        adapter.check_finite()
        write_onnx_adapter(adapter, plans, target, dtype)  # refuses vectors of other lengths / sites
        info = {"sites": adapter.sites, "params": adapter.num_params, "format": _format_of(path)}
    try:
        rt.load_adapter_file(name, target, source=path)
    except EdgeIA3Error:
        target.unlink(missing_ok=True)
        raise
    rt.templates.record(name, adapter)  # only once loaded; its prompts render as it was trained
    return info


def _read_any_adapter(path: Path, family: str):
    from ..adapter import CANONICAL_FILE

    if path.is_file() and path.suffix == ".gguf":
        from edgeia3.converters.gguf.adapter_file import read_ia3_gguf

        return read_ia3_gguf(path)
    if path.is_dir() and not (path / CANONICAL_FILE).exists():
        from ..formats.peft_dir import read_peft_dir

        return read_peft_dir(path, family=family)
    return load_adapter(path)


def _check_onnx_identity(adapter: Any, manifest: dict) -> None:
    from ..fingerprint import BaseIdentity

    if adapter.family != manifest["family"]:
        raise EdgeIA3Error(f"adapter is for the '{adapter.family}' family but the export's base is "
                           f"'{manifest['family']}'")
    b = manifest.get("base") or {}
    if adapter.base is not None and b.get("fingerprint"):
        ident = BaseIdentity(b["fingerprint"], b.get("content", ""), b.get("name", ""))
        if not adapter.base.matches(ident):
            what = "architecture/shapes" if adapter.base.fingerprint != ident.fingerprint else "weights"
            raise EdgeIA3Error(
                f"adapter was made for another base: its {what} differ (adapter base '{adapter.base.name}' "
                f"{adapter.base.fingerprint}/{adapter.base.content}, this export's base '{ident.name}' "
                f"{ident.fingerprint}/{ident.content})")


def _check_onnx_adapter_file(path: Path, plans: list, dtype: Any) -> None:
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


def _onnx_ia3_dtype(rt: Any) -> Any:
    cached = getattr(rt, "_serve_ia3_dtype", None)
    if cached is None:
        from edgeia3.converters.onnx.export import _np_activation_dtype  # what the export wrote its adapters in

        cached = np.dtype(_np_activation_dtype(rt.path))
        rt._serve_ia3_dtype = cached
    return cached


def _format_of(path: Path) -> str:
    if path.name.endswith(".ia3.gguf") or path.suffix == ".gguf":
        return "ia3.gguf"
    if path.name.endswith(".onnx_adapter"):
        return "onnx_adapter"
    if path.is_dir() and not (path / "edgeia3_adapter.safetensors").exists():
        return "peft"
    return "edgeia3"

