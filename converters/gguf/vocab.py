"""Tokenizer metadata for a GGUF written from a transformers directory.

BPE tokenizers (SmolLM2, Qwen2, Llama 3) are written the way llama.cpp's
converter writes them: ``tokenizer.ggml.model = "gpt2"``, tokens with types,
merges, special token ids (gguf.SpecialVocab) and the chat template. The
pre-tokenizer name (``tokenizer.ggml.pre``) picks llama.cpp's split regex; it
is chosen from the family's candidates in the registry by checking that
llama.cpp tokenizes a probe text exactly as transformers does.

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


def write_vocab(w: Any, hf_dir: Path, vocab_size: int, pre: str | None = None) -> str:
    """Add the tokenizer of ``hf_dir`` to GGUFWriter ``w``; returns a note on what was written."""
    import gguf

    tok = _load_tokenizer(hf_dir)
    if tok is None:
        w.add_tokenizer_model("llama")  # SentencePiece-style placeholders: no merges needed
        w.add_token_list([f"<t{i}>" for i in range(vocab_size)])
        w.add_token_scores([0.0] * vocab_size)
        w.add_token_types([gguf.TokenType.NORMAL] * vocab_size)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        return "no tokenizer: placeholder vocabulary (drive the model by token ids)"
    backend = json.loads((hf_dir / "tokenizer.json").read_text()) if (hf_dir / "tokenizer.json").exists() else {}
    if backend.get("model", {}).get("type") != "BPE":
        raise EdgeIA3Error(f"{hf_dir}: only BPE tokenizers (tokenizer.json) can be written to GGUF by edgeia3")
    tokens, types = _bpe_tokens(tok, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size)
    special.chat_template = None  # written below from edgeia3's own reader (chat_template.jinja too)
    special.add_to_gguf(w, quiet=True)
    template = read_template(hf_dir)
    if template:
        w.add_chat_template(template)
    return f"BPE tokenizer, {len(tokens)} tokens, pre-tokenizer '{pre or 'default'}'"


def choose_pre_tokenizer(hf_dir: Path, candidates: tuple[str, ...], arch: str, vocab_size: int,
                         add_hparams: Callable[[Any], None]) -> tuple[str | None, bool]:
    """The first candidate with which llama.cpp tokenizes PROBE like transformers.

    Each candidate is tried on a vocabulary-only GGUF (metadata, no tensors),
    loaded by llama.cpp with vocab_only. Returns (name, verified).
    """
    tok = _load_tokenizer(hf_dir)
    if tok is None or not candidates:
        return None, False
    import gguf
    import llama_cpp
    from llama_cpp import _internals

    want = tok(PROBE, add_special_tokens=False)["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in candidates:
            path = Path(tmp) / f"vocab-{name}.gguf"
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
