"""Export step: base (+ adapters) in, a runtime artifact out.

The per-format steps live in ``edgeia3/steps/`` (ONNX, T5 ONNX, GGUF), the format work
they drive in ``converters/``; this module is the stable entry both the CLI and Python
users call.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgeIA3Error
from .manifest import WEB_KIND, AdapterEntry, ExportManifest


def export_onnx(base: str, out: str | Path, precision: str = "int4",
                adapters: dict[str, str] | None = None, merge: str | None = None,
                provider: str = "cpu", mobile: bool = False, fuse_qkv: bool = True,
                accuracy_level: int | None = None, force: bool = False, weights: str = "auto",
                strict: bool = False) -> Any:
    """ONNX export for onnxruntime-genai, adapters as side-tensors or merged.

    ``accuracy_level``: MatMulNBits compute precision (builder default 4 = int8
    activations; 1 = fp32, slower, makes int4 side and merged agree to ~1e-4).
    ``weights``: "auto" (a GGUF's own blocks when the base or the adapters' training
    has one), "builder" or a llama.cpp type. ``strict``: refuse adapters trained on
    other weights. An existing non-empty ``out`` is refused unless ``force``.
    """
    from .steps.onnx_export import export

    if is_encoder_decoder(base):  # T5: edgeia3's own encoder + decoder-with-past graphs
        return _export_t5_onnx(base, out, precision, adapters or {}, merge, mobile, force)

    def build(where: Path, force_it: bool) -> Any:
        return export(base=base, out=where, precision=precision, adapters=adapters or {},
                      merge=merge, provider=provider, mobile=mobile, fuse_qkv=fuse_qkv,
                      accuracy_level=accuracy_level, force=force_it, weights=weights, strict=strict)

    return _with_chat_templates(build, "onnx", out, force, adapters or {})


def is_encoder_decoder(base: str) -> bool:
    from .base import resolve_base
    from .fingerprint import hf_config
    from .registry import family_for_config

    src = resolve_base(base)
    if not Path(src.hf_path).is_dir():
        return False  # a hub id: the builder path reports what it cannot do
    return family_for_config(hf_config(src.hf_path)).encoder_decoder


def _export_t5_onnx(base: str, out: str | Path, precision: str, adapters: dict[str, str], merge: str | None,
                    mobile: bool, force: bool) -> str:
    from .steps.t5_export import export_t5

    if mobile:
        raise EdgeIA3Error("T5 ONNX exports have no --mobile form yet (onnxruntime-genai's builder has no T5)")
    doc = export_t5(base, out, adapters, merge, force, precision)
    what = f"merged '{merge}'" if merge else f"side adapters: {', '.join(doc.adapters) or 'none'}"
    return (f"ONNX export of {base} (t5, {precision}, encoder + decoder-with-past graphs, run by onnxruntime with "
            f"edgeia3's generation loop): {what} -> {out}")


def export_gguf(base: str, out: str | Path, quant: str | None = None,
                adapters: dict[str, str] | None = None, merge: str | None = None, force: bool = False,
                strict: bool = False) -> Any:
    """GGUF export for llama.cpp, with IA3 adapter GGUFs or one merged in exactly.

    ``quant`` None: the quantization the adapters were trained on, else a GGUF base
    as is / q4_0 for a transformers base. ``strict``: refuse adapters trained on
    other weights. An existing non-empty ``out`` is refused unless ``force``.
    """
    from .steps.gguf_export import export

    def build(where: Path, force_it: bool) -> Any:
        return export(base=base, out=where, quant=quant, adapters=adapters or {}, merge=merge, force=force_it,
                      strict=strict)

    return _with_chat_templates(build, "gguf", out, force, adapters or {})


# -- chat templates the adapters were trained with (train --chat-template) ------------------------
def _with_chat_templates(build: Any, kind: str, out: str | Path, force: bool, adapters: dict[str, str]) -> Any:
    """Run the converter ``build(dir, force)``; when adapters recorded a chat template, carry it into the
    export: the manifest's adapter entry (where it differs from the export's own template) and, for a
    base with none, ``chat_template.jinja`` beside the model - what a stock runtime user picks up (the
    base GGUF is not rewritten for it). Done inside one temp dir, so ``out`` still appears complete or
    not at all."""
    from .atomic import atomic_dir
    from .manifest import read_manifest

    recorded = _recorded_templates(adapters)
    if not recorded:
        return build(Path(out), force)
    with atomic_dir(out, force=force) as tmp:
        res = build(tmp, False)  # the converter renames its finished dir over our empty temp one
        notes = _carry_templates(tmp, kind, recorded)
    res = dataclasses.replace(res, out=Path(out), manifest=read_manifest(out))
    res.notes.extend(notes)
    return res


def _recorded_templates(adapters: dict[str, str]) -> dict[str, str]:
    """NAME -> the chat template each adapter recorded at training (none: left out)."""
    from .errors import EdgeIA3Error
    from .formats import load_adapter
    from .prompts import recorded_template

    found = {}
    for name, path in adapters.items():
        try:
            if Path(path).suffix == ".gguf":
                from edgeia3.converters.gguf.adapter_file import read_ia3_gguf

                ad = read_ia3_gguf(Path(path))
            else:
                ad = load_adapter(path)
        except EdgeIA3Error:
            continue  # a bare PEFT dir records nothing; the converter reports real errors
        if recorded_template(ad):
            found[name] = recorded_template(ad)
    return found


def _carry_templates(directory: Path, kind: str, recorded: dict[str, str]) -> list[str]:
    from .manifest import MANIFEST, read_manifest, write_manifest
    from .prompts import TEMPLATE_FILE, read_template

    m = read_manifest(directory)
    own = read_template(directory)  # ONNX: what the converter wrote beside the model
    if kind == "gguf":
        from edgeia3.converters.gguf.ggml_index import GGUFIndex

        own = GGUFIndex(directory / str(m.model_file)).kv.get("tokenizer.chat_template")
    notes = []
    distinct = set(recorded.values())
    if not own and len(distinct) == 1:
        own = distinct.pop()
        (directory / TEMPLATE_FILE).write_text(own)
        notes.append(f"the base has no chat template: {TEMPLATE_FILE} is the one the adapters were trained with")
    elif not own:
        notes.append(f"the base has no chat template and the adapters were trained with different ones: no "
                     f"{TEMPLATE_FILE}; each adapter's is in its manifest entry ({MANIFEST})")
    for name, template in recorded.items():
        if name in m.adapters and template != own:
            m.adapters[name].chat_template = template
    m.notes = m.notes + notes
    write_manifest(directory, m)
    return notes


@dataclass
class ExportInfo:
    """What any export directory holds, read from its manifest (edgeia3.json)."""

    path: Path
    kind: str  # onnx | gguf | onnx-t5 | web
    precision: str  # int4 / fp32 ... or the GGUF file type (Q4_1 ...)
    base_spec: str  # how to load the same base in PyTorch (the drift reference)
    model_bytes: int
    adapter_files: dict[str, Path]  # name -> side adapter file
    adapter_bytes: dict[str, int]
    merged: str | None  # name of the adapter folded into the weights, if any
    manifest: ExportManifest

    @property
    def label(self) -> str:
        mode = f"merged '{self.merged}'" if self.merged else "side"
        return f"{self.kind} {self.precision} {mode}"

    def adapters(self) -> dict[str, Any]:
        """Canonical adapters read back from the export's own adapter files."""
        return _READERS[self.kind][1](self)


def _typed(value: Any, kind: Any, what: str) -> Any:
    """``value`` if it is a ``kind`` (ints exclude bools), else a TypeError naming ``what``."""
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise TypeError(f"{what} is {str(value)[:40]!r}")
    return value


def _info(path: Path, m: ExportManifest, precision: Any, model_bytes: Any,
          files: dict[str, AdapterEntry]) -> ExportInfo:
    """The ExportInfo of ``m`` (the typed manifest checked the field types; these must be present)."""
    return ExportInfo(path, m.kind, _typed(precision, str, "precision"), m.base_spec,
                      _typed(model_bytes, int, "model_bytes"), {n: path / a.file for n, a in files.items()},
                      {n: _typed(a.bytes, int, f"adapter {n} bytes") for n, a in files.items()}, m.merged_name, m)


def _canonical(m: ExportManifest) -> None:
    """A merged adapter keeps its canonical vectors (what the report compares with)."""
    if m.merged is not None:
        _typed(m.adapters[m.merged.name].canonical, str, f"adapter {m.merged.name} canonical")


def _onnx_info(path: Path, m: ExportManifest) -> ExportInfo:
    from edgeia3.converters.onnx.graph import plans_of

    from .registry import get_family

    family_sites = {s.name for s in get_family(m.family).sites}
    used = set()
    for p in plans_of(m):  # what _onnx_adapters reads the adapter files with
        _typed(p.name, str, "an IA3 input name")
        if not (_typed(p.layer, int, "layer") >= 0 and p.scaling in ("output", "input")
                and _typed(p.size, int, "size") > 0 and _typed(p.parts, list, "parts")):
            raise ValueError(f"IA3 input {p.name}: bad layer, scaling or size")
        for part in p.parts:
            site, start, stop = _typed(part, list, "a part")
            if not (_typed(site, str, "site") in family_sites and (p.layer, site) not in used
                    and 0 <= _typed(start, int, "start") < _typed(stop, int, "stop") <= p.size):
                raise ValueError(f"IA3 input {p.name}: bad part {part}")
            used.add((p.layer, site))
    for n, a in m.side_adapters.items():
        if not set(a.sites) <= family_sites:
            raise ValueError(f"adapter {n}: sites {a.sites} are not all sites of {m.family}")
    _canonical(m)
    return _info(path, m, m.precision, m.model_bytes, m.side_adapters)


def _onnx_adapters(info: ExportInfo) -> dict[str, Any]:
    from edgeia3.converters.onnx.adapter_file import read_onnx_adapter
    from edgeia3.converters.onnx.graph import plans_of

    from .adapter import IA3Adapter

    m = info.manifest
    out = {}
    for n, p in info.adapter_files.items():
        entry = m.adapters[n]
        ad = read_onnx_adapter(p, plans_of(m), m.family, entry.sites)
        # the file holds only tensors; what it was trained on is in the manifest
        out[n] = dataclasses.replace(ad, quant=entry.trained_quant or "none", trained_on=entry.trained_weights or {},
                                     extra=_template_extra(entry))
    if info.merged:  # folded into the weights; the export keeps its canonical vectors
        out[info.merged] = IA3Adapter.load(info.path / str(m.adapters[info.merged].canonical))
    return out


def _template_extra(entry: AdapterEntry) -> dict:
    """The chat template a manifest entry carries, as adapter metadata (IA3Adapter.extra)."""
    from .prompts import RECORD_KEY

    return {RECORD_KEY: entry.chat_template} if entry.chat_template else {}


def _gguf_info(path: Path, m: ExportManifest) -> ExportInfo:
    for n, a in m.adapters.items():
        _typed(a.file, str, f"adapter {n} file")
    model = path / _typed(m.model_file, str, "model")
    if not model.is_file():
        raise ValueError(f"its model file {model} is missing")
    return _info(path, m, m.quant, model.stat().st_size, m.adapters)


def _gguf_adapters(info: ExportInfo) -> dict[str, Any]:
    from edgeia3.converters.gguf.adapter_file import read_ia3_gguf

    return {n: read_ia3_gguf(p) for n, p in info.adapter_files.items()}


def _t5_onnx_info(path: Path, m: ExportManifest) -> ExportInfo:
    _canonical(m)
    return _info(path, m, m.precision, m.model_bytes, m.side_adapters)


def _t5_onnx_adapters(info: ExportInfo) -> dict[str, Any]:
    """The side inputs back as canonical adapters (ones where an adapter leaves a site alone)."""
    from safetensors.numpy import load_file

    from .adapter import IA3Adapter, IA3Vector
    from .registry import get_family

    m = info.manifest
    fam = get_family(m.family)
    out = {}
    for n, p in info.adapter_files.items():
        tensors, entry = load_file(str(p)), m.adapters[n]
        vectors = [IA3Vector(i["layer"], i["site"], fam.site(i["site"]).scaling, tensors[i["name"]].reshape(-1))
                   for i in m.ia3_inputs or [] if i["site"] in entry.sites]
        out[n] = IA3Adapter(fam.name, vectors, quant=entry.trained_quant or "none",
                            trained_on=entry.trained_weights or {}, extra=_template_extra(entry))
    if info.merged:
        out[info.merged] = IA3Adapter.load(info.path / str(m.adapters[info.merged].canonical))
    return out


def _web_info(path: Path, m: ExportManifest) -> ExportInfo:
    """An ``export web`` folder: the ONNX export's IA3 inputs, its browser graph's files."""
    from .registry import get_family

    graph = m.extra["graph"]
    files = [_typed(graph["file"], str, "graph file"), *_typed(graph["external_data"], list, "external data")]
    # the web manifest keeps each input's name, size, layer and parts; its scaling is its sites'
    scaling = {s.name: s.scaling.value for s in get_family(m.family).sites}
    inputs = [{"node": "", "scaling": scaling[_typed(d["parts"], list, "parts")[0][0]], **d}
              for d in _typed(m.ia3_inputs or [], list, "ia3_inputs")]
    m = dataclasses.replace(m, ia3_inputs=inputs, model_bytes=sum((path / f).stat().st_size for f in files))
    info = _onnx_info(path, m)
    return dataclasses.replace(info, precision=f"{info.precision} {graph['matmul']}")


def _web_adapters(info: ExportInfo) -> dict[str, Any]:
    from edgeia3.converters.onnx.adapter_file import adapter_from_tensors
    from edgeia3.converters.onnx.graph import plans_of
    from edgeia3.converters.onnx.web import read_web_adapter

    m = info.manifest
    return {n: dataclasses.replace(adapter_from_tensors(read_web_adapter(p)[0], plans_of(m), m.family,
                                                        m.adapters[n].sites, p),
                                   quant=m.adapters[n].trained_quant or "none",
                                   trained_on=m.adapters[n].trained_weights or {},
                                   extra=_template_extra(m.adapters[n]))
            for n, p in info.adapter_files.items()}


# manifest kind -> (info reader, adapter reader)
_READERS = {"onnx": (_onnx_info, _onnx_adapters), "gguf": (_gguf_info, _gguf_adapters),
            "onnx-t5": (_t5_onnx_info, _t5_onnx_adapters), WEB_KIND: (_web_info, _web_adapters)}


def read_export(path: str | Path) -> ExportInfo:
    """Read an export directory's manifest; one clear error if it is not one."""
    from .errors import EdgeIA3Error
    from .manifest import KINDS, MANIFEST, read_manifest

    path = Path(path)
    m = read_manifest(path, (*KINDS, WEB_KIND))
    manifest = path / MANIFEST
    try:
        return _READERS[m.kind][0](path, m)
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise EdgeIA3Error(f"{manifest}: damaged export manifest ({type(e).__name__}: {e})") from None
    except EdgeIA3Error as e:  # an unknown family
        raise EdgeIA3Error(f"{manifest}: {e}") from None
