"""The export manifest ``edgeia3.json``: one file name, one reader, one writer for every format.

Every export directory (ONNX, GGUF) holds one. Common fields, written by
``write_manifest`` for both:

- ``kind``: "onnx" | "gguf" - which runtime opens the directory;
- ``format_version``: bumped when a field changes meaning;
- ``family``, ``base`` (name/spec and identity), ``adapters`` (name -> entry with at
  least ``sites``, ``params``, ``trained_on`` / ``trained_quant``, ``trained_weights``,
  ``same_weights``), ``weights`` (what the export runs, see edgeia3.weights),
  ``notes``;
- ``merged``: the adapter folded into the weights (ONNX: an object whose ``name``
  says which, with the method; GGUF: the name) - read it with ``merged_name``.

Format-specific fields (ONNX: ``ia3_inputs``, builder options, mobile; GGUF: the
model file's quantization) sit beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import EdgeIA3Error

MANIFEST = "edgeia3.json"
FORMAT_VERSION = 2
KINDS = ("onnx", "gguf", "onnx-t5")  # onnx-t5: converters/onnx/t5.py (encoder + decoder graphs)


def write_manifest(directory: str | Path, kind: str, fields: dict[str, Any]) -> Path:
    """Write ``fields`` as the manifest of ``directory`` with the common header fields."""
    if kind not in KINDS:
        raise ValueError(f"unknown export kind {kind!r}")
    doc = {"kind": kind, "format_version": FORMAT_VERSION, **fields}
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an export directory; one EdgeIA3Error naming the path if it is not one."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise EdgeIA3Error(f"{directory} is not an edgeia3 export directory (no {MANIFEST})")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise EdgeIA3Error(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise EdgeIA3Error(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(doc, dict):
        raise EdgeIA3Error(f"{path}: holds a JSON {type(doc).__name__}, not an export manifest")
    kind = manifest_kind(doc)
    if kind not in KINDS:
        raise EdgeIA3Error(f"{path}: unknown export kind {kind!r}")
    version = doc.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EdgeIA3Error(f"{path}: manifest version {version!r} is newer than this edgeia3 reads "
                           f"({FORMAT_VERSION}); upgrade edgeia3")
    return doc


def manifest_kind(doc: dict[str, Any]) -> Any:
    """The export kind ("onnx" | "gguf"); version-1 ONNX manifests said it as ``format``."""
    return doc.get("kind") or ("onnx" if doc.get("format") == "edgeia3-onnx" else None)


def export_kind(directory: str | Path) -> str | None:
    """The kind of export at ``directory`` without raising (None: not an export)."""
    try:
        return manifest_kind(read_manifest(directory))
    except EdgeIA3Error:
        return None


def merged_name(doc: dict[str, Any]) -> str | None:
    """Name of the adapter folded into the export's weights (None: none)."""
    merged = doc.get("merged")
    if isinstance(merged, dict):
        return merged.get("name")
    return merged
