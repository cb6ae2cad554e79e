"""transformers directory -> GGUF (f32 or f16) with gguf-py, for llama.cpp.

Tensor names come from gguf-py's own HF->GGUF name map (the one llama.cpp's
converter uses). Each family's hyperparameters and tensor conventions come from
its registry entry (``Family.gguf_hparams``, ``gguf_norm_shift``, ``conv1d``,
``Site.gguf_permute``). The identity of the transformers base is recorded (``edgeia3.source.*``) so
adapters made for it are accepted by the GGUF even after its embedding is
quantized. Quantization is llama.cpp's job (quantize.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeia3.atomic import atomic_file
from edgeia3.errors import EdgeIA3Error
from edgeia3.fingerprint import BaseIdentity, hf_config, identity_of_dir, num_layers
from edgeia3.registry import Family, families, family_for_config

from .file_types import WRITER_TYPES, file_type
from .ggml_index import tensor_name_map
from .plan import rope_permute
from .vocab import choose_pre_tokenizer, write_vocab

DTYPES = WRITER_TYPES  # the file-type table's writer types


@dataclass
class WrittenGGUF:
    path: Path
    family: Family
    source: BaseIdentity
    tokenizer: str  # what was written for the tokenizer
    pre_verified: bool


def _hparams(config: Any, family: Family, dtype: str) -> Callable[[Any], None]:
    """A function adding the family's architecture metadata (registry) to a GGUFWriter."""

    def add(w: Any) -> None:
        # the directory's name, not its path: llama.cpp reads meaning into some names (phi3)
        w.add_name(Path(getattr(config, "_name_or_path", "") or family.name).name)
        family.gguf_hparams(config, w)
        w.add_file_type(file_type(dtype).ftype)

    return add


def _tensors(hf_dir: Path, config: Any, family: Family):
    """(name, float32 numpy array) of every checkpoint tensor as llama.cpp's converter
    writes it: the family's rewrite (registry), else as is with a tied head dropped
    (llama.cpp reuses token_embd as the output matrix)."""
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise EdgeIA3Error(f"{hf_dir} has no .safetensors weights")
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), "pt") as st:
            names.update(st.keys())
    tied = getattr(config, "tie_word_embeddings", False)
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                data = st.get_tensor(k).float().numpy()
                if family.gguf_rewrite:
                    yield from family.gguf_rewrite(config, k, data, names)
                elif not (k == "lm_head.weight" and tied):
                    yield k, data


def write_hf_gguf(hf_dir: str | Path, out: str | Path, dtype: str = "f32") -> WrittenGGUF:
    """Write the transformers model at ``hf_dir`` as a GGUF file ``out`` (f32 or f16)."""
    import gguf

    hf_dir, out = Path(hf_dir), Path(out)
    if dtype not in DTYPES:
        raise EdgeIA3Error(f"GGUF writer dtype must be one of {', '.join(DTYPES)}")
    config = hf_config(hf_dir)
    family = family_for_config(config)
    if not family.gguf_writer:
        ok = ", ".join(sorted(f.name for f in families().values() if f.gguf_writer))
        raise EdgeIA3Error(f"edgeia3 writes GGUF from transformers only for {ok}; convert '{family.name}' with "
                           "llama.cpp's convert_hf_to_gguf.py and pass the .gguf as --base")
    add_hparams = _hparams(config, family, dtype)
    add_hparams(gguf.GGUFWriter(None, family.gguf_arch))  # refuses an unsupported config before any work
    source = identity_of_dir(hf_dir, family, hf_dir.name)
    n_layers = num_layers(config)
    names = tensor_name_map(family.gguf_arch, n_layers)
    heads = {"q": config.num_attention_heads, "k": getattr(config, "num_key_value_heads", None)
             or config.num_attention_heads}
    permute = {family.module_path(i, s): heads[s.gguf_permute]
               for i in range(n_layers) for s in family.sites if s.gguf_permute}
    # GPT-2's Conv1D modules store [in, out]; GGUF wants [out, in] like a Linear.
    conv1d = {family.module_path(i, s) for i in range(n_layers) for s in family.sites} \
        if family.conv1d else set()
    pre, verified = choose_pre_tokenizer(hf_dir, family.gguf_pre_tokenizers, family.gguf_arch,
                                         config.vocab_size, add_hparams)

    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), family.gguf_arch)
        add_hparams(w)
        note = write_vocab(w, hf_dir, config.vocab_size, pre=pre)
        w.add_string("edgeia3.source.fingerprint", source.fingerprint)
        w.add_string("edgeia3.source.content", source.content)
        w.add_string("edgeia3.source.name", source.name)
        for hf_name, data in _tensors(hf_dir, config, family):
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise EdgeIA3Error(f"{hf_dir}: no GGUF name for tensor {hf_name} ({family.gguf_arch})")
            module = hf_name.rsplit(".", 1)[0]
            if module in permute:  # llama-style RoPE pairs rows differently from HF
                data = rope_permute_rows(data, permute[module])
            if module in conv1d and data.ndim == 2:
                data = data.T
            if hf_name.endswith("norm.weight"):  # llama.cpp's converter shifts every such norm
                data = data + np.float32(family.gguf_norm_shift)
            if data.ndim > 1 and dtype == "f16":
                data = data.astype(np.float16)
            w.add_tensor(name, np.ascontiguousarray(data))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    if not verified and "placeholder" not in note:
        note += " (unverified: llama.cpp tokenizes differently from transformers)"
    return WrittenGGUF(out, family, source, note, verified)


def rope_permute_rows(w: np.ndarray, groups: int) -> np.ndarray:
    """Permute the rows (axis 0) of a weight or bias like rope_permute does for vectors."""
    if w.ndim == 1:
        return rope_permute(w, groups)
    return w.reshape(groups, 2, w.shape[0] // groups // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
