"""PEFT's IA3 directory format <-> canonical adapter.

PEFT stores one ``ia3_l`` tensor per targeted module under
``base_model.model.<module>.ia3_l``: shape (out, 1) for modules that scale
their output, (1, in) for ``feedforward_modules`` (input). A fused module
(phi3 qkv_proj, gpt2 c_attn) holds one vector for all its sites; reading
splits it by the registry's row slices and drops slices that are exactly
ones (identity); writing pads missing slices with ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..adapter import CANONICAL_FILE, IA3Adapter, IA3Vector, fused_layout_for, read_adapter_safetensors
from ..errors import EdgeIA3Error
from ..registry import Family, Scaling, Site, family_for_config, get_family

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUFFIX = ".ia3_l"


def peft_target_modules(family: Family, sites: list[str]) -> tuple[list[str] | str, list[str] | str]:
    """PEFT ``target_modules`` and ``feedforward_modules``: module paths in a layer, or - for a
    family with several layer stacks (T5: the same module names in encoder and decoder) -
    regexes over full module paths, PEFT's other form, so each stack is targeted on its own."""
    if any(s.stack for s in family.sites):
        def regex(chosen: list[Site]) -> str:
            parts = sorted({rf"{re.escape(family.stack_of(s))}\.\d+\.{re.escape(s.module)}" for s in chosen})
            return "(?:" + "|".join(parts) + ")" if parts else "(?!)"

        chosen = [family.site(n) for n in sites]
        return regex(chosen), regex([s for s in chosen if s.scaling is Scaling.INPUT])
    targets, feedforward = [], []
    for name in sites:
        s = family.site(name)
        if s.module not in targets:
            targets.append(s.module)
        if s.scaling is Scaling.INPUT and s.module not in feedforward:
            feedforward.append(s.module)
    return targets, feedforward


def _module_scaling(config: dict, module: str) -> Scaling:
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):  # PEFT also accepts a regex
        return Scaling.INPUT if re.fullmatch(ff, module) else Scaling.OUTPUT
    return Scaling.INPUT if any(module == m or module.endswith("." + m) for m in ff) else Scaling.OUTPUT


def _read_config(path: Path) -> dict:
    """adapter_config.json, checked as PEFT would (feed-forward modules, peft_type)."""
    file = path / CONFIG_FILE
    try:
        peft_cfg = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise EdgeIA3Error(f"{file} is not valid JSON: {e}") from e
    if not isinstance(peft_cfg, dict):
        raise EdgeIA3Error(f"{file} holds a JSON {type(peft_cfg).__name__}, not an object")
    ff = peft_cfg.get("feedforward_modules")
    if not (ff is None or isinstance(ff, str) or isinstance(ff, list) and all(isinstance(m, str) for m in ff)):
        raise EdgeIA3Error(f"{file}: feedforward_modules must be a list of module names or a regex")
    if isinstance(ff, str):
        try:
            re.compile(ff)
        except (re.error, RecursionError) as e:
            raise EdgeIA3Error(f"{file}: feedforward_modules is not a valid regex ({e})") from e
    targets = peft_cfg.get("target_modules")
    if isinstance(ff, list) and isinstance(targets, list):
        # PEFT's own rule (IA3Config): a feed-forward module must also be a target (names match by suffix)
        names = [str(t) for t in targets]
        stray = [m for m in ff if not any(t == m or t.endswith("." + m) or m.endswith("." + t) for t in names)]
        if stray:
            raise EdgeIA3Error(f"{file}: feedforward_modules {stray} are not among target_modules "
                               f"{names}; PEFT requires them to be a subset")
    if peft_cfg.get("peft_type") != "IA3":
        raise EdgeIA3Error(f"{path} holds a {' '.join(str(peft_cfg.get('peft_type')).split())} adapter, not IA3")
    return peft_cfg


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    return read_adapter_safetensors(path / WEIGHTS_FILE)[0]  # size-capped, shapes checked before data


def _vectors(path: Path, fam: Family, layout: dict, peft_cfg: dict,
             tensors: dict[str, np.ndarray]) -> list[IA3Vector]:
    """The canonical vectors of PEFT's tensors: one per site (fused modules split by ``layout``)."""
    vectors, seen = [], set()
    for key, arr in tensors.items():
        found = fam.locate(key[len(PREFIX):-len(SUFFIX)]) if key.startswith(PREFIX) and key.endswith(SUFFIX) \
            else None
        if found is None:
            raise EdgeIA3Error(f"{path}: tensor {key!r} is not an IA3 site of family '{fam.name}'")
        layer, sites = found
        module = sites[0].module
        if key in seen:
            raise EdgeIA3Error(f"{path}: tensor {key} repeats layer {layer} module {module}")
        seen.add(key)
        if arr.dtype.kind != "f" or arr.size == 0:
            raise EdgeIA3Error(f"{path}: {key} is an empty or non-float ({arr.dtype}) tensor")
        scaling = _module_scaling(peft_cfg, key[len(PREFIX):-len(SUFFIX)])
        values = arr.astype(np.float32).ravel()
        expected_shape = (1, values.size) if scaling is Scaling.INPUT else (values.size, 1)
        if tuple(arr.shape) != expected_shape:
            raise EdgeIA3Error(f"{path}: {key} has shape {tuple(arr.shape)}, PEFT IA3 expects {expected_shape}")
        if len(sites) == 1 and sites[0].fused_rows is None:
            vectors.append(IA3Vector(layer, sites[0].name, scaling, values))
            continue
        # A fused module: split by row ranges, which come from the base config.
        if not layout:
            raise EdgeIA3Error(f"{path}: splitting fused module {module} into sites needs the base model")
        for s in sites:
            a, b, _ = layout[s.name]
            part = values[a:b]
            if not np.all(part == 1.0):
                vectors.append(IA3Vector(layer, s.name, scaling, part.copy()))
    return vectors


def read_peft_dir(path: str | Path, family: str | None = None, config: Any = None) -> IA3Adapter:
    """Read a PEFT IA3 adapter directory (edgeia3's own metadata, if present, wins).

    A bare PEFT directory does not say its architecture: ``family`` (or a base
    ``config``, which also gives the row ranges of fused modules) is required.
    """
    path = Path(path)
    if (path / CANONICAL_FILE).exists():
        return IA3Adapter.load(path / CANONICAL_FILE)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / f).exists():
            raise EdgeIA3Error(f"{path} is not an IA3 adapter directory: {f} is missing")
    peft_cfg = _read_config(path)
    tensors = _read_tensors(path)
    if family is None and config is None:
        raise EdgeIA3Error(
            f"{path} is a PEFT IA3 directory without edgeia3 metadata, so its architecture is "
            "unknown: give its base model (--base) so it can be read"
        )
    fam = get_family(family) if family else family_for_config(config)
    layout = fused_layout_for(fam, config) if config is not None else {}
    adapter = IA3Adapter(fam.name, _vectors(path, fam, layout, peft_cfg, tensors), fused_layout=layout,
                         extra={"peft_base_model": peft_cfg.get("base_model_name_or_path")})
    try:
        adapter.check_finite()
    except EdgeIA3Error as e:
        raise EdgeIA3Error(f"{path}: {e}") from e
    return adapter


def write_peft_dir(adapter: IA3Adapter, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write PEFT's IA3 directory plus edgeia3's canonical file beside it."""
    from safetensors.numpy import save_file

    adapter.check_finite()
    fam = adapter.family_spec
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    scalings: dict[str, Scaling] = {}  # per module path inside a layer
    key_module: dict[str, str] = {}
    for v in adapter.vectors:
        site = fam.site(v.site)
        key = f"{PREFIX}{fam.module_path(v.layer, site)}{SUFFIX}"
        key_module[key] = site.module
        if scalings.setdefault(site.module, v.scaling) is not v.scaling:
            raise EdgeIA3Error(f"sites of module {site.module} disagree on input/output scaling")
        if site.fused_rows is None:
            tensors[key] = v.values.astype(np.float32)
            continue
        if v.site not in adapter.fused_layout:
            raise EdgeIA3Error(f"adapter lacks the fused layout of site {v.site}; rebuild it against its base")
        a, b, total = adapter.fused_layout[v.site]
        full = tensors.setdefault(key, np.ones(total, dtype=np.float32))
        full[a:b] = v.values
    for key, vec in tensors.items():
        tensors[key] = vec.reshape(1, -1) if scalings[key_module[key]] is Scaling.INPUT else vec.reshape(-1, 1)
    targets = list(scalings)
    feedforward = [m for m in targets if scalings[m] is Scaling.INPUT]
    if any(s.stack for s in fam.sites):
        targets, feedforward = peft_target_modules(fam, sorted({v.site for v in adapter.vectors}))
    config = {
        "peft_type": "IA3",
        "task_type": fam.peft_task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": targets,
        "feedforward_modules": feedforward,
        "fan_in_fan_out": fam.conv1d,
        "init_ia3_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    save_file(tensors, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    adapter.save(path / CANONICAL_FILE)
    return path


def to_peft_model(model: Any, adapter: IA3Adapter) -> Any:
    """Wrap a transformers model with ``adapter`` through PEFT (the PyTorch reference)."""
    import tempfile

    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        write_peft_dir(adapter, tmp)
        return PeftModel.from_pretrained(model, tmp)
