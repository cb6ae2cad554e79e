"""Base-model identity: which base an adapter belongs to.

``fingerprint`` hashes the structure (family, model type, layer count, hidden
size, vocabulary, and the logical [out, in] shape of every IA3-capable module),
so an adapter for another architecture or size is caught. ``content`` hashes a
few weights that no quantizer touches (final norm, first embedding rows, as
fp16), so a same-shaped but different base (e.g. base vs instruct) is caught
too, while the fp32 and NF4 loads of one base agree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EdgeIA3Error
from .registry import Family

EMBED_ROWS = 8


@dataclass(frozen=True)
class BaseIdentity:
    fingerprint: str
    content: str
    name: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "BaseIdentity | None":
        return cls(**d) if d else None

    def matches(self, other: "BaseIdentity") -> bool:
        return self.fingerprint == other.fingerprint and self.content == other.content


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def structural_hash(family: Family, config: Any, shapes: dict[str, tuple[int, int]]) -> str:
    """Hash of the structure. ``config`` is a transformers config object (its
    attribute map resolves per-model key names, e.g. gpt2's n_layer) or any
    object with the same attributes (a GGUF base's view)."""
    doc = {
        "family": family.name,
        # the family's own name for the architecture: a mistral dir and its GGUF (written
        # as llama, loaded back by transformers as llama) are one structure
        "model_type": family.model_types[0],
        "layers": int(config.num_hidden_layers),
        "hidden": int(config.hidden_size),
        "vocab": config.vocab_size,
        "shapes": sorted((k, list(v)) for k, v in shapes.items()),
    }
    return _sha(json.dumps(doc, sort_keys=True).encode())


def content_hash(norm: np.ndarray, embed_rows: np.ndarray) -> str:
    """``norm`` as llama.cpp stores it (``Family.gguf_norm_shift`` added): a transformers
    dir, its GGUF and that GGUF loaded back by transformers then hash the same bits
    (subtracting and re-adding 1.0 is exact in float32 where adding it was not)."""
    parts = [np.ascontiguousarray(a, dtype=np.float16).tobytes() for a in (norm, embed_rows)]
    return _sha(b"".join(parts))


def num_layers(config: Any) -> int:
    return int(config.num_hidden_layers)


def hf_config(path: str | Path) -> Any:
    """The transformers config of a model directory (offline), as a clear error if unreadable."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgeIA3Error(f"{path}: unreadable config.json ({e})") from None


def _module_names(family: Family, layers: int) -> list[str]:
    sites = sorted({(family.stack_of(s), s.module): s for s in family.sites}.items())
    return [family.module_path(i, s) for i in range(layers) for _, s in sites]


def module_shape(module: Any, conv1d: bool) -> tuple[int, int]:
    """Logical [out, in] of a Linear, bnb Linear4bit or GPT-2 Conv1D module."""
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return int(module.out_features), int(module.in_features)
    w = module.weight.shape
    return (int(w[1]), int(w[0])) if conv1d else (int(w[0]), int(w[1]))


def identity_of_model(model: Any, family: Family, name: str = "") -> BaseIdentity:
    """Identity of a loaded transformers model (fp32 or bitsandbytes 4-bit)."""
    config = model.config
    shapes = {
        m: module_shape(model.get_submodule(m), family.conv1d)
        for m in _module_names(family, num_layers(config))
    }
    norm = model.get_parameter(family.final_norm).detach().float().cpu().numpy() + np.float32(family.gguf_norm_shift)
    embed = model.get_parameter(family.embed)[:EMBED_ROWS].detach().float().cpu().numpy()
    return BaseIdentity(structural_hash(family, config, shapes), content_hash(norm, embed), name)


def identity_of_dir(path: str | Path, family: Family, name: str = "") -> BaseIdentity:
    """Identity of a transformers directory from safetensors headers (no model load)."""
    from safetensors import safe_open

    path = Path(path)
    config = hf_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EdgeIA3Error(f"{path} has no .safetensors weights")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(f, "np") as st:
            where.update({k: f for k in st.keys()})

    def get(name: str, shape_only: bool = False) -> Any:
        if name not in where:
            raise EdgeIA3Error(f"{path}: tensor {name} missing; not a {family.name} checkpoint?")
        with safe_open(where[name], "pt") as st:
            sl = st.get_slice(name)
            return tuple(sl.get_shape()) if shape_only else sl[:].float().numpy()

    def shape(module: str) -> tuple[int, int]:
        w = get(f"{module}.weight", shape_only=True)
        return (int(w[1]), int(w[0])) if family.conv1d else (int(w[0]), int(w[1]))

    shapes = {m: shape(m) for m in _module_names(family, num_layers(config))}
    embed = get(family.embed)[:EMBED_ROWS]
    norm = get(family.final_norm) + np.float32(family.gguf_norm_shift)
    return BaseIdentity(structural_hash(family, config, shapes), content_hash(norm, embed), name)



