"""``edgeia3 export onnx`` for a T5 / Flan-T5 base: the base loaded, the adapters validated
(and one merged in torch), then ``edgeia3.converters.onnx.t5`` writes the encoder and
decoder-with-past graphs and the adapter files; the manifest (kind "onnx-t5") last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeia3.adapter import IA3Adapter
from edgeia3.atomic import atomic_dir, check_out
from edgeia3.base import load_base
from edgeia3.converters.onnx.t5 import (ADAPTER_DIR, DECODER_FILE, ENCODER_FILE, KIND, PRECISIONS, ia3_inputs,
                                        plan_sites, save_adapter, site_sizes, write_graphs)
from edgeia3.errors import EdgeIA3Error
from edgeia3.manifest import AdapterEntry, ExportManifest, Merged, read_manifest, write_manifest
from edgeia3.merge import merge_loaded
from edgeia3.prompts import recorded_template
from edgeia3.registry import decoder_start_token
from edgeia3.validate import load_adapter_for


def export_t5(base_dir: str | Path, out_dir: str | Path, adapters: dict[str, str | Path] | None = None,
              merge: str | None = None, force: bool = False, precision: str = "fp32") -> ExportManifest:
    """Export a T5 base (and IA3 adapters, as side inputs or one merged) to ``out_dir``;
    returns the manifest written there (``edgeia3.json``, kind "onnx-t5"). Written under a
    temp name and renamed when complete; an existing ``out_dir`` is refused unless ``force``."""
    if precision not in PRECISIONS:
        raise EdgeIA3Error(f"T5 exports to ONNX as {' or '.join(PRECISIONS)}, not '{precision}'")
    check_out(out_dir, force)
    base = load_base(base_dir)
    if base.family.auto_model != "AutoModelForSeq2SeqLM":
        raise EdgeIA3Error(f"{base_dir}: a {base.family.name} model; this exporter is for T5 (encoder-decoder)")
    loaded = {name: load_adapter_for(p, base) for name, p in (adapters or {}).items()}
    if merge is not None and merge not in loaded:
        raise EdgeIA3Error(f"--merge {merge}: no adapter of that name (given: {', '.join(loaded) or 'none'})")
    with atomic_dir(out_dir, force=force) as out:
        _write(out, base, loaded, merge, precision)
    return read_manifest(out_dir)


def _write(out: Path, base: Any, loaded: dict[str, IA3Adapter], merge: str | None, precision: str) -> None:
    model = base.model.float().eval()
    cfg = model.config
    n, heads, dkv = cfg.num_layers, cfg.num_heads, cfg.d_kv

    if merge is not None:
        model = merge_loaded(base, loaded[merge]).float().eval()
        sites: list[tuple[int, str]] = []
    else:
        sites = plan_sites(loaded, base.family, n)
    sizes = site_sizes(base, sites)
    write_graphs(out, model, sites, sizes, precision)

    (out / ADAPTER_DIR).mkdir(exist_ok=True)
    entries = {name: _adapter_entry(out, name, ad, merge, sites, sizes) for name, ad in loaded.items()}
    cfg.save_pretrained(out)  # decoder_start_token_id, eos_token_id, ...
    if base.tokenizer is not None:
        base.tokenizer.save_pretrained(out)
    write_manifest(out, ExportManifest(
        KIND, "t5", {"name": base.source.name, "spec": base.source.spec, "identity": base.identity.to_dict()},
        entries, Merged(merge, "torch fold (merge_loaded)") if merge else None, precision=precision,
        model_bytes=sum((out / f).stat().st_size for f in (ENCODER_FILE, DECODER_FILE)),
        mode="merged" if merge else ("side" if loaded else "base"),
        ia3_inputs=ia3_inputs(sites, sizes),
        extra={"provider": "cpu", "encoder": ENCODER_FILE, "decoder": DECODER_FILE, "decoder_with_past": True,
               "num_layers": n, "num_heads": heads, "d_kv": dkv, "decoder_start_token_id": decoder_start_token(cfg),
               "eos_token_id": cfg.eos_token_id}))


def _adapter_entry(out: Path, name: str, ad: IA3Adapter, merge: str | None, sites: list, sizes: dict) -> AdapterEntry:
    """Write adapter ``name``'s file (side: its input tensors; merged: its canonical vectors, for
    provenance and reports) and return its manifest entry."""
    # the chat template it was trained with renders its prompts
    entry = AdapterEntry(sites=ad.sites, params=ad.num_params, trained_quant=ad.quant, trained_weights=ad.trained_on,
                         chat_template=recorded_template(ad) or None)
    if merge is None:
        entry.file = f"{ADAPTER_DIR}/{name}.safetensors"
        save_adapter(ad, sites, sizes, out / entry.file)
        entry.bytes = (out / entry.file).stat().st_size
    elif name == merge:
        entry.canonical = str(ad.save(out / ADAPTER_DIR / f"{name}.ia3.safetensors").relative_to(out))
    return entry
