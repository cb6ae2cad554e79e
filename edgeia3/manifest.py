"""The export manifest ``edgeia3.json``: one file name, one typed manifest, one reader, one writer.

Every export directory (ONNX, GGUF, ONNX-T5, web) holds one. ``ExportManifest`` is its typed form
and ``AdapterEntry`` the entry of each adapter; ``to_json`` / ``from_json`` are the one round-trip
(``write_manifest`` / ``read_manifest`` put it on disk). Common fields:

- ``kind``: "onnx" | "gguf" | "onnx-t5" - which runtime opens the directory ("web": the browser's
  folder, read by its page and ``edgeia3.web.read_web_manifest``, opened by no runtime);
- ``format_version``: bumped when a field changes meaning (the web folder counts its own);
- ``family``, ``base`` (name/spec and identity), ``adapters`` (name -> entry with ``sites``,
  ``params``, the training quantization, ``trained_weights``, ``same_weights``, its file or, when
  merged, its ``canonical`` vectors), ``weights`` (what the export runs, see edgeia3.weights),
  ``token_contract``, ``notes``;
- ``merged``: the adapter folded into the weights (``Merged``: name, and for ONNX the method).

Format-specific fields the readers use are typed too (``precision``, GGUF ``quant``, the model
file, ``model_bytes``, ``mode``, ``ia3_inputs``, ``fingerprint``); the rest (ONNX builder options,
mobile, T5 graph sizes, the web page's graph/decoder/runtime) stay in ``extra`` as written.

On disk the keys are those earlier releases wrote, so older manifests read and stock readers keep
working: GGUF writes ``merged`` as the adapter's name and an adapter's quantization as
``trained_quant``, ONNX writes ``merged`` as an object and ``trained_on``; ``model`` (GGUF) and
``model_file`` (ONNX) name the model file. Version-1 ONNX manifests said their kind as
``"format": "edgeia3-onnx"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EdgeIA3Error

MANIFEST = "edgeia3.json"
FORMAT_VERSION = 2
KINDS = ("onnx", "gguf", "onnx-t5")  # opened by a runtime; onnx-t5: converters/onnx/t5.py
WEB_KIND, WEB_FORMAT_VERSION = "web", 1  # the browser folder (edgeia3/web.py) versions its own fields
VERSIONS = {**{k: FORMAT_VERSION for k in KINDS}, WEB_KIND: WEB_FORMAT_VERSION}  # newest each kind reads

_QUANT_KEY = {"gguf": "trained_quant"}  # an adapter's training quantization; else "trained_on"
_MODEL_KEY = {"gguf": "model"}  # the model file; else "model_file"


def _check(value: Any, kind: Any, what: str, optional: bool = True) -> Any:
    """``value`` if it is a ``kind`` (or None where ``optional``; ints exclude bools), else a TypeError."""
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise TypeError(f"{what} is {str(value)[:40]!r}")
    return value


@dataclass
class Merged:
    """The adapter folded into an export's weights, and how (ONNX: method and what it went into)."""

    name: str
    method: str | None = None
    into: str | None = None

    @classmethod
    def from_json(cls, value: Any) -> Merged | None:
        """Either shape: the name (GGUF) or an object with ``name`` (ONNX); None: none merged."""
        if value is None:
            return None
        if isinstance(value, str):
            return cls(value)
        _check(value, dict, "merged", optional=False)
        return cls(_check(value.get("name"), str, "merged name", optional=False),
                   _check(value.get("method"), str, "merged method"), _check(value.get("into"), str, "merged into"))

    def to_json(self, kind: str) -> Any:
        if kind == "gguf":
            return self.name
        doc = {"method": self.method, "into": self.into, "name": self.name}
        return {k: v for k, v in doc.items() if v is not None}


@dataclass
class AdapterEntry:
    """One adapter of an export: its sites, size, file (side) or canonical vectors (merged), and
    what it was trained on."""

    sites: list[str] = field(default_factory=list)
    params: int = 0
    file: str | None = None  # the side adapter file, relative to the export
    bytes: int | None = None
    canonical: str | None = None  # merged: the adapter's canonical vectors, for provenance and reports
    trained_quant: str | None = None  # IA3Adapter.quant ("none", "nf4", a llama.cpp type ...)
    trained_weights: dict | None = None  # IA3Adapter.trained_on
    same_weights: bool | None = None  # the export runs the weights it was trained on
    token_contract: dict | None = None  # the special tokens it was trained with
    chat_template: str | None = None  # the template it was trained with, where it differs
    source: str | None = None  # the path it was exported from
    extra: dict[str, Any] = field(default_factory=dict)  # any other field, as written

    _TYPED = ("sites", "params", "file", "bytes", "canonical", "trained_on", "trained_quant", "trained_weights",
              "same_weights", "token_contract", "chat_template", "source")

    @classmethod
    def from_json(cls, doc: Any, name: str = "") -> AdapterEntry:
        what = f"adapter {name}"
        _check(doc, dict, what, optional=False)
        sites = _check(doc.get("sites", []), list, f"{what} sites", optional=False)
        entry = cls(
            sites=[_check(s, str, f"{what} site", optional=False) for s in sites],
            params=_check(doc.get("params", 0), int, f"{what} params", optional=False),
            file=_check(doc.get("file"), str, f"{what} file"),
            bytes=_check(doc.get("bytes"), int, f"{what} bytes"),
            canonical=_check(doc.get("canonical"), str, f"{what} canonical"),
            trained_quant=_check(doc.get("trained_on", doc.get("trained_quant")), str, f"{what} trained_on"),
            trained_weights=_check(doc.get("trained_weights"), dict, f"{what} trained_weights"),
            same_weights=_check(doc.get("same_weights"), bool, f"{what} same_weights"),
            token_contract=_check(doc.get("token_contract"), dict, f"{what} token_contract"),
            chat_template=_check(doc.get("chat_template"), str, f"{what} chat_template"),
            source=_check(doc.get("source"), str, f"{what} source"),
            extra={k: v for k, v in doc.items() if k not in cls._TYPED})
        if entry.file is not None and entry.bytes is None:
            raise KeyError(f"{what}: a file without its bytes")
        return entry

    def to_json(self, kind: str) -> dict[str, Any]:
        doc = {"file": self.file, "sites": list(self.sites), "params": self.params, "bytes": self.bytes,
               _QUANT_KEY.get(kind, "trained_on"): self.trained_quant, "source": self.source,
               "trained_weights": self.trained_weights, "same_weights": self.same_weights,
               "token_contract": self.token_contract, "canonical": self.canonical,
               "chat_template": self.chat_template}
        return {**{k: v for k, v in doc.items() if v is not None}, **self.extra}


@dataclass
class ExportManifest:
    """What an export directory holds (``edgeia3.json``), typed; see the module docstring."""

    kind: str
    family: str
    base: dict[str, Any]  # spec, name; identity nested (GGUF, T5) or inline (ONNX)
    adapters: dict[str, AdapterEntry] = field(default_factory=dict)
    merged: Merged | None = None
    weights: dict | None = None
    token_contract: dict | None = None  # what the export's own tokenizer adds (GGUF: None when unknown)
    notes: list[str] = field(default_factory=list)
    precision: str | None = None  # ONNX, T5, web
    quant: str | None = None  # GGUF: the model file's type
    model_file: str | None = None  # GGUF "model", ONNX "model_file"
    model_bytes: int | None = None
    mode: str | None = None  # "side" | "merged" | "base"
    ia3_inputs: list[dict] | None = None  # the graph's IA3 inputs (ONNX, T5, web)
    fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the kind's other fields, as written
    format_version: int = FORMAT_VERSION

    _TYPED = ("kind", "format", "format_version", "family", "base", "adapters", "merged", "weights",
              "token_contract", "notes", "precision", "quant", "model_bytes", "mode", "ia3_inputs", "fingerprint")

    @property
    def merged_name(self) -> str | None:
        """Name of the adapter folded into the export's weights (None: none)."""
        return self.merged.name if self.merged else None

    @property
    def base_spec(self) -> str:
        """How to load the same base (a name, path or hub id)."""
        return _check(self.base.get("spec"), str, "base spec", optional=False)

    @property
    def base_identity(self) -> dict[str, Any]:
        """The base's identity (fingerprint, content, ...), wherever this kind keeps it."""
        return self.base.get("identity") or self.base

    @property
    def side_adapters(self) -> dict[str, AdapterEntry]:
        """The adapters with a side file (not the merged one)."""
        return {n: a for n, a in self.adapters.items() if a.file is not None}

    @classmethod
    def from_json(cls, doc: Any) -> ExportManifest:
        """The typed manifest of ``doc`` (any release's); TypeError / KeyError / ValueError if damaged."""
        _check(doc, dict, "the manifest", optional=False)
        kind = manifest_kind(doc)
        if kind not in VERSIONS:
            raise ValueError(f"unknown export kind {str(kind)[:40]!r}")
        model_key = _MODEL_KEY.get(kind, "model_file")
        adapters = _check(doc.get("adapters", {}), dict, "adapters", optional=False)
        notes = _check(doc.get("notes") or [], list, "notes", optional=False)
        return cls(
            kind=kind, family=_check(doc.get("family"), str, "family", optional=False),
            base=_check(doc.get("base"), dict, "base", optional=False),
            adapters={_check(n, str, "an adapter name", optional=False): AdapterEntry.from_json(a, n)
                      for n, a in adapters.items()},
            merged=Merged.from_json(doc.get("merged")),
            weights=_check(doc.get("weights"), dict, "weights"),
            token_contract=_check(doc.get("token_contract"), dict, "token_contract"),
            notes=[str(n) for n in notes],
            precision=_check(doc.get("precision"), str, "precision"), quant=_check(doc.get("quant"), str, "quant"),
            model_file=_check(doc.get(model_key), str, model_key),
            model_bytes=_check(doc.get("model_bytes"), int, "model_bytes"),
            mode=_check(doc.get("mode"), str, "mode"),
            ia3_inputs=_ia3_inputs(doc.get("ia3_inputs")),
            fingerprint=_check(doc.get("fingerprint"), str, "fingerprint"),
            extra={k: v for k, v in doc.items() if k not in cls._TYPED and k != model_key},
            format_version=_check(doc.get("format_version", 1), int, "format_version", optional=False))

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to ``edgeia3.json`` (the keys earlier releases wrote)."""
        doc: dict[str, Any] = {"kind": self.kind, "format_version": self.format_version, "family": self.family,
                               "base": self.base}
        optional = {"fingerprint": self.fingerprint, "precision": self.precision, "quant": self.quant,
                    _MODEL_KEY.get(self.kind, "model_file"): self.model_file, "mode": self.mode,
                    "ia3_inputs": self.ia3_inputs, "model_bytes": self.model_bytes, "weights": self.weights}
        doc.update({k: v for k, v in optional.items() if v is not None})
        doc["token_contract"] = self.token_contract  # null says "unknown" (llama.cpp refused the vocabulary)
        doc["merged"] = self.merged.to_json(self.kind) if self.merged else None
        doc["adapters"] = {n: a.to_json(self.kind) for n, a in self.adapters.items()}
        doc["notes"] = list(self.notes)
        return {**doc, **{k: v for k, v in self.extra.items() if k not in doc}}


def _ia3_inputs(value: Any) -> list[dict] | None:
    if value is None:
        return None
    return [_check(i, dict, "an IA3 input", optional=False) for i in _check(value, list, "ia3_inputs")]


def manifest_kind(doc: dict[str, Any]) -> Any:
    """The export kind ("onnx" | "gguf" | ...); version-1 ONNX manifests said it as ``format``."""
    return doc.get("kind") or ("onnx" if doc.get("format") == "edgeia3-onnx" else None)


def write_manifest(directory: str | Path, manifest: ExportManifest) -> Path:
    """Write ``manifest`` as ``directory``'s ``edgeia3.json``."""
    if manifest.kind not in VERSIONS:
        raise ValueError(f"unknown export kind {manifest.kind!r}")
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return path


def read_manifest(directory: str | Path, kinds: tuple[str, ...] = KINDS) -> ExportManifest:
    """The manifest of an export directory (one of ``kinds``); one EdgeIA3Error naming the path if it
    is not one, or is damaged."""
    path = Path(directory) / MANIFEST
    return parse_manifest(_read_json(Path(directory)), path, kinds)


def parse_manifest(doc: Any, path: str | Path, kinds: tuple[str, ...] = KINDS) -> ExportManifest:
    """``doc`` (read from ``path``) as a manifest of one of ``kinds``; one EdgeIA3Error if it is not."""
    _check_header(doc, path, kinds)
    try:
        return ExportManifest.from_json(doc)
    except (KeyError, TypeError, ValueError) as e:
        raise EdgeIA3Error(f"{path}: damaged export manifest ({type(e).__name__}: {e})") from None


def export_kind(directory: str | Path) -> str | None:
    """The kind of export at ``directory`` without raising (None: not an export); only the
    header is read, so a damaged manifest still names its runtime (which then says what is wrong)."""
    try:
        doc = _read_json(Path(directory))
        return _check_header(doc, Path(directory) / MANIFEST, (*KINDS, WEB_KIND))
    except EdgeIA3Error:
        return None


def _read_json(directory: Path) -> Any:
    path = directory / MANIFEST
    if not path.is_file():
        raise EdgeIA3Error(f"{directory} is not an edgeia3 export directory (no {MANIFEST})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise EdgeIA3Error(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise EdgeIA3Error(f"{path}: cannot read it ({e.strerror or e})") from None


def _check_header(doc: Any, path: str | Path, kinds: tuple[str, ...]) -> str:
    """The kind of manifest ``doc``, refusing one of no kind in ``kinds`` or a newer version."""
    if not isinstance(doc, dict):
        raise EdgeIA3Error(f"{path}: holds a JSON {type(doc).__name__}, not an export manifest")
    kind = manifest_kind(doc)
    if not isinstance(kind, str) or kind not in kinds:
        raise EdgeIA3Error(f"{path}: unknown export kind {kind!r}")
    version = doc.get("format_version", 1)
    if not isinstance(version, int) or version > VERSIONS[kind]:
        raise EdgeIA3Error(f"{path}: manifest version {version!r} is newer than this edgeia3 reads "
                           f"({VERSIONS[kind]}); upgrade edgeia3")
    return kind
