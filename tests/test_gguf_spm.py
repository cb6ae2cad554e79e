"""SentencePiece tokenizers (Gemma, Phi-3, Llama 2) through edgeia3's GGUF writer: a
SentencePiece model trained here, on tiny random models of three families. llama.cpp
must tokenize like transformers and compute what transformers computes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeia3 import load_base
from edgeia3.converters.gguf.base_gguf import GGUFBase
from edgeia3.converters.gguf.hf_writer import write_hf_gguf
from edgeia3.converters.gguf.vocab import PROBE
from edgeia3.fingerprint import identity_of_dir
from edgeia3.registry import family_for_config
from edgeia3.runtimes.llama_runtime import LlamaCppRuntime
from test_gguf_families import assert_deploys
from tiny_models import make_tiny_model

VOCAB = 300  # 256 byte-fallback pieces + a few dozen learned ones
# Ordinary text (no runs of leading spaces, where SentencePiece ports tend to differ).
TEXTS = ["hello red fox", "the lazy dog\nsees the sea", "fine day, cold snow!", "zebra 42"]
OVERRIDES = {"gemma3_text": {"query_pre_attn_scalar": 16}}


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    lines = ["the quick brown fox jumps over the lazy dog", "hello world, it is a fine day",
             "red warm sun fire ice cold snow sea wet rain lake frost"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(d / "sp"), vocab_size=VOCAB,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, minloglevel=3)
    tok = d / "tok"
    tok.mkdir()
    shutil.copy(d / "sp.model", tok / "tokenizer.model")
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))
    return tok


def _llama_cpp_tokens(path, text: str) -> list[int]:
    """llama.cpp's own tokenization of ``text`` through llama-cpp-python's public API."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return vocab.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        vocab.close()


@pytest.mark.parametrize("family", ["phi3", "gemma3_text", "llama"])
def test_sentencepiece_model_through_the_writer(family, spm_tokenizer, tmp_path):
    """The writer's claim about the tokenizer is what llama.cpp does: "verified" only where llama.cpp
    tokenizes the probe like transformers (then ordinary text too), "unverified" otherwise. Whether a
    given llama.cpp release special-cases a family (phi3's space prefix) is its business, not ours."""
    # not named after the family: llama.cpp special-cases some model names (phi3)
    d = make_tiny_model(family, tmp_path / "model", vocab_size=VOCAB, **OVERRIDES.get(family, {}))
    for f in spm_tokenizer.iterdir():
        shutil.copy(f, d / f.name)
    written = write_hf_gguf(d, tmp_path / "m.gguf")
    assert written.tokenizer.startswith("SentencePiece"), written.tokenizer
    hf_tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    probe_agrees = _llama_cpp_tokens(written.path, PROBE) == hf_tok(PROBE, add_special_tokens=False)["input_ids"]
    assert written.pre_verified == probe_agrees
    assert ("unverified" in written.tokenizer) != written.pre_verified
    # the support matrix claims these two (phi3: whatever this llama.cpp does, said truthfully)
    assert written.pre_verified or family == "phi3"
    if written.pre_verified:
        for text in TEXTS:
            assert _llama_cpp_tokens(written.path, text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    with LlamaCppRuntime(written.path) as rt:
        ids = hf_tok(TEXTS[1], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        assert np.abs(rt.logits(ids) - want).max() < 5e-3
    fam = family_for_config({"model_type": family})
    assert GGUFBase(written.path).identity.matches(identity_of_dir(d, fam))
    # transformers reads the written vocabulary back (its SentencePiece GGUF path) as the same base
    assert load_base(str(written.path), quant="none").identity.matches(identity_of_dir(d, fam))
    assert_deploys(d, written.path, family, tmp_path, ids=ids)
