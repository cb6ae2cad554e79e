"""``edgeia3 export gguf``: base (+ IA3 adapters) in, a llama.cpp directory out.

Layout::

    DIR/model.gguf                 base (or base with --merge NAME folded in exactly)
    DIR/adapters/NAME.ia3.gguf     one IA3 adapter GGUF per --adapter
    DIR/edgeia3.json               manifest (kind "gguf", identities, adapters, merged)

A transformers base is written to GGUF (hf_writer) and quantized by
llama.cpp; a .gguf base (or 'default', the embedded SmolLM2 Q4_1) is used as
is. The whole directory is written under a temporary name and renamed.
A step: it resolves the base (``edgeia3.base``) and drives ``edgeia3.converters.gguf``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeia3.adapter import check_adapter_name
from edgeia3.atomic import atomic_dir, check_out
from edgeia3.base import locate_base, quantized_gguf, resolve_base
from edgeia3.errors import EdgeIA3Error
from edgeia3.manifest import AdapterEntry, ExportManifest, Merged, write_manifest
from edgeia3.tokens import TokenContract, check_tokens
from edgeia3.weights import check_deployment, llama_quant

from edgeia3.converters.gguf.adapter_file import SUFFIX, write_ia3_gguf
from edgeia3.converters.gguf.base_gguf import GGUFBase
from edgeia3.converters.gguf.file_types import EXPORT_QUANTS, TRAIN_QUANTS, WRITER_TYPES
from edgeia3.converters.gguf.ggml_index import GGUFIndex, gguf_weights
from edgeia3.converters.gguf.llama_vocab import llama_cpp_tokens
from edgeia3.converters.gguf.merge import adapter_plan, apply_plan
from edgeia3.formats import load_adapter

MODEL_FILE = "model.gguf"


@dataclass
class GGUFExport:
    """What ``export`` produced: the manifest it wrote (``str()`` is the CLI's summary)."""

    out: Path
    manifest: ExportManifest
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def quant(self) -> str:
        return self.manifest.quant or ""

    @property
    def base(self) -> str:
        return self.manifest.base_spec

    @property
    def family(self) -> str:
        return self.manifest.family

    @property
    def adapters(self) -> dict[str, AdapterEntry]:
        return self.manifest.adapters

    @property
    def merged(self) -> str | None:
        return self.manifest.merged_name

    def __str__(self) -> str:
        model = self.out / MODEL_FILE
        lines = [f"GGUF export -> {self.out} ({self.seconds:.1f} s)",
                 f"  model.gguf: {self.family}, {self.quant}, {model.stat().st_size / 1e6:.1f} MB"
                 + (f", adapter '{self.merged}' merged exactly into the block scales" if self.merged else "")]
        for name, a in self.adapters.items():
            lines.append(f"  {a.file}: {a.params:,} IA3 parameters ({', '.join(a.sites)}), "
                         f"{(a.bytes or 0) / 1e3:.1f} kB")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def export(base: str, out: str | Path, quant: str | None = None, adapters: dict[str, str] | None = None,
           merge: str | None = None, force: bool = False, strict: bool = False) -> GGUFExport:
    """``quant`` None: the llama.cpp quantization the adapters were trained on, else the
    GGUF base as is, else q4_0. Quantized files come from ``quantized_gguf``'s cache, so
    they are byte for byte the files training ran on."""
    t0 = time.perf_counter()
    adapters = dict(adapters or {})
    out = Path(out)
    quant = quant.lower() if quant else _trained_quant(adapters)
    if quant is not None and quant not in EXPORT_QUANTS + TRAIN_QUANTS + WRITER_TYPES:
        raise EdgeIA3Error(f"unknown --quant '{quant}' (choose from {', '.join(sorted(set(EXPORT_QUANTS + TRAIN_QUANTS)))})")
    if merge is not None and merge not in adapters:
        raise EdgeIA3Error(f"--merge {merge}: no adapter of that name (given: {', '.join(adapters) or 'none'})")
    for name in adapters:
        check_adapter_name(name)
    check_out(out, force)  # before any work: refuse a non-empty --out unless --force
    gguf_src, hf = locate_base(base)
    if gguf_src is None and not Path(hf).is_dir():
        raise EdgeIA3Error(f"base not found: {base} (a GGUF export needs 'default', a local transformers dir or a .gguf)")
    hf_dir = Path(hf) if gguf_src is None else None
    if gguf_src is not None and quant is not None and quant == GGUFIndex(gguf_src).file_type:
        quant = None  # the file already is that quantization: use it as is
    if hf_dir is not None and quant is None:
        quant = "q4_0"
    notes: list[str] = []
    with atomic_dir(out, force=force) as tmp:
        model = tmp / MODEL_FILE
        if quant in WRITER_TYPES and hf_dir is not None:  # edgeia3's writer, no llama.cpp quantizer
            file_quant = _from_transformers(hf_dir, model, quant, notes)
            name = f"{base} as {quant}"
        elif quant is None:
            shutil.copyfile(gguf_src, model)
            file_quant, name = GGUFIndex(model).file_type, gguf_src.name
        else:  # one llama.cpp quantization of this base, shared with training (cached)
            src = resolve_base(base)
            shutil.copyfile(quantized_gguf(src, quant), model)
            file_quant, name = quant, f"{src.name} quantized {quant}"
        deployed = gguf_weights(model, name, file_quant)
        gb = GGUFBase(model, name=str(base))
        loaded = {name: gb.load_adapter(path) for name, path in adapters.items()}
        info: dict[str, AdapterEntry] = {}
        tokens = llama_cpp_tokens(model)
        if tokens is None:
            notes.append("llama.cpp cannot load this GGUF's vocabulary (e.g. a BPE tokenizer without merges): "
                         "drive it by token ids; its special-token rule is unknown")
        (tmp / "adapters").mkdir()
        for name, ad in loaded.items():
            adapter_plan(ad, gb)  # the runtime swaps by this plan: refuse what it cannot apply, now
            rel = f"adapters/{name}{SUFFIX}"
            write_ia3_gguf(ad, tmp / rel, gb, name)
            info[name] = AdapterEntry(file=rel, sites=ad.sites, params=ad.num_params,
                                      bytes=(tmp / rel).stat().st_size, trained_quant=ad.quant,
                                      trained_weights=ad.trained_on,
                                      same_weights=check_deployment(name, ad, deployed, strict, notes),
                                      token_contract=TokenContract.recorded(ad).to_json())
            if tokens is not None:
                check_tokens(name, ad, tokens, "llama.cpp on this GGUF", strict, notes)
        if merge is not None:
            # The copy in tmp is ours: patch its block scales in place.
            plan = adapter_plan(loaded[merge], gb)
            mm = np.memmap(model, dtype=np.uint8, mode="r+")
            apply_plan(mm, gb.index, plan)
            mm.flush()
            del mm
        base_ref = {"spec": str(base), "identity": gb.identity.to_dict(),
                    "source_identity": gb.identities[-1].to_dict() if len(gb.identities) > 1 else None}
        manifest = ExportManifest(
            "gguf", gb.family.name, base_ref, info, Merged(merge) if merge is not None else None, deployed,
            tokens and tokens.to_json(),  # what llama.cpp adds around a text (None: unknown)
            notes, quant=file_quant, model_file=MODEL_FILE)
        write_manifest(tmp, manifest)
    return GGUFExport(out, manifest, time.perf_counter() - t0, notes)


def _trained_quant(adapters: dict[str, str]) -> str | None:
    """The llama.cpp quantization the adapters were trained on (None: none of them was)."""

    quants = set()
    for path in adapters.values():
        try:
            t = load_adapter(path).trained_on
        except EdgeIA3Error:
            continue  # a bare PEFT dir records nothing; loading it for real reports real errors
        if llama_quant(t):
            quants.add(llama_quant(t))
    if len(quants) > 1:
        raise EdgeIA3Error(f"the adapters were trained on different quantizations ({', '.join(sorted(quants))}); "
                           "export them separately or pick one with --quant")
    return quants.pop() if quants else None


def _from_transformers(hf_dir: Path, model: Path, quant: str, notes: list[str]) -> str:
    from edgeia3.converters.gguf.hf_writer import write_hf_gguf

    written = write_hf_gguf(hf_dir, model, dtype=quant)
    if not written.pre_verified and "placeholder" not in written.tokenizer:
        notes.append(f"tokenizer: {written.tokenizer}")
    return quant
