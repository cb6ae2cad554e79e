"""ONNX export for onnxruntime(-genai): IA3 as side-tensors, or merged exactly.

Flow: base + canonical adapters in -> onnxruntime-genai model builder ->
graph post-processing -> a folder ``og.Model(DIR)`` opens, with
``adapters/NAME.onnx_adapter`` and the manifest ``edgeia3.json``.

- Side mode (adapters given, no --merge): every IA3 site is a graph input
  ``ia3.layers.{i}.{sites}`` of shape [batch|1, 1, N] whose initializer
  default is ones, so no adapter = the base model; a Mul applies it.
- Merged mode (--merge NAME): int4/int8 scale the MatMulNBits scale rows of
  the affected output channels (exact, no re-quantization; input-scaled
  sites of gated MLPs land on up_proj's rows). fp32/fp16, adapters trained
  on NF4 and anything not foldable into rows are folded in torch before the
  build (the manifest says which).

A step: it loads the base (``edgeia3.base``), validates and merges adapters
(``edgeia3.validate``, ``edgeia3.merge``) and drives ``edgeia3.converters.onnx``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from edgeia3.converters.gguf.ggml_index import gguf_weights
from edgeia3.adapter import IA3Adapter, check_adapter_name
from edgeia3.atomic import atomic_dir, check_out
from edgeia3.base import LLAMA_QUANTS, LoadedBase, load_base, quantized_gguf
from edgeia3.errors import EdgeIA3Error
from edgeia3.manifest import AdapterEntry, ExportManifest, Merged, write_manifest
from edgeia3.fingerprint import num_layers
from edgeia3.prompts import TEMPLATE_FILE, read_template
from edgeia3.registry import Family, Scaling, families
from edgeia3.tokens import TokenContract, check_tokens
from edgeia3.validate import expected_length, load_adapter_for
from edgeia3.weights import check_deployment, llama_quant, same_weights

from edgeia3.converters.onnx import builder
from edgeia3.converters.onnx.adapter_file import SUFFIX, write_onnx_adapter
from edgeia3.converters.onnx.graph import (IA3Input, activation_np_dtype, activation_type, add_side_inputs,
                                           find_node, plan_inputs, scale_output_rows)
from edgeia3.converters.onnx.transcode import carries, fusable_qkv, not_carried, transcode

PRECISIONS = ("int4", "int8", "fp16", "fp32")
PROVIDERS = ("cpu", "cuda")
MODEL_FILE = "model.onnx"
ADAPTER_DIR = "adapters"
CANONICAL_SUFFIX = "ia3.safetensors"  # the merged adapter's own vectors (edgeia3 canonical file)


@dataclass
class OnnxExport:
    """What ``export`` produced: the manifest it wrote (``str()`` is the CLI's summary)."""

    out: Path
    manifest: ExportManifest
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def adapters(self) -> dict[str, Path]:
        return {n: self.out / a.file for n, a in self.manifest.side_adapters.items()}

    def __str__(self) -> str:
        m = self.manifest
        mb = (m.model_bytes or 0) / 1e6
        if m.merged:
            what = f"adapter '{m.merged.name}' merged ({m.merged.method})"
        elif m.mode == "side":
            sizes = ", ".join(f"{n} {(a.bytes or 0) / 1e3:.1f} kB" for n, a in m.adapters.items())
            what = f"{len(m.adapters)} adapter(s) as side-tensors over {len(m.ia3_inputs or [])} IA3 inputs ({sizes})"
        else:
            what = "no adapter (base model)"
        lines = [f"ONNX export of {m.base.get('name')} ({m.family}, {m.precision}, {m.extra.get('provider')}): {what}",
                 f"  -> {self.out}  model {mb:.1f} MB, {self.seconds:.1f} s"]
        if m.extra.get("mobile"):
            mob = m.extra["mobile"]
            lines.append(f"  mobile: {mob['ort_file']} loads in onnxruntime: {mob['ort_loads']}; "
                         f"ops outside NNAPI: {', '.join(mob['unsupported_ops'].get('NNAPI', [])) or 'none'}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _check_args(precision: str, provider: str, adapters: dict[str, Any], merge: str | None) -> None:
    if precision not in PRECISIONS:
        raise EdgeIA3Error(f"unsupported precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if provider not in PROVIDERS:
        raise EdgeIA3Error(f"unsupported provider '{provider}' (choose from {', '.join(PROVIDERS)})")
    for name in adapters:
        check_adapter_name(name)
    if merge is not None:
        if merge not in adapters:
            raise EdgeIA3Error(f"--merge {merge}: no adapter of that name (given: {', '.join(adapters) or 'none'})")
        if len(adapters) > 1:
            raise EdgeIA3Error("--merge folds one adapter into the weights; give only that adapter "
                               "(export the others as side-tensors in a separate export)")


def _check_family(lb: LoadedBase) -> dict:
    """Refuse what the builder cannot build as transformers computes it; the config it reads."""
    family = lb.family
    if not any(s.onnx_node for s in family.sites):
        known = ", ".join(sorted(f.name for f in families().values() if any(s.onnx_node for s in f.sites)))
        raise EdgeIA3Error(
            f"ONNX export does not support the '{family.name}' family: onnxruntime-genai's model "
            f"builder has no such model (supported families: {known})"
        )
    view = lb.config.to_dict()
    view = family.onnx_config(view) if family.onnx_config else view
    vocab = view.get("vocab_size")
    for name, mod in lb.model.named_modules():  # the builder takes any such Linear for the LM head
        if getattr(mod, "out_features", None) == vocab and name.split(".")[-1] != "lm_head":
            raise EdgeIA3Error(f"ONNX export: {name} has vocab_size={vocab} outputs, which onnxruntime-genai's "
                               "model builder would take for the LM head")
    return view


def _builder_options(view: dict, fuse_qkv: bool, accuracy_level: int | None) -> dict[str, str]:
    extra = {} if fuse_qkv else {"fuse_qkv": "false"}
    if accuracy_level is not None:
        extra["accuracy_level"] = str(accuracy_level)
    if "sliding_attention" in (view.get("layer_types") or []):
        # Window-sized KV buffers for sliding layers need past caches of at least the window; the
        # runtime's full-logits session feeds empty ones. Full caches + the window as a mask instead.
        extra["windowed_kv_cache"] = "false"
    return extra


def model_bytes(model_dir: Path, model_file: str = MODEL_FILE) -> int:
    """Bytes of the graph and its external weights (model.onnx, model.onnx.data)."""
    return sum(f.stat().st_size for f in model_dir.glob(model_file + "*"))


def _save_hf(model: Any, tokenizer: Any, where: Path) -> Path:
    model.save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


def _build(lb: LoadedBase, hf: str | Path, tmp: Path, precision: str, provider: str, extra: dict,
           work: str | Path) -> None:
    """The builder on ``hf`` with the family's config translation (a hub id is saved first:
    the translation needs a local folder)."""
    if lb.family.onnx_config and not Path(hf).is_dir():
        hf = _save_hf(lb.model, lb.tokenizer, Path(work) / "hub_hf")
    builder.build(hf, tmp, precision, provider, extra, config_fix=lb.family.onnx_config)


def export(base: str = "default", out: str | Path = "", precision: str = "int4",
           adapters: dict[str, str | Path] | None = None, merge: str | None = None, provider: str = "cpu",
           mobile: bool = False, fuse_qkv: bool = True, accuracy_level: int | None = None,
           force: bool = False, weights: str = "auto", strict: bool = False) -> OnnxExport:
    """Export ``base`` (+ IA3 adapters) for onnxruntime-genai; see the module docstring.

    ``fuse_qkv=False`` asks the builder for separate q/k/v MatMuls (one IA3
    input per site instead of one combined qkv input per layer).
    ``accuracy_level`` (int4/int8): MatMulNBits compute precision; None keeps the
    builder's default (4 on CPU: activations quantized to int8 per block, fastest).
    With 4, side and merged exports differ by activation-rounding noise (the two
    graphs round x*l differently and int8 rounding flips); 1 computes in fp32.
    ``weights`` (int4/int8): "auto" runs a GGUF's own blocks when there is one to
    run - the GGUF base, or the llama.cpp quantization the adapters were trained
    on - and the builder's own int4 otherwise; "builder" forces the builder's;
    a llama.cpp type (q4_0, q4_k_m, ...) transcodes the base quantized to it.
    ``strict``: refuse adapters trained on other weights than the export runs.
    """
    t0 = time.perf_counter()
    adapters = dict(adapters or {})
    _check_args(precision, provider, adapters, merge)
    if weights not in ("auto", "builder") + LLAMA_QUANTS:  # checked before the base loads
        raise EdgeIA3Error(f"--weights must be auto, builder or a llama.cpp type ({', '.join(LLAMA_QUANTS)})")
    out = Path(out)
    check_out(out, force)  # before any work: refuse a non-empty --out unless --force
    lb = load_base(base)
    view = _check_family(lb)
    if lb.tokenizer is None:
        raise EdgeIA3Error(f"base {base} has no tokenizer; onnxruntime-genai exports need one")
    identity = lb.identity  # before any in-place merge changes the weights
    loaded = {name: load_adapter_for(p, lb) for name, p in adapters.items()}
    notes: list[str] = []
    gguf = _weights_gguf(lb, precision, weights, loaded)
    if gguf is not None and fuse_qkv and not fusable_qkv(gguf, lb.family, num_layers(lb.config)):
        fuse_qkv = False
        notes.append("q, k and v have different GGUF types in some layers: exported as separate MatMulNBits")
    deployed = _deployed(lb, precision, gguf)
    for name, ad in loaded.items():
        check_deployment(name, ad, deployed, strict, notes)
        check_tokens(name, ad, lb.tokens, "this export's tokenizer", strict, notes)
    extra = _builder_options(view, fuse_qkv, accuracy_level)
    with atomic_dir(out, force=force) as tmp, tempfile.TemporaryDirectory(prefix="edgeia3-onnx-") as work:
        transcoded = None
        if merge is not None and gguf is not None:  # the merged GGUF's blocks, transcoded
            merged_gguf = _merged_gguf(gguf, loaded[merge], Path(work))
            _build(lb, lb.source.hf_path, tmp, precision, provider, extra, work)
            transcoded = _transcode(tmp, merged_gguf, lb, accuracy_level, notes)
            merged = Merged(merge, "block scales of the GGUF it runs (exact, no re-quantization)",
                            "quantized weights")
            plans: list[IA3Input] = []
        elif merge is not None:
            merged = Merged(merge, *_export_merged(lb, loaded[merge], tmp, Path(work), precision, provider, extra,
                                                   notes))
            plans = []
        else:
            merged = None
            _build(lb, lb.source.hf_path, tmp, precision, provider, extra, work)
            plans = _add_side_inputs(tmp, lb, loaded, notes)
            if gguf is not None:
                transcoded = _transcode(tmp, gguf, lb, accuracy_level, notes)
        _ensure_chat_template(tmp, lb)
        manifest = _manifest(lb, identity, precision, provider, plans, merged, fuse_qkv)
        manifest.extra.update(builder_options=extra, transcoded=transcoded)
        manifest.weights = deployed
        for name, ad in loaded.items():
            manifest.adapters[name] = _adapter_entry(tmp, name, ad, adapters[name], plans, deployed, merge)
        manifest.model_bytes = model_bytes(tmp)
        if mobile:
            from edgeia3.converters.onnx.mobile import make_mobile

            manifest.extra["mobile"] = make_mobile(tmp)
        manifest.token_contract = lb.tokens.to_json()  # what the export's tokenizer adds (the runtimes' rule)
        manifest.notes = notes
        manifest.extra["export_seconds"] = round(time.perf_counter() - t0, 2)
        write_manifest(tmp, manifest)
    return OnnxExport(out, manifest, time.perf_counter() - t0, notes)


def _adapter_entry(tmp: Path, name: str, ad: IA3Adapter, source: Any, plans: list[IA3Input], deployed: dict,
                   merge: str | None) -> AdapterEntry:
    """Write adapter ``name``'s file into the export (side: its .onnx_adapter; merged: its canonical
    vectors, for provenance and reports) and return its manifest entry."""
    entry = AdapterEntry(sites=ad.sites, params=ad.num_params, trained_quant=ad.quant, source=str(source),
                         trained_weights=ad.trained_on, same_weights=same_weights(ad, deployed),
                         token_contract=TokenContract.recorded(ad).to_json())
    if merge is None:
        dtype = activation_np_dtype(tmp / MODEL_FILE)
        path = write_onnx_adapter(ad, plans, tmp / ADAPTER_DIR / f"{name}{SUFFIX}", dtype)
        entry.file, entry.bytes = f"{ADAPTER_DIR}/{name}{SUFFIX}", path.stat().st_size
    else:
        entry.canonical = f"{ADAPTER_DIR}/{name}.{CANONICAL_SUFFIX}"
        ad.save(tmp / entry.canonical)
    return entry


def _weights_gguf(lb: LoadedBase, precision: str, weights: str, loaded: dict[str, IA3Adapter]) -> Path | None:
    """The GGUF whose blocks an int4/int8 export runs (None: the builder quantizes)."""
    if precision not in ("int4", "int8") or weights == "builder":
        if weights in LLAMA_QUANTS:
            raise EdgeIA3Error(f"--weights {weights} needs --precision int4 or int8 (got {precision})")
        return None
    if not carries(lb.family):  # a GGUF tensor of it feeds several builder nodes: not transcoded
        if weights in LLAMA_QUANTS:
            raise EdgeIA3Error(f"--weights {weights}: the {lb.family.name} family's fused GGUF tensors cannot be "
                               "put into the builder's graph; use --weights builder")
        return None
    if weights in LLAMA_QUANTS:
        return quantized_gguf(lb.source, weights)
    trained = sorted({llama_quant(ad.trained_on) for ad in loaded.values()} - {None})
    if len(trained) > 1:
        raise EdgeIA3Error(f"the adapters were trained on different quantizations ({', '.join(trained)}); "
                           "export them separately or pick one with --weights")
    if trained:
        return quantized_gguf(lb.source, trained[0])
    return lb.source.gguf


def _deployed(lb: LoadedBase, precision: str, gguf: Path | None) -> dict:
    """What the export runs, in edgeia3.weights' terms."""
    if gguf is not None:
        kept = not_carried(gguf)
        if kept:
            return {"kind": "requantized", "how": f"the blocks of {gguf.name} except {len(kept)} "
                    "tensors the builder re-quantized"}
        return gguf_weights(gguf, gguf.name if gguf == lb.source.gguf else _quantized_name(lb, gguf))
    if precision == "fp32" and lb.weights:
        return lb.weights  # the GGUF base's blocks, dequantized exactly
    if precision in ("fp32", "fp16"):
        return {"kind": "full", "dtype": precision}
    return {"kind": "requantized", "how": f"onnxruntime-genai's own {precision} rounding of the base"}


def _quantized_name(lb: LoadedBase, gguf: Path) -> str:
    return f"{lb.source.name} quantized {gguf.stem.rsplit('-', 1)[-1]}"


def _merged_gguf(gguf: Path, adapter: IA3Adapter, work: Path) -> Path:
    """A copy of ``gguf`` with ``adapter`` folded into its block scales (the exact GGUF merge)."""
    from edgeia3.converters.gguf.base_gguf import GGUFBase
    from edgeia3.converters.gguf.merge import merge_into_file

    out = work / "merged.gguf"
    merge_into_file(gguf, adapter, out, GGUFBase(gguf))
    return out


def _transcode(model_dir: Path, gguf: Path, lb: LoadedBase, accuracy_level: int | None,
               notes: list[str]) -> dict:
    model = _load_graph(model_dir)
    done = transcode(model_dir, gguf, lb.family, lb.config, activation_type(model), accuracy_level)
    if done["not_carried"]:
        notes.append(f"{len(done['not_carried'])} GGUF tensors have types without an exact MatMulNBits form "
                     f"and keep the builder's int4 rounding: {', '.join(done['not_carried'][:4])}"
                     + (" ..." if len(done["not_carried"]) > 4 else ""))
    return done


def _sizes(lb: LoadedBase, sites: list[str]) -> dict[tuple[int, str], int]:
    n = num_layers(lb.config)
    return {(i, s): expected_length(lb, i, s, lb.family.site(s).scaling) for i in range(n) for s in sites}


def _load_graph(model_dir: Path):
    import onnx

    return onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)


def _add_side_inputs(model_dir: Path, lb: LoadedBase, loaded: dict[str, IA3Adapter], notes: list[str]):
    """Add the IA3 inputs for the union of the adapters' sites; rewrite model.onnx only."""
    import onnx

    sites = [s.name for s in lb.family.sites if any(s.name in ad.sites for ad in loaded.values())]
    if not sites:
        return []
    model = _load_graph(model_dir)
    plans = plan_inputs(model.graph, lb.family, lb.config, sites, _sizes(lb, sites), num_layers(lb.config))
    add_side_inputs(model, plans, activation_type(model))
    # Tensor data stays in model.onnx.data (the protos keep their external references).
    onnx.save(model, str(model_dir / MODEL_FILE))
    return plans


def _row_ops(family: Family, adapter: IA3Adapter, config: Any, graph: Any) -> list[tuple] | None:
    """(node, start, stop, values) per vector, or None if some vector cannot be a row scaling."""
    ops = []
    for v in adapter.vectors:
        site = family.site(v.site)
        if v.scaling is Scaling.INPUT:  # e.g. down's input == up's rows (Site.input_fold)
            site = family.input_fold_site(v.site)
            if site is None:
                return None
        fused = site.onnx_fused_node and find_node(graph, site.onnx_fused_node.format(i=v.layer))
        if fused:
            start, stop = site.onnx_fused_rows(config)
            ops.append((site.onnx_fused_node.format(i=v.layer), start, stop, v.values))
        elif site.onnx_node and find_node(graph, site.onnx_node.format(i=v.layer)) is not None:
            ops.append((site.onnx_node.format(i=v.layer), 0, v.values.size, v.values))
        else:
            return None
    return ops


def _export_merged(lb: LoadedBase, adapter: IA3Adapter, tmp: Path, work: Path, precision: str, provider: str,
                   extra: dict, notes: list[str]) -> tuple[str, str]:
    """Fold ``adapter`` into the export's weights; (how, into what)."""
    from edgeia3.merge import fold_into_model, merge_loaded

    if precision in ("int4", "int8") and adapter.quant != "nf4":
        _build(lb, lb.source.hf_path, tmp, precision, provider, extra, work)
        model = _load_graph(tmp)
        ops = _row_ops(lb.family, adapter, lb.config, model.graph)
        if ops is not None:
            for node, start, stop, values in ops:
                scale_output_rows(model, tmp, node, start, stop, values)
            return "MatMulNBits scale rows (exact, no re-quantization)", "quantized weights"
        notes.append("some IA3 vectors cannot be folded into quantized rows exactly; "
                     "they were folded into the full-precision weights before quantization")
        for f in tmp.iterdir():  # rebuild below from the folded weights
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    if adapter.quant == "nf4":
        nf4 = load_base(lb.source.spec, quant="nf4")
        model = merge_loaded(nf4, adapter)
        into = "dequantized NF4 weights (the base it was trained on)"
        notes.append("adapter was trained on NF4: folded into the dequantized NF4 weights before the build"
                     + (f", then quantized to {precision}" if precision in ("int4", "int8") else ""))
    else:
        fold_into_model(lb.model, adapter, lb.family)
        model = lb.model
        into = "full-precision weights"
    hf = _save_hf(model, lb.tokenizer, work / "merged_hf")
    _build(lb, hf, tmp, precision, provider, extra, work)
    return f"folded in torch before the {precision} build", into


def _ensure_chat_template(model_dir: Path, lb: LoadedBase) -> None:
    """chat_template.jinja beside the model, so every runtime renders prompts identically."""
    if (model_dir / TEMPLATE_FILE).exists():
        return
    template = read_template(lb.source.hf_path) or getattr(lb.tokenizer, "chat_template", None)
    if isinstance(template, str):
        (model_dir / TEMPLATE_FILE).write_text(template)


def _manifest(lb: LoadedBase, identity: Any, precision: str, provider: str, plans: list[IA3Input],
              merged: Merged | None, fuse_qkv: bool) -> ExportManifest:
    return ExportManifest(
        "onnx", lb.family.name, {"name": lb.source.name, "spec": lb.source.spec, **identity.to_dict()},
        merged=merged, precision=precision, model_file=MODEL_FILE,
        mode="merged" if merged else ("side" if plans else "base"),
        ia3_inputs=[p.to_dict() for p in plans], fingerprint=f"{identity.fingerprint}/{identity.content}",
        extra={"provider": provider,
               "fuse_qkv": fuse_qkv and any(len(p.parts) > 1 for p in plans) if plans else fuse_qkv,
               "sites": sorted({part[0] for p in plans for part in p.parts}),
               "builder": f"onnxruntime-genai {builder.builder_version()}", "mobile": None})

