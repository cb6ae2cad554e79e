"""A GGUF as transformers loads it, and a transformers base as llama.cpp quantizes it: the two
conversions ``edgeia3.base`` caches (under the cache folders it passes in), so a base is
dequantized or quantized once and every step reads the same files."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from edgeia3.atomic import atomic_dir, atomic_file
from edgeia3.errors import EdgeIA3Error
from edgeia3.fingerprint import hf_config
from edgeia3.registry import Family, family_for_gguf_arch

from .file_types import file_type
from .ggml_index import GGUFIndex, file_digest


def gguf_to_hf_dir(gguf: Path, cache: Path) -> Path:
    """Dequantize a GGUF into a transformers directory under ``cache`` (once per file)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise EdgeIA3Error(f"GGUF file not found: {gguf}")
    out = cache / f"{gguf.stem}-{file_digest(gguf)}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = _complete_gguf_config(gguf, AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config)
    except Exception as e:  # transformers raises many types for unsupported/corrupt files
        raise EdgeIA3Error(f"transformers cannot load GGUF {gguf}: {e}") from e
    # The weights are already dequantized; transformers refuses to save a model
    # that still carries the GGUF quantizer and its config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "edgeia3_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    return out


def _complete_gguf_config(gguf: Path, config: Any) -> Any:
    """Sizes transformers' GGUF reader leaves at its config defaults for some
    architectures (qwen3's head_dim, gpt2's context length, Gemma's attention
    scale), taken from the file: the model is what llama.cpp computes from it."""
    index = GGUFIndex(gguf)
    misread = family_for_gguf_arch(index.arch).gguf_misread
    why = misread(set(index.tensors)) if misread else None
    if why:
        raise EdgeIA3Error(f"{gguf}: transformers' GGUF reader would build another model from this file ({why}); "
                           "train on the transformers directory it was converted from")
    key_length = index.arch_int("attention.key_length", 0)
    if key_length and getattr(config, "head_dim", None) not in (None, key_length):
        config.head_dim = key_length
    if key_length and getattr(config, "query_pre_attn_scalar", None) not in (None, key_length):
        config.query_pre_attn_scalar = key_length  # llama.cpp's Gemma scales attention by head_dim
    context = index.arch_int("context_length", 0)
    if context:
        config.max_position_embeddings = context
    return config


def quantized_gguf(hf_dir: Path, gguf: Path | None, quant: str, cache: Path) -> Path:
    """The base quantized by llama.cpp to ``quant``, cached under ``cache``: one file per (base,
    quant). ``hf_dir`` is the transformers base (a GGUF base's dequantized twin), ``gguf`` the
    GGUF it came from (None for a transformers base); see ``edgeia3.base.quantized_gguf``."""
    from .hf_writer import write_hf_gguf
    from .quantize import quantize

    pure = file_type(quant).pure
    if gguf is not None:
        stem, digest = gguf.stem, file_digest(gguf)
    else:
        h = hashlib.sha256()
        for f in sorted(hf_dir.glob("*.json")) + sorted(hf_dir.glob("*.safetensors")):
            h.update(f.name.encode() + file_digest(f).encode())
        stem, digest = hf_dir.name, h.hexdigest()[:16]
    out = cache / f"{stem}-{digest}-{quant}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".f32-") as tmp, atomic_file(out, force=True) as dst:
        f32 = Path(tmp) / "model.f32.gguf"
        write_hf_gguf(hf_dir, f32, dtype="f32")
        quantize(f32, dst, quant, pure=pure)
    return out


def gguf_writable(hf_dir: Path, family: Family) -> bool:
    """edgeia3's GGUF writer takes this base: a local dir whose tokenizer is BPE, SentencePiece
    or absent, and a config llama.cpp computes like transformers (the family's gguf_hparams)."""
    import gguf

    from .vocab import tokenizer_kind

    if not hf_dir.is_dir() or tokenizer_kind(hf_dir) is None:
        return False  # a hub id has nothing local to write from
    try:
        family.gguf_hparams(hf_config(hf_dir), gguf.GGUFWriter(None, family.gguf_arch))
    except EdgeIA3Error:
        return False
    return True
