"""``edgeia3 export gguf``: base (+ IA3 adapters) in, a llama.cpp directory out.

Layout::

    DIR/model.gguf                 base (or base with --merge NAME folded in exactly)
    DIR/adapters/NAME.ia3.gguf     one IA3 adapter GGUF per --adapter
    DIR/edgeia3.json               manifest (kind "gguf", identities, adapters, merged)

A transformers base is written to GGUF (hf_writer) and quantized by
llama.cpp; a .gguf base (or 'default', the embedded SmolLM2 Q4_1) is used as
is. The whole directory is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeia3.atomic import atomic_dir, check_out
from edgeia3.errors import EdgeIA3Error

from .adapter_file import SUFFIX, write_ia3_gguf
from .base_gguf import GGUFBase
from .ggml_index import GGUFIndex
from .merge import adapter_plan, apply_plan
from .quantize import EXPORT_QUANTS

MODEL_FILE = "model.gguf"
MANIFEST = "edgeia3.json"
NF4_NOTE = ("trained on an NF4 base: the GGUF uses its own quantization of the weights, "
            "which differs from the one the adapter was trained with")


@dataclass
class GGUFExport:
    out: Path
    quant: str
    base: str
    family: str
    adapters: dict[str, dict] = field(default_factory=dict)
    merged: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        model = self.out / MODEL_FILE
        lines = [f"GGUF export -> {self.out} ({self.seconds:.1f} s)",
                 f"  model.gguf: {self.family}, {self.quant}, {model.stat().st_size / 1e6:.1f} MB"
                 + (f", adapter '{self.merged}' merged exactly into the block scales" if self.merged else "")]
        for name, a in self.adapters.items():
            lines.append(f"  {a['file']}: {a['params']:,} IA3 parameters ({', '.join(a['sites'])}), "
                         f"{a['bytes'] / 1e3:.1f} kB")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def export(base: str, out: str | Path, quant: str = "q4_0", adapters: dict[str, str] | None = None,
           merge: str | None = None, force: bool = False) -> GGUFExport:
    t0 = time.perf_counter()
    adapters = dict(adapters or {})
    out = Path(out)
    quant = quant.lower()
    if quant not in EXPORT_QUANTS and quant != "f32":
        raise EdgeIA3Error(f"unknown --quant '{quant}' (choose from {', '.join(EXPORT_QUANTS)})")
    if merge is not None and merge not in adapters:
        raise EdgeIA3Error(f"--merge {merge}: no adapter of that name (given: {', '.join(adapters) or 'none'})")
    for name in adapters:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise EdgeIA3Error(f"adapter name '{name}' must be letters, digits, '_', '-' or '.'")
    check_out(out, force)  # before any work: refuse a non-empty --out unless --force
    gguf_src, hf_dir = _resolve(base)
    notes: list[str] = []
    with atomic_dir(out, force=force) as tmp:
        model = tmp / MODEL_FILE
        if hf_dir is not None:
            file_quant = _from_transformers(hf_dir, model, quant, tmp, notes)
        else:
            import shutil

            shutil.copyfile(gguf_src, model)
            file_quant = GGUFIndex(model).file_type
            if quant != "q4_0":  # the CLI default; anything else was asked for explicitly
                notes.append(f"--quant {quant} ignored: a GGUF base is used as is ({file_quant})")
        gb = GGUFBase(model, name=str(base))
        loaded = {name: gb.load_adapter(path) for name, path in adapters.items()}
        info: dict[str, dict] = {}
        (tmp / "adapters").mkdir()
        for name, ad in loaded.items():
            rel = f"adapters/{name}{SUFFIX}"
            write_ia3_gguf(ad, tmp / rel, gb, name)
            info[name] = {"file": rel, "sites": ad.sites, "params": ad.num_params,
                          "bytes": (tmp / rel).stat().st_size, "trained_quant": ad.quant}
            if ad.quant == "nf4":
                info[name]["note"] = NF4_NOTE
                notes.append(f"adapter '{name}' {NF4_NOTE}")
        if merge is not None:
            # The copy in tmp is ours: patch its block scales in place.
            plan = adapter_plan(loaded[merge], gb)
            mm = np.memmap(model, dtype=np.uint8, mode="r+")
            apply_plan(mm, gb.index, plan)
            mm.flush()
            del mm
        manifest = {
            "kind": "gguf",
            "format_version": 1,
            "model": MODEL_FILE,
            "base": {"spec": str(base), "identity": gb.identity.to_dict(),
                     "source_identity": gb.identities[-1].to_dict() if len(gb.identities) > 1 else None},
            "family": gb.family.name,
            "quant": file_quant,
            "adapters": info,
            "merged": merge,
            "notes": notes,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return GGUFExport(out, file_quant, str(base), gb.family.name, info, merge, notes, time.perf_counter() - t0)


def _resolve(base: str) -> tuple[Path | None, Path | None]:
    """(gguf file, None) for a GGUF base, (None, transformers dir) for a transformers base."""
    from edgeia3.base import DEFAULT_BASE, default_gguf

    if str(base) == DEFAULT_BASE:
        return default_gguf(), None
    p = Path(base)
    if p.is_file():
        if p.suffix != ".gguf":
            raise EdgeIA3Error(f"{p} is a file but not a .gguf; give a transformers directory or a GGUF")
        return p, None
    if p.is_dir():
        if not (p / "config.json").exists():
            raise EdgeIA3Error(f"{p} is not a transformers model directory (no config.json)")
        return None, p
    raise EdgeIA3Error(f"base not found: {base} (expected 'default', a transformers dir or a .gguf)")


def _from_transformers(hf_dir: Path, model: Path, quant: str, tmp: Path, notes: list[str]) -> str:
    from .hf_writer import write_hf_gguf
    from .quantize import quantize

    if quant in ("f32", "f16"):
        written = write_hf_gguf(hf_dir, model, dtype=quant)
    else:
        f32 = tmp / ".f32.gguf"
        written = write_hf_gguf(hf_dir, f32, dtype="f32")
        quantize(f32, model, quant)
        f32.unlink()
    if not written.pre_verified and "placeholder" not in written.tokenizer:
        notes.append(f"tokenizer: {written.tokenizer}")
    return quant

