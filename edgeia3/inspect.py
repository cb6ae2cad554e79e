"""Describe what a path holds: adapter, transformers directory, GGUF or ONNX export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .adapter import CANONICAL_FILE
from .errors import EdgeIA3Error
from .manifest import MANIFEST, read_manifest
from .registry import family_for_config
from .weights import deployed_label, trained_label
from .formats import load_adapter


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe(path: str | Path) -> dict[str, Any]:
    """A flat dict of facts about ``path``; raises EdgeIA3Error for unknown content."""
    path = Path(path)
    if not path.exists():
        raise EdgeIA3Error(f"no such file or directory: {path}")
    if path.is_dir():
        if (path / MANIFEST).exists():
            return describe_export(path)
        if (path / CANONICAL_FILE).exists() or (path / "adapter_config.json").exists():
            return describe_adapter(path)
        if (path / "config.json").exists():
            return describe_model_dir(path)
        if (path / "genai_config.json").exists() or list(path.glob("*.onnx")):
            return describe_onnx(path)
        raise EdgeIA3Error(f"{path}: not an adapter, transformers model, or ONNX export directory")
    if path.suffix == ".gguf":
        return describe_gguf(path)
    if path.suffix == ".onnx":
        return describe_onnx(path)
    if path.suffix == ".safetensors":
        return describe_adapter(path)
    raise EdgeIA3Error(f"{path}: unknown file type (expected .gguf, .onnx, .safetensors or a directory)")


def describe_export(path: Path) -> dict[str, Any]:
    """An edgeia3 ONNX or GGUF export directory, from its manifest."""
    from .export import read_export

    info = read_export(path)
    m = info.manifest
    ident = m.base_identity
    out: dict[str, Any] = {
        "kind": f"edgeia3 {info.kind} export ({info.label})",
        "family": m.family,
        "base": m.base.get("name") or m.base.get("spec"),
        "fingerprint": f"{ident.get('fingerprint')}/{ident.get('content')}",
        "model bytes": info.model_bytes,
        "bytes (all files)": _dir_bytes(path),
    }
    if m.weights:
        out["weights"] = deployed_label(m.weights)
    for name, a in m.adapters.items():
        merged = " (merged into the weights)" if name == info.merged else ""
        same = {True: "; runs the weights it was trained on", False: "; trained on OTHER weights (see notes)"}
        out[f"adapter '{name}'"] = (f"sites {', '.join(a.sites)}, {a.params:,} parameters"
                                    + (f", {a.bytes:,} bytes" if a.bytes else "") + merged
                                    + same.get(a.same_weights, ""))
    return out


def describe_adapter(path: Path) -> dict[str, Any]:
    try:
        ad = load_adapter(path)
    except EdgeIA3Error as e:
        if "without edgeia3 metadata" not in str(e):
            raise
        return _describe_bare_peft(path)
    return {
        "kind": "IA3 adapter",
        "family": ad.family,
        "sites": ", ".join(f"{s} ({ad.family_spec.site(s).scaling.value})" for s in ad.sites),
        "layers": len(ad.layers),
        "parameters": ad.num_params,
        "bytes (vectors)": ad.nbytes,
        "bytes (files)": _dir_bytes(path) if path.is_dir() else path.stat().st_size,
        "trained on": trained_label(ad),
        "chat template": _template_label(ad),
        "base": ad.base.name if ad.base else "unknown",
        "base fingerprint": f"{ad.base.fingerprint}/{ad.base.content}" if ad.base else "unknown",
    }


def _template_label(ad: Any) -> str | None:
    """The chat template the adapter recorded at training, named when it is a built-in one."""
    from .prompts import NAMED_TEMPLATES, recorded_template

    t = recorded_template(ad)
    if t is None:
        return None
    name = next((n for n, text in NAMED_TEMPLATES.items() if text == t), None)
    return f"{name} (built-in)" if name else f"recorded ({len(t)} characters)"


def _describe_bare_peft(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    cfg = json.loads((path / "adapter_config.json").read_text())
    with safe_open(str(path / "adapter_model.safetensors"), "np") as st:
        n = sum(st.get_slice(k).get_shape()[0] * st.get_slice(k).get_shape()[1] for k in st.keys())
        tensors = len(list(st.keys()))
    return {
        "kind": f"PEFT {cfg.get('peft_type')} adapter (no edgeia3 metadata)",
        "family": "unknown (decided by the base it is used with)",
        "target modules": ", ".join(cfg.get("target_modules") or []),
        "feed-forward (input-scaled)": ", ".join(cfg.get("feedforward_modules") or []),
        "tensors": tensors,
        "parameters": int(n),
        "bytes (files)": _dir_bytes(path),
        "base": cfg.get("base_model_name_or_path") or "unknown",
    }


def describe_model_dir(path: Path) -> dict[str, Any]:
    from .fingerprint import hf_config, identity_of_dir, num_layers

    cfg = json.loads((path / "config.json").read_text())
    fam = family_for_config(cfg)
    ident = identity_of_dir(path, fam)
    out: dict[str, Any] = {
        "kind": "transformers model directory",
        "family": fam.name,
        "model type": cfg.get("model_type"),
        "layers": num_layers(hf_config(path)),
        "IA3 sites": ", ".join(f"{s.name} ({s.scaling.value})" for s in fam.sites),
        "default IA3 targets": ", ".join(fam.default_targets),
        "bytes": _dir_bytes(path),
        "fingerprint": f"{ident.fingerprint}/{ident.content}",
    }
    merge_info = path / "edgeia3_merge.json"
    if merge_info.exists():
        m = json.loads(merge_info.read_text())
        out["merged adapter"] = f"{m['adapter']} (sites {', '.join(m['adapter_sites'])}, into {m['merged_into']})"
    return out


def describe_gguf(path: Path) -> dict[str, Any]:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError/struct errors on corrupt files
        raise EdgeIA3Error(f"{path} is not a readable GGUF file: {e}") from e

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        if f is None:
            return None
        return f.contents()

    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    arch = field("general.architecture")
    family = fingerprint = sites = None
    if field("general.type") in (None, "model"):
        from edgeia3.converters.gguf.base_gguf import GGUFBase

        try:
            gb = GGUFBase(path)
            family, fingerprint = gb.family.name, f"{gb.identity.fingerprint}/{gb.identity.content}"
        except EdgeIA3Error as e:
            family = f"unsupported ({e})"
    elif field("adapter.type") == "ia3":
        from edgeia3.converters.gguf.adapter_file import read_ia3_gguf

        ad = read_ia3_gguf(path)
        family, sites = ad.family, ", ".join(ad.sites)
        fingerprint = f"{ad.base.fingerprint}/{ad.base.content} (its base)" if ad.base else None
    return {
        "kind": f"GGUF {field('general.type') or 'model'}",
        "architecture": arch,
        "family": family,
        "name": field("general.name"),
        "layers": field(f"{arch}.block_count"),
        "adapter type": field("adapter.type"),
        "IA3 sites": sites,
        "tensors": len(reader.tensors),
        "tensor types": ", ".join(f"{k}x{v}" for k, v in sorted(types.items())),
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "bytes": path.stat().st_size,
        "fingerprint": fingerprint,
    }


def describe_onnx(path: Path) -> dict[str, Any]:
    import onnx

    files = [path] if path.is_file() else sorted(path.glob("*.onnx"))
    if not files:
        raise EdgeIA3Error(f"{path}: no .onnx model found")
    try:
        model = onnx.load(str(files[0]), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends on corrupt files
        raise EdgeIA3Error(f"{files[0]} is not a readable ONNX model: {e}") from e
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    root = path if path.is_dir() else path.parent
    out: dict[str, Any] = {
        "kind": "ONNX model",
        "graph inputs": len(model.graph.input),
        "initializers": len(model.graph.initializer),
        "top ops": ", ".join(f"{k}x{v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:6]),
        "bytes": _dir_bytes(root) if path.is_dir() else path.stat().st_size,
    }
    if (root / MANIFEST).exists():
        m = read_manifest(root)
        out.update({"family": m.family, "precision": m.precision, "adapters": ", ".join(m.adapters),
                    "fingerprint": m.fingerprint})
    return out
