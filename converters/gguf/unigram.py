"""A ``tokenizer.json`` whose model is Unigram, read as llama.cpp's "t5" (UGM) vocabulary.

transformers 5 saves a T5 tokenizer built in memory (or converted from ``spiece.model``
and saved again) as ``tokenizer.json`` alone: the Unigram pieces with their scores, the
normalizer (SentencePiece's compiled character map as a ``Precompiled`` step, possibly
inside a ``Sequence``), and the pre-tokenizer (``WhitespaceSplit`` + ``Metaspace``). The
GGUF fields llama.cpp's UGM tokenizer reads are the ones a SentencePiece model gives:

- ``add_space_prefix``: a ``Metaspace`` that prepends "▁" (``prepend_scheme`` "always" or
  "first", or the older ``add_prefix_space``), or a ``Prepend("▁")`` normalizer;
- ``remove_extra_whitespaces``: whitespace runs collapse (a ``WhitespaceSplit``
  pre-tokenizer, or a ``Replace`` of " {2,}" by one space), as SentencePiece's flag does;
- ``precompiled_charsmap``: the ``Precompiled`` normalizer's bytes.

Steps llama.cpp has no counterpart for (``Lowercase``, ``NFKC``, a ``Split`` regex, ...)
are listed in ``unmatched``; the writer names them, and its probe text tells whether
llama.cpp still tokenizes as transformers does.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeia3.errors import EdgeIA3Error

SPACE = "\u2581"  # SentencePiece's escaped space


@dataclass(frozen=True)
class UnigramJSON:
    path: Path
    pieces: list[tuple[str, float]]  # in id order
    unk_id: int | None
    byte_fallback: bool
    charsmap: bytes
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    unmatched: tuple[str, ...]  # normalizer / pre-tokenizer steps llama.cpp cannot follow


def read_tokenizer_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgeIA3Error(f"cannot read {path}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise EdgeIA3Error(f"{path} is not a tokenizers file (no 'model' object)")
    return doc


def model_type(path: Path) -> str | None:
    """The ``model.type`` of a tokenizer.json ("BPE", "Unigram", "WordPiece", ...)."""
    return read_tokenizer_json(path)["model"].get("type")


def _steps(node: Any, key: str) -> list[dict]:
    """A normalizer or pre-tokenizer as a flat list of steps (Sequences unnested)."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get(key, []) for s in _steps(child, key)]
    return [node]


def _pattern(step: dict) -> str | None:
    p = step.get("pattern")
    if isinstance(p, dict):
        return p.get("Regex", p.get("String"))
    return p if isinstance(p, str) else None


def read_unigram(path: Path, doc: dict | None = None) -> UnigramJSON:
    """The Unigram vocabulary of tokenizer.json ``path`` and its llama.cpp settings; ``doc``:
    the pipeline transformers actually runs, where it differs from the file (transformers 5's
    T5Tokenizer rebuilds its normalizer and pre-tokenizer from the pieces and the charsmap)."""
    path = Path(path)
    doc = doc if doc is not None else read_tokenizer_json(path)
    model = doc.get("model") or {}
    if model.get("type") != "Unigram":
        raise EdgeIA3Error(f"{path}: its model is {model.get('type')!r}, not Unigram")
    try:
        pieces = [(str(p), float(s)) for p, s in model["vocab"]]
    except (KeyError, TypeError, ValueError) as e:
        raise EdgeIA3Error(f"{path}: the Unigram vocabulary is not a list of [piece, score] pairs") from e
    unk_id = model.get("unk_id")
    if unk_id is not None and not (isinstance(unk_id, int) and 0 <= unk_id < len(pieces)):
        raise EdgeIA3Error(f"{path}: the Unigram unk_id {unk_id!r} is not a piece of its vocabulary")

    charsmap, prefix, collapse, escaped, unmatched = b"", False, False, False, []
    for step in _steps(doc.get("normalizer"), "normalizers"):
        kind = step.get("type")
        if kind == "Precompiled":
            if charsmap:
                unmatched.append("a second Precompiled normalizer")
                continue
            try:
                charsmap = base64.b64decode(step.get("precompiled_charsmap") or "", validate=True)
            except (binascii.Error, TypeError) as e:
                raise EdgeIA3Error(f"{path}: the Precompiled normalizer's charsmap is not base64") from e
        elif kind == "Replace" and _pattern(step) == " {2,}" and step.get("content") in (" ", SPACE):
            collapse = True
        elif kind == "Replace" and _pattern(step) == " " and step.get("content") == SPACE:
            escaped = True
        elif kind == "Prepend" and step.get("prepend") == SPACE:
            prefix = True
        elif kind == "Strip" and not step.get("strip_left", False):
            pass  # a trailing-space strip (SentencePiece converters): llama.cpp drops them too
        else:
            unmatched.append(f"normalizer {kind}")
    for step in _steps(doc.get("pre_tokenizer"), "pretokenizers"):
        kind = step.get("type")
        if kind == "WhitespaceSplit":
            collapse = True
        elif kind == "Metaspace" and step.get("replacement", SPACE) == SPACE:
            escaped = True
            scheme = step.get("prepend_scheme")
            prefix = prefix or (scheme in ("always", "first") if scheme is not None
                                else bool(step.get("add_prefix_space", True)))
        else:
            unmatched.append(f"pre-tokenizer {kind}")
    if not escaped:
        unmatched.append("no Metaspace: spaces are not written as '\u2581'")
    return UnigramJSON(path, pieces, unk_id, bool(model.get("byte_fallback", False)), charsmap, prefix, collapse,
                       tuple(unmatched))


def unigram_tokens(u: UnigramJSON, tok: Any, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and GGUF token types in id order: the pieces (UNKNOWN for unk_id,
    CONTROL / USER_DEFINED for transformers' special / added tokens, BYTE for byte-fallback
    pieces), tokens transformers adds beyond them, [PAD] up to the model's vocabulary."""
    import gguf

    tokens = [p for p, _ in u.pieces]
    scores = [s for _, s in u.pieces]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for i, added in sorted(tok.added_tokens_decoder.items()):
        if i >= len(tokens):
            if i >= vocab_size:
                raise EdgeIA3Error(f"{u.path}: added token {added.content!r} has id {i}, beyond the model's "
                                   f"vocabulary of {vocab_size}")
            gap = i - len(tokens)
            tokens += [f"[PAD{len(tokens) + k}]" for k in range(gap)] + [added.content]
            scores += [-1000.0] * gap + [-1000.0]
            types += [gguf.TokenType.UNUSED] * gap + [gguf.TokenType.NORMAL]
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    if u.byte_fallback:
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">") and types[i] == gguf.TokenType.NORMAL:
                types[i] = gguf.TokenType.BYTE
    if u.unk_id is not None:
        types[u.unk_id] = gguf.TokenType.UNKNOWN
    if len(tokens) > vocab_size:
        raise EdgeIA3Error(f"{u.path} has {len(tokens)} tokens but the model's vocabulary is {vocab_size}")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types
