"""Tokenizer metadata for a GGUF written from a transformers directory.

A SentencePiece ``tokenizer.model`` (Gemma, Phi-3, Llama 2: llama.cpp's
"llama" tokenizer) is written with its pieces, scores and piece types and its
dummy-prefix setting, as llama.cpp's converter does (it too tries SentencePiece
first). A ``tokenizer.json`` whose model is Unigram (a T5 saved by transformers 5
without ``spiece.model``) is written as the same "t5" vocabulary (unigram.py reads
its pieces, scores and normalizer settings). BPE tokenizers (SmolLM2, Qwen2,
Llama 3) are written the way llama.cpp's converter writes them:
``tokenizer.ggml.model = "gpt2"``, tokens with types, merges, special token ids
(gguf.SpecialVocab) and the chat template. The pre-tokenizer name
(``tokenizer.ggml.pre``) picks llama.cpp's split regex; it is chosen from the
family's candidates in the registry by checking that llama.cpp tokenizes a probe
text exactly as transformers does.

A model without a tokenizer (tiny random test models) gets placeholder
tokens so llama.cpp can load it; such a model is driven by token ids.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from edgeia3.errors import EdgeIA3Error
from edgeia3.prompts import read_template

from .unigram import model_type, read_unigram, unigram_tokens

PROBE = ("Hello world! It's 2024-06-01, 3.14159 and 12345678 items.\n\n  Indented\tTab   spaces "
         "don't, we'll, I'M. café naïve 你好世界 🚀🦙 <|im_start|>user\nhi<|im_end|> ```code``` ....!!!")


def _load_tokenizer(hf_dir: Path) -> Any | None:
    if not ((hf_dir / "tokenizer.json").exists() or (hf_dir / "tokenizer_config.json").exists()):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError) as e:
        raise EdgeIA3Error(f"cannot read the tokenizer of {hf_dir}: {e}") from e


def _bpe_tokens(tok: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types in id order (as llama.cpp's get_vocab_base)."""
    import gguf

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if t in added:
            special = decoder[i].special if i in decoder else False
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    return tokens, types


SPM_FILES = ("tokenizer.model", "spiece.model")  # T5 releases use the second name
UNIGRAM = 1  # SentencePiece TrainerSpec.model_type (2: BPE)


def _spm_proto(hf_dir: Path) -> Any | None:
    """The SentencePiece model of ``hf_dir`` (None: absent or not one)."""
    path = next((hf_dir / f for f in SPM_FILES if (hf_dir / f).is_file()), None)
    if path is None:
        return None
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError:
        return None  # e.g. Llama 3's tiktoken file under the same name
    return proto if len(proto.pieces) else None


def tokenizer_kind(hf_dir: Path) -> str | None:
    """"spm", "bpe", "unigram" (tokenizer.json), "none" (no tokenizer: placeholders) or None
    (not writable to GGUF)."""
    try:
        return _checked_kind(Path(hf_dir))
    except EdgeIA3Error:
        return None


JSON_KINDS = {"BPE": "bpe", "Unigram": "unigram"}  # tokenizer.json model type -> what write_vocab writes


def _checked_kind(hf_dir: Path) -> str:
    """tokenizer_kind, refusing (one EdgeIA3Error naming the file) what edgeia3 cannot write."""
    if _spm_proto(hf_dir) is not None:
        return "spm"
    path = hf_dir / "tokenizer.json"
    if not path.exists():
        if (hf_dir / "tokenizer_config.json").exists():
            raise EdgeIA3Error(f"{hf_dir}: the tokenizer has neither a tokenizer.json nor a SentencePiece model "
                               f"({' / '.join(SPM_FILES)}); edgeia3 writes BPE and Unigram tokenizer.json and "
                               "SentencePiece tokenizers to GGUF; convert this one with llama.cpp's "
                               "convert_hf_to_gguf.py")
        return "none"
    kind = model_type(path)
    if kind not in JSON_KINDS:
        raise EdgeIA3Error(f"{path}: its tokenizer model is {kind!r}; edgeia3 writes BPE and Unigram "
                           "tokenizer.json and SentencePiece (tokenizer.model, spiece.model) tokenizers to GGUF; "
                           "convert this one with llama.cpp's convert_hf_to_gguf.py")
    return JSON_KINDS[kind]


def _spm_tokens(proto: Any, tok: Any, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types in id order; SentencePiece's piece types are GGUF's token
    types (same numbers); tokens transformers adds beyond the model; [PAD] up to the vocab."""
    import gguf

    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    for i, added in sorted(tok.added_tokens_decoder.items()):
        if i == len(tokens):
            tokens.append(added.content)
            scores.append(-1000.0)
            types.append(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    if len(tokens) > vocab_size:
        raise EdgeIA3Error(f"the tokenizer has {len(tokens)} tokens but the model's vocabulary is {vocab_size}")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


def write_vocab(w: Any, hf_dir: Path, vocab_size: int, pre: str | None = None) -> str:
    """Add the tokenizer of ``hf_dir`` to GGUFWriter ``w``; returns a note on what was written."""
    import gguf

    kind = _checked_kind(hf_dir)  # an unsupported tokenizer is refused before transformers loads it
    tok = _load_tokenizer(hf_dir)
    if tok is None:
        # SentencePiece-style placeholders (no merges needed), with a newline byte token:
        # llama.cpp looks the newline up while loading some architectures (phi3) and aborts without it
        tokens = [f"<t{i}>" for i in range(vocab_size)]
        types = [gguf.TokenType.NORMAL] * vocab_size
        tokens[3], types[3] = "<0x0A>", gguf.TokenType.BYTE
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * vocab_size)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        return "no tokenizer: placeholder vocabulary (drive the model by token ids)"
    proto = _spm_proto(hf_dir)
    if proto is not None:
        tokens, scores, types = _spm_tokens(proto, tok, vocab_size)
        unigram = proto.trainer_spec.model_type == UNIGRAM
        # llama.cpp runs SentencePiece BPE as "llama" and Unigram as "t5" (its UGM tokenizer,
        # which also needs the normalizer's compiled character map)
        w.add_tokenizer_model("t5" if unigram else "llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        norm = proto.normalizer_spec
        w.add_add_space_prefix(bool(norm.add_dummy_prefix))
        if unigram:
            w.add_tokenizer_pre("default")
            w.add_remove_extra_whitespaces(bool(norm.remove_extra_whitespaces))
            if norm.precompiled_charsmap:
                w.add_precompiled_charsmap(bytes(norm.precompiled_charsmap))
        _add_specials_and_template(w, hf_dir, vocab_size, merges=False)
        return f"SentencePiece {'Unigram' if unigram else 'BPE'} tokenizer, {len(proto.pieces)} pieces"
    if kind == "unigram":
        return _write_unigram(w, hf_dir, tok, vocab_size)
    tokens, types = _bpe_tokens(tok, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    _add_specials_and_template(w, hf_dir, vocab_size, merges=True)
    return f"BPE tokenizer, {len(tokens)} tokens, pre-tokenizer '{pre or 'default'}'"


def _write_unigram(w: Any, hf_dir: Path, tok: Any, vocab_size: int) -> str:
    """A Unigram tokenizer.json as llama.cpp's "t5" vocabulary: the fields the SentencePiece
    route writes for a Unigram model, read from the pieces, normalizer and pre-tokenizer."""
    backend = getattr(tok, "backend_tokenizer", None)  # what transformers runs, else the file
    u = read_unigram(hf_dir / "tokenizer.json", json.loads(backend.to_str()) if backend is not None else None)
    tokens, scores, types = unigram_tokens(u, tok, vocab_size)
    w.add_tokenizer_model("t5")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(u.add_space_prefix)
    w.add_remove_extra_whitespaces(u.remove_extra_whitespaces)
    if u.charsmap:
        w.add_precompiled_charsmap(u.charsmap)
    _add_specials_and_template(w, hf_dir, vocab_size, merges=False,
                               fallback={"unk": u.unk_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id})
    note = f"Unigram tokenizer (tokenizer.json), {len(u.pieces)} pieces"
    if u.unmatched:
        note += f"; llama.cpp has no counterpart for: {', '.join(u.unmatched)}"
    return note


def _add_specials_and_template(w: Any, hf_dir: Path, vocab_size: int, merges: bool,
                               fallback: dict[str, int | None] | None = None) -> None:
    """gguf.SpecialVocab's special ids, add-BOS/EOS flags (and merges); ``fallback`` ids for
    the kinds it did not find; the chat template."""
    import gguf

    special = gguf.SpecialVocab(hf_dir, load_merges=merges, n_vocab=vocab_size)
    for typ, tid in (fallback or {}).items():
        if tid is not None and typ not in special.special_token_ids:
            special.special_token_ids[typ] = int(tid)
    special.chat_template = None  # written below from edgeia3's own reader (chat_template.jinja too)
    special.add_to_gguf(w, quiet=True)
    template = read_template(hf_dir)
    if template:
        w.add_chat_template(template)


def choose_pre_tokenizer(hf_dir: Path, candidates: tuple[str, ...], arch: str, vocab_size: int,
                         add_hparams: Callable[[Any], None]) -> tuple[str | None, bool]:
    """The first candidate with which llama.cpp tokenizes PROBE like transformers.

    Each candidate is tried on a vocabulary-only GGUF (metadata, no tensors),
    loaded by llama.cpp with vocab_only. Returns (name, verified).
    """
    kind = _checked_kind(Path(hf_dir))  # refuses an unsupported tokenizer before transformers loads it
    tok = _load_tokenizer(hf_dir)
    if tok is None:
        return None, False
    if kind in ("spm", "unigram"):
        candidates = (None,)  # SentencePiece / Unigram has no pre-tokenizer to choose: check it once
    elif not candidates:
        return None, False
    import gguf
    import llama_cpp
    from llama_cpp import _internals

    want = tok(PROBE, add_special_tokens=False)["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in candidates:
            path = Path(tmp) / f"vocab-{name or 'spm'}.gguf"
            w = gguf.GGUFWriter(str(path), arch)
            add_hparams(w)
            write_vocab(w, hf_dir, vocab_size, pre=name)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.close()
            params = llama_cpp.llama_model_default_params()
            params.vocab_only = True
            try:
                model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
            except ValueError:
                continue  # this llama.cpp does not know the name
            got = model.tokenize(PROBE.encode(), add_bos=False, special=True)
            model.close()
            if got == want:
                return name, True
    return candidates[0], False
