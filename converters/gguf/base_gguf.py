"""A GGUF file as a base model: its family, identity, and adapter validation.

A ``GGUFBase`` states its module shapes and identities (``edgeia3.validate.BaseShape``), so
``validate_adapter`` checks an adapter against the GGUF's own tensor shapes: a GGUF base is
never dequantized or loaded into torch just to check an adapter.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edgeia3.adapter import IA3Adapter, fused_layout_for
from edgeia3.errors import EdgeIA3Error
from edgeia3.fingerprint import EMBED_ROWS, BaseIdentity, content_hash, structural_hash
from edgeia3.formats import load_adapter
from edgeia3.registry import Family, Site, family_for_gguf_arch
from edgeia3.validate import validate_adapter

from .ggml_index import OUTPUT_NORM, TOKEN_EMBD, GGUFIndex, tensor_name_map
from .plan import gguf_config


class GGUFBase:
    """A GGUF base model file: index, family, identities, HF-like config."""

    def __init__(self, path: str | Path, name: str = ""):
        self.path = Path(path)
        self.index = GGUFIndex(self.path)
        if self.index.kv.get("general.type") == "adapter":
            raise EdgeIA3Error(f"{self.path} is an adapter GGUF, not a base model")
        self.family: Family = family_for_gguf_arch(self.index.arch)
        self.config = gguf_config(self.index, self.family)
        # the final norm and embedding the identity hashes, under this family's GGUF names
        self.norm_tensor = _gguf_name(self.family, self.family.final_norm, OUTPUT_NORM)
        self.embed_tensor = _gguf_name(self.family, self.family.embed, TOKEN_EMBD)
        self.name = name or self.path.name
        self.identity = self._identity()

    def _identity(self) -> BaseIdentity:
        """Identity from the libggml index; equals the identity of the transformers model
        loaded from this GGUF (same structure, same unquantized norm / dequantized rows)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

        idx, fam = self.index, self.family
        shapes = {}
        for i in range(self.config.num_hidden_layers):
            for s in fam.sites:
                ne = idx.tensor(s.gguf_tensor.format(i=i) + ".weight").ne
                shapes[fam.module_path(i, s)] = (ne[1], ne[0])
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        embd = idx.tensor(self.embed_tensor)
        qt = GGMLQuantizationType(embd.type)
        block, size = GGML_QUANT_SIZES[qt]
        row_bytes = embd.ne[0] // block * size
        raw = np.array(mm[embd.offset: embd.offset + EMBED_ROWS * row_bytes]).reshape(EMBED_ROWS, row_bytes)
        float_dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(qt)
        rows = raw.view(float_dtype) if float_dtype else quants.dequantize(raw, qt)
        norm_t = idx.tensor(self.norm_tensor)
        norm = np.array(mm[norm_t.offset: norm_t.offset + norm_t.nbytes]).view(np.float32)
        del mm
        config = SimpleNamespace(model_type=fam.model_types[0], num_hidden_layers=self.config.num_hidden_layers,
                                 hidden_size=self.config.hidden_size, vocab_size=int(embd.ne[1]))
        return BaseIdentity(structural_hash(fam, config, shapes), content_hash(norm, rows), self.name)

    @property
    def identities(self) -> list[BaseIdentity]:
        """This file's own identity, plus the transformers base edgeia3 converted it from
        (recorded at export; quantizing the embedding changes the content hash)."""
        kv = self.index.kv
        out = [self.identity]
        if kv.get("edgeia3.source.fingerprint"):
            out.append(BaseIdentity(kv["edgeia3.source.fingerprint"], kv["edgeia3.source.content"],
                                    kv.get("edgeia3.source.name", "")))
        return out

    @property
    def heads(self) -> dict[str, int]:
        return {"q": self.config.num_attention_heads, "k": self.config.num_key_value_heads}

    def load_adapter(self, path: str | Path, check_identity: bool = True) -> IA3Adapter:
        """Read any adapter form (edgeia3, PEFT dir, ``.ia3.gguf``) and validate it here."""
        path = Path(path)
        if path.suffix == ".gguf":
            from .adapter_file import read_ia3_gguf

            adapter = read_ia3_gguf(path)
        else:
            adapter = load_adapter(path, base_config=self.config)
        if not adapter.fused_layout:
            adapter = dataclasses.replace(adapter, fused_layout=fused_layout_for(self.family, self.config))
        self.validate(adapter, check_identity)
        return adapter

    def module_shape(self, layer: int, site: Site) -> tuple[int, int]:
        """Logical [out, in] of ``site``'s tensor (ggml's ne is [in, out])."""
        ne = self.index.tensor(site.gguf_tensor.format(i=layer) + ".weight").ne
        return int(ne[1]), int(ne[0])

    def validate(self, adapter: IA3Adapter, check_identity: bool = True) -> None:
        validate_adapter(adapter, self, check_identity)


def _gguf_name(family: Family, hf_name: str, default: str) -> str:
    """``hf_name``'s tensor name in llama.cpp's files (gguf-py's map), else ``default``."""
    return tensor_name_map(family.gguf_arch).get_name(hf_name, try_suffixes=(".weight",)) or default

