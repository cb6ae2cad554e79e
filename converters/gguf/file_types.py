"""The one table of llama.cpp file types (``--quant`` / ``--weights`` names) edgeia3 knows.

One ``FileType`` entry per llama.cpp ftype: its CLI name (llama.cpp's own, lower case:
"q4_k_m"), gguf-py's ``LlamaFileType`` member, and what edgeia3 does with it - train on it
(a transformers base quantized once, cached), offer it to ``export gguf --quant``, write it
with edgeia3's own GGUF writer, quantize it "pure". The numbers come from gguf-py, resolved
on use, so importing this table (the CLI's help texts) costs nothing. Adding a file type is
one entry here plus its test (``tests/test_quant_types.py`` checks every entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeia3.errors import EdgeIA3Error


@dataclass(frozen=True)
class FileType:
    """One llama.cpp file type, by its CLI name."""

    name: str  # llama.cpp's name in lower case: LLAMA_FTYPE_MOSTLY_<NAME> (f32: ALL_F32)
    train: bool = False  # `train --quant` / `export onnx --weights`: the base quantized once by llama.cpp
    export: bool = False  # offered by `export gguf --quant`
    writer: bool = False  # written by edgeia3's own GGUF writer, without llama.cpp's quantizer
    pure: bool = False  # quantized pure: embedding and LM head in this type too (all-integer ONNX transcode)

    @property
    def member(self) -> str:
        """gguf-py's ``LlamaFileType`` member name (llama.cpp's ``LLAMA_FTYPE_`` suffix)."""
        return "ALL_F32" if self.name == "f32" else f"MOSTLY_{self.name.upper()}"

    @property
    def ftype(self) -> Any:
        """gguf-py's ``LlamaFileType`` member (an IntEnum: llama.cpp's ftype number)."""
        import gguf

        return gguf.LlamaFileType[self.member]


FILE_TYPES: dict[str, FileType] = {f.name: f for f in (
    FileType("q4_0", train=True, export=True, pure=True),
    FileType("q4_1", train=True, export=True),
    FileType("q5_0", train=True),
    FileType("q5_1", train=True),
    FileType("q8_0", train=True, export=True, pure=True),
    FileType("q2_k", train=True),
    FileType("q3_k_s"),
    FileType("q3_k_m", train=True),
    FileType("q3_k_l"),
    FileType("q4_k_s"),
    FileType("q4_k_m", train=True, export=True),
    FileType("q5_k_s"),
    FileType("q5_k_m", train=True, export=True),
    FileType("q6_k", train=True),
    FileType("f32", writer=True),
    FileType("f16", export=True, writer=True),
    FileType("bf16"),
)}


def file_type_names(*flags: str) -> tuple[str, ...]:
    """CLI names of the file types with any of ``flags`` set ("train", "export", "writer",
    "pure"), in table order; every name without flags."""
    return tuple(f.name for f in FILE_TYPES.values() if not flags or any(getattr(f, k) for k in flags))


def file_type(name: str) -> FileType:
    """The entry of CLI name ``name`` (any case)."""
    entry = FILE_TYPES.get(name.lower())
    if entry is None:
        raise EdgeIA3Error(f"unknown GGUF quantization '{name.lower()}' "
                           f"(choose from {', '.join(file_type_names('export'))})")
    return entry


def choices(names: tuple[str, ...]) -> str:
    """'a, b or c': for help texts."""
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


# The llama.cpp types a training base is quantized to (`train --quant`, `export onnx --weights`).
TRAIN_QUANTS = file_type_names("train")
# What `export gguf --quant` offers (it also takes every TRAIN_QUANTS name and f32).
EXPORT_QUANTS = file_type_names("export")
# Written by edgeia3's writer without llama.cpp's quantizer.
WRITER_TYPES = file_type_names("writer")
