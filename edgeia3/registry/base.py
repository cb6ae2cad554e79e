"""Registry data types and lookup."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import EdgeIA3Error


class Scaling(str, enum.Enum):
    """Where an IA3 vector multiplies (PEFT semantics).

    OUTPUT: ``W x * l`` (rows of W and the bias are scaled) - attention sites.
    INPUT:  ``W (x * l)`` (columns of W are scaled) - feed-forward sites.
    """

    OUTPUT = "output"
    INPUT = "input"


# A function of the HF config giving the [start, stop) output rows of a site
# inside a fused module (phi3 qkv_proj, gpt2 c_attn).
SliceFn = Callable[[Any], "tuple[int, int]"]


@dataclass(frozen=True)
class Site:
    """One place inside a transformer layer where an IA3 vector can act."""

    name: str  # canonical name used by every format: q, k, v, o, gate, up, down
    module: str  # HF module path inside a layer, e.g. "self_attn.k_proj"
    scaling: Scaling  # PEFT's default for this module (down: INPUT, others: OUTPUT)
    fused_rows: SliceFn | None = None  # rows of a fused module's output
    gguf_tensor: str | None = None  # GGUF weight name, "{i}" = layer
    gguf_permute: str | None = None  # RoPE row permutation in llama.cpp: "q" or "k"
    onnx_node: str | None = None  # onnxruntime-genai builder MatMul node name, "{i}" = layer
    # The builder node that fuses this site with siblings (q, k, v -> qkv_proj) and
    # this site's [start, stop) rows in its output; used unless fusion is disabled.
    onnx_fused_node: str | None = None
    onnx_fused_rows: SliceFn | None = None
    # An INPUT-scaled site whose scaling equals scaling the output rows of another site
    # (gated MLP: down(act(gate x) * up x * l) == down(act(gate x) * (l * up x))): its name.
    input_fold: str | None = None
    # The layer list this site lives in when not the family's ``layers`` (encoder-decoder
    # models: "decoder.block" next to the family's "encoder.block").
    stack: str | None = None
    # An INPUT-scaled site of an MLP whose activation is chosen by the checkpoint (T5: gated
    # GELU when ``wi_0`` exists, else ReLU): the GGUF tensor whose rows absorb its scale
    # ("{i}" = layer), and the gate tensor whose presence makes that fold exact for any
    # scale; without the gate the MLP is ReLU, where l * relu(z) == relu(l * z) needs l > 0.
    gguf_fold_rows: str | None = None
    gguf_fold_gate: str | None = None


@dataclass(frozen=True)
class Family:
    """Everything edgeia3 needs to know about one architecture family."""

    name: str
    model_types: tuple[str, ...]  # HF config.model_type values it covers
    layers: str  # module path of the layer list, e.g. "model.layers"
    sites: tuple[Site, ...]
    default_targets: tuple[str, ...]  # PEFT's default IA3 targets, as site names
    embed: str  # embedding weight name (fingerprint content hash)
    final_norm: str  # final norm weight name (fingerprint content hash)
    conv1d: bool = False  # weights stored [in, out] (GPT-2 Conv1D)
    gated_mlp: bool = True  # down(act(gate x) * up x): down's input == up's rows
    gguf_arch: str | None = None
    # Adds this family's GGUF hyperparameters to a gguf.GGUFWriter, llama.cpp's way
    # (gguf_hparams.py); None: edgeia3's transformers -> GGUF writer does not handle it.
    gguf_hparams: Callable[[Any, Any], None] | None = None
    # llama.cpp stores RMSNorm weights as shift + w (Gemma's norms compute x * (1 + w)).
    gguf_norm_shift: float = 0.0
    # llama.cpp pre-tokenizer names to try for its BPE tokenizers, checked against HF's
    gguf_pre_tokenizers: tuple[str, ...] = ()
    # The transformers auto class that loads the whole model with its head, and PEFT's task.
    auto_model: str = "AutoModelForCausalLM"
    peft_task_type: str = "CAUSAL_LM"
    # A config check run when a base is loaded: raises EdgeIA3Error for a model of this
    # family's model type that edgeia3 cannot describe (e.g. an encoder-only T5).
    check_config: Callable[[Any], None] | None = None
    # config.json (dict) -> the config.json onnxruntime-genai's builder must read to build
    # what transformers computes (onnx_config.py); raises EdgeIA3Error where it cannot.
    onnx_config: Callable[[dict], dict] | None = None
    # (config, HF tensor name, float32 array, all checkpoint names) -> the (HF name, array)
    # pairs to write to GGUF instead, llama.cpp's way (T5: one shared embedding, the head
    # pre-scaled as transformers scales it); None: every tensor as is, a tied head dropped.
    gguf_rewrite: Callable[[Any, str, Any, set], list] | None = None
    # GGUF tensor names -> why transformers' own GGUF reader would build another model from
    # such a file (None: it reads it right); loading that GGUF as a base is then refused.
    gguf_misread: Callable[[set], str | None] | None = None

    @property
    def encoder_decoder(self) -> bool:
        """An encoder-decoder model (T5): its runtimes encode the source once, then decode."""
        return self.auto_model == "AutoModelForSeq2SeqLM"

    @property
    def gguf_writer(self) -> bool:
        return self.gguf_hparams is not None

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.sites)
        raise EdgeIA3Error(f"family '{self.name}' has no IA3 site '{name}' (known: {known})")

    def site_for_module(self, module: str) -> list[Site]:
        """Sites living in an HF module path inside a layer (several if fused)."""
        return [s for s in self.sites if s.module == module]

    def stack_of(self, site: Site) -> str:
        return site.stack or self.layers

    def locate(self, path: str) -> tuple[int, list[Site]] | None:
        """(layer, sites) of a full HF module path such as ``model.layers.3.self_attn.k_proj``."""
        for stack in dict.fromkeys(self.stack_of(s) for s in self.sites):
            if path.startswith(stack + "."):
                layer, _, module = path[len(stack) + 1:].partition(".")
                sites = [s for s in self.sites if self.stack_of(s) == stack and s.module == module]
                if layer.isdigit() and sites:
                    return int(layer), sites
        return None

    def input_fold_site(self, name: str) -> Site | None:
        """The site whose rows absorb ``name``'s input scaling exactly (None: no exact fold)."""
        fold = self.site(name).input_fold
        return self.site(fold) if fold and self.gated_mlp else None

    def module_path(self, layer: int, site: Site) -> str:
        return f"{self.stack_of(site)}.{layer}.{site.module}"


def decoder_start_token(config: Any) -> int:
    """The token an encoder-decoder model's decoder starts from: the config's
    ``decoder_start_token_id``, else its pad token (T5's convention), else 0."""
    for key in ("decoder_start_token_id", "pad_token_id"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    return 0


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family; model types must be unique across the registry."""
    for other in _REGISTRY.values():
        clash = set(other.model_types) & set(family.model_types)
        if clash and other.name != family.name:
            raise ValueError(f"model types {clash} already registered by {other.name}")
    _REGISTRY[family.name] = family
    return family


def families() -> dict[str, Family]:
    return dict(_REGISTRY)


def get_family(name: str) -> Family:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EdgeIA3Error(
            f"unknown architecture family '{name}' (supported: {', '.join(sorted(_REGISTRY))})"
        ) from None


def family_for_config(config: Any) -> Family:
    """The family of an HF config (object or dict)."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for fam in _REGISTRY.values():
        if model_type in fam.model_types:
            return fam
    supported = sorted(t for f in _REGISTRY.values() for t in f.model_types)
    raise EdgeIA3Error(
        f"unknown architecture '{model_type}': edgeia3 supports model types {', '.join(supported)}"
    )


def family_for_gguf_arch(arch: str) -> Family:
    """The family whose GGUF architecture name is ``arch``."""
    for fam in _REGISTRY.values():
        if fam.gguf_arch == arch:
            return fam
    known = sorted(f.gguf_arch for f in _REGISTRY.values() if f.gguf_arch)
    raise EdgeIA3Error(f"unknown GGUF architecture '{arch}' (supported: {', '.join(known)})")
