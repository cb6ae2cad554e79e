"""What llama.cpp puts around a text for a GGUF: its vocabulary's add-BOS / add-EOS flags
(``tokenizer.ggml.add_bos_token`` / ``add_eos_token``, else llama.cpp's defaults for the
vocabulary type), read from llama.cpp itself - the rule llama-server, ollama and
llama-cpp-python's ``tokenize`` defaults follow. Read as flags, not by tokenizing a probe:
llama.cpp aborts the process on some vocabularies (placeholder ones) when asked to tokenize."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeia3.tokens import TokenContract


def vocab_tokens(vocab: Any) -> TokenContract:
    """The contract of a llama.cpp vocabulary pointer (``llama_model_get_vocab``)."""
    import llama_cpp as ll

    bos, eos = int(ll.llama_vocab_bos(vocab)), int(ll.llama_vocab_eos(vocab))
    add_bos = bool(ll.llama_vocab_get_add_bos(vocab)) and bos >= 0
    add_eos = bool(ll.llama_vocab_get_add_eos(vocab)) and eos >= 0
    return TokenContract(add_bos, bos if add_bos else None, add_eos, eos if add_eos else None)


def llama_cpp_tokens(model: str | Path) -> TokenContract | None:
    """The contract llama.cpp applies to the GGUF ``model`` (loads its vocabulary only); None
    when llama.cpp refuses to load that vocabulary (it cannot run the file either)."""
    import llama_cpp

    try:
        llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    except ValueError:
        return None
    try:
        return vocab_tokens(llama_cpp.llama_model_get_vocab(llm.model))
    finally:
        llm.close()
